"""GPTQ of a whole model's allocated expert blocks (the integration half of ``quant.gptq``).

As MxMoE's ``gptq.py`` [code]: layer by layer, the layer's input comes from the layers before it
*quantized* (errors accumulate as at inference). The layer's FP SwiGLU stacks run once over the
calibration tokens through the one MoE forward with a capture hook, which hands over every
expert's gate_up input rows and its down input rows (``silu(g)·u`` of the FP weights, rotated
online when the model is): each routed expert's Hessian comes from the tokens routed to it, the
shared expert's and a dense MLP's from every token. Every allocated projection is then quantized
(one vmapped GPTQ call per (stack, projection, scheme); gate and up fused, which equals quantizing
them apart: GPTQ's updates are per output channel), the layer's stacks are replaced by their
quantized form, and the quantized layer produces the next layer's input.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import nnx

from mxmoe_jax.alloc.qconfig import Allocation
from mxmoe_jax.models.model import attention_part
from mxmoe_jax.models.moe import Hooks, QuantizedExperts, dense_swiglu, moe_forward, signs_of
from mxmoe_jax.quant.gptq import (
    GPTQConfig,
    gptq_quantize,
    hessian_finalize,
    hessian_init,
    hessian_update,
)
from mxmoe_jax.quantize.apply import (
    Quantized,
    allocated_stacks,
    copy_model,
    fp_projection,
    quantized_stack,
    replace_stack,
    split_experts,
    stack_index,
)

PROJS = ("gate_up", "down")


@nnx.jit
def _stack_inputs(mlp, y):
    """Rows entering gate_up and down of every stack of one layer's MLP, FP weights, sorted
    layout: ``{stack: (x [M, D], h [M, I], group_sizes [E])}`` (stack "routed", "shared",
    "dense")."""
    cap: dict = {}
    x_td = y.reshape(-1, y.shape[-1])
    if isinstance(mlp, QuantizedExperts) or not hasattr(mlp, "router"):
        dense_swiglu(mlp, x_td, dtype=mlp.dtype, hooks=Hooks(capture=cap))
        t = jnp.asarray([x_td.shape[0]], jnp.int32)
        return {"dense": (cap["dense"]["x"], cap["dense"]["h"], t)}
    moe_forward(mlp, x_td, hooks=Hooks(capture=cap))
    out = {"routed": (cap["routed"]["x"], cap["routed"]["h"], cap["dispatch"].group_sizes)}
    if "shared" in cap:
        out["shared"] = (cap["shared"]["x"], cap["shared"]["h"],
                         jnp.asarray([x_td.shape[0]], jnp.int32))
    return out


@nnx.jit
def _mlp_out(mlp, y):
    return mlp(y)


def _stack_name(layer, idx) -> str:
    return "dense" if not layer.is_moe else "routed" if idx is None else "shared"


def gptq_weights(model, calib_ids: np.ndarray, allocation: Allocation, *,
                 config: GPTQConfig | None = None, batch_windows: int = 8,
                 progress: bool = False) -> Quantized:
    """GPTQ codes of every allocated block of ``model`` (not modified) on ``calib_ids [n, T]``
    (w16a16 blocks have none: they are bf16-rounded). Pass the result to ``quantize_model``."""
    config = config or GPTQConfig()
    cfg = model.cfg
    ids = np.asarray(calib_ids, np.int32)
    if ids.ndim != 2 or ids.shape[0] == 0:
        raise ValueError(f"calib_ids: expected [n >= 1, seqlen] token ids, got shape {ids.shape}")
    work = copy_model(model)  # quantized layer by layer below
    xs = [work.embed_tokens(jnp.asarray(ids[s:s + batch_windows]))
          for s in range(0, len(ids), batch_windows)]
    out: Quantized = {}
    layers = range(cfg.num_layers)
    if progress:
        from tqdm import tqdm

        layers = tqdm(layers, desc="gptq", unit="layer")
    for i in layers:
        layer = work.layers[i]
        parts = [attention_part(layer, x) for x in xs]  # [(h, y)]
        planned = [(li, idx, stack, plan) for li, idx, stack, plan
                   in allocated_stacks(work, allocation) if li == i]
        if planned:
            states: dict = {}
            for _, y in parts:
                for name, (x_rows, h_rows, gs) in _stack_inputs(layer.mlp, y).items():
                    if name not in states:
                        e = gs.shape[0]
                        states[name] = (hessian_init(e, x_rows.shape[-1]),
                                        hessian_init(e, h_rows.shape[-1]))
                    s_in, s_down = states[name]
                    states[name] = (hessian_update(s_in, x_rows, gs),
                                    hessian_update(s_down, h_rows, gs))
            for li, idx, stack, plan in planned:
                s_in, s_down = states[_stack_name(layer, idx)]
                hess = {"gate_up": hessian_finalize(s_in), "down": hessian_finalize(s_down)}
                w = stack.weights()
                for proj in PROJS:
                    by_scheme: dict = {}
                    for j, p in plan.items():
                        if p[proj] is not None and p[proj].w_bits != 16:
                            by_scheme.setdefault(p[proj], []).append(j)
                    full = fp_projection(w, proj)
                    for s, experts in by_scheme.items():
                        sel = np.asarray(experts)
                        qw = gptq_quantize(full[sel], hess[proj][sel], s, config)
                        out.update(split_experts(qw, [(li, stack_index(idx, j), proj)
                                                      for j in experts]))
                ew = quantized_stack(w, li, idx, plan, out, work.dtype)
                replace_stack(work, li, idx, QuantizedExperts(ew, dtype=work.dtype,
                                                              down_signs=signs_of(stack)))
            layer = work.layers[i]
        xs = [h + _mlp_out(layer.mlp, y) for h, y in parts]
    return out


