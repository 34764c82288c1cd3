"""Applying an allocation to a model: quantized expert stacks, model GPTQ, rotation, QMODEL_DIR.

The integration layer above ``models`` (the numerics live in ``mxmoe_jax.quant``):

* ``apply.py``: ``rtn_weights`` / ``quantize_model``: a model whose SwiGLU stacks hold their expert
  weights grouped by scheme (``models.moe.ExpertWeights`` of ``PackedWeight``); its forward is
  the FP model's forward, run on the kernels or the reference by ``ops.grouped_matmul``.
* ``gptq.py``: GPTQ of every allocated block, layer by layer through the one MoE forward.
* ``rotation.py``: the rotated model (``rotate_model``), the online part as a model variable.
* ``checkpoint.py``: QMODEL_DIR (Orbax), ``save_qmodel`` / ``load_qmodel`` / ``load_any``.
* ``cli.py``: ``mxmoe-jax quantize``.
"""
