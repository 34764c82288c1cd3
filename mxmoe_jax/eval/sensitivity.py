"""The loss cost of a unit of layer-output error, per MoE layer (``mxmoe-jax sensitivity``).

calibrate's Δ of a block is measured in the units of its own layer's output, and the layers do
not turn a unit of output error into the same loss increase: on ``qwen2moe-tiny-books`` a later
layer's hidden state is larger, so the same perplexity cost shows as a larger Δ there, and a
model-wide budget over raw Δ² gives the early layers too few bits (`bench/proxy_study.py`).

For each MoE layer ``l`` alone, every expert block (routed and shared) is quantized with one
reference scheme (RTN), and on calibration windows two things are measured:

* ``dnll``: the mean next-token NLL of the model with layer ``l`` quantized minus the FP model's;
* ``delta_sq``: ``||Ô_l − O_l||²`` of that layer's MoE-block output, summed over the windows'
  tokens, on the FP inputs of the layer (Δ² of all blocks at once; Δ² of independent blocks add,
  so this is about the layer's Σ Δ² in calibrate's units when both use the same windows).

``alpha = dnll / delta_sq`` is the loss increase per unit of Δ² at layer ``l``; ``solve
--sensitivity`` (`alloc.problem.weigh_layers`) multiplies each layer's proxy by it (normalised
to mean 1), so a model-wide budget weighs the layers by what their errors cost. A per-layer
budget is unchanged by it.
"""

from __future__ import annotations

import datetime
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mxmoe_jax.jsonio import SENSITIVITY_FORMAT as FORMAT


def _layer_allocation(cfg, layer: int, scheme: str):
    from mxmoe_jax.alloc.qconfig import Allocation

    every = Allocation.uniform(cfg, scheme)
    return Allocation(cfg, {k: s.name for k, s in every.items if k[0] == layer})


def _nll(model, windows: np.ndarray, batch: int) -> float:
    from mxmoe_jax.eval.perplexity import perplexity
    from mxmoe_jax.models import forward

    return perplexity(lambda ids: forward(model, ids), windows, batch_size=batch).nll


@nnx.jit
def _block_out(block, x_btd: jax.Array) -> jax.Array:
    """An MLP / MoE block on ``x``: one compilation per block structure, shared by every layer
    and batch (a fresh ``jax.jit(lambda ...)`` per call would compile each time)."""
    return block(x_btd)


def _block_sq_diff(fp_block, q_block, x_btd: jax.Array) -> float:
    """``||q_block(x) - fp_block(x)||²`` summed over tokens, in f64 on the host."""
    ref = np.asarray(_block_out(fp_block, x_btd), np.float64)
    got = np.asarray(_block_out(q_block, x_btd), np.float64)
    return float(np.sum((got - ref) ** 2))


def measure_sensitivity(model, windows: np.ndarray, scheme: str = "w2a16_g-1_asym", *,
                        batch: int = 4, layers=None, progress: bool = False) -> dict:
    """The sensitivity dict (module doc) of ``model`` on ``windows [n, T]``; ``layers``: the MoE
    layers to measure (default all)."""
    from mxmoe_jax.models import forward_hidden
    from mxmoe_jax.quant.scheme import QScheme
    from mxmoe_jax.quantize.apply import quantize_model

    cfg = model.cfg
    name = QScheme.parse(scheme).name
    if QScheme.parse(scheme).w_bits == 16:
        raise ValueError(f"--scheme: {name} does not quantize; give a low-bit reference scheme "
                         "such as w2a16_g-1_asym")
    moe = list(cfg.moe_layers)
    wanted = moe if layers is None else sorted({int(i) for i in layers})
    bad = [i for i in wanted if i not in moe]
    if bad:
        raise ValueError(f"--layers: {bad} are not MoE layers of this model ({moe})")
    windows = np.asarray(windows, np.int32)
    fp_nll = _nll(model, windows, batch)
    out = {}
    for i in wanted:
        qmodel = quantize_model(model, _layer_allocation(cfg, i, name))
        dnll = _nll(qmodel, windows, batch) - fp_nll
        sq = 0.0
        for s in range(0, windows.shape[0], batch):
            _, captured = forward_hidden(model, jnp.asarray(windows[s:s + batch]), capture=[i],
                                         with_logits=False)
            sq += _block_sq_diff(model.layers[i].mlp, qmodel.layers[i].mlp, captured[i])
        out[str(i)] = {"dnll": dnll, "delta_sq": sq, "alpha": dnll / sq if sq > 0 else 0.0}
        if progress:
            print(f"layer {i}: NLL +{dnll:.5f}, Σ Δ² {sq:.4g}, alpha {out[str(i)]['alpha']:.4g}")
    return {"format": FORMAT,
            "meta": {"scheme": name, "quantizer": "rtn", "windows": int(windows.shape[0]),
                     "seqlen": int(windows.shape[1]), "fp_nll": fp_nll,
                     "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")},
            "layers": out}


def main_sensitivity(args) -> int:
    """``mxmoe-jax sensitivity`` (registered by `eval.cli`)."""
    from mxmoe_jax.data import model_windows
    from mxmoe_jax.jsonio import write_json_atomic
    from mxmoe_jax.models.io import load_model_dir

    out = Path(args.out)
    if out.exists() and not args.force:
        raise FileExistsError(f"{out} exists; pass --force to overwrite")
    for f in args.text:
        if not Path(f).is_file():
            raise FileNotFoundError(f"--text: {f} not found")
    cfg, model = load_model_dir(args.model, dtype=jnp.float32)
    windows = np.asarray(model_windows(cfg, args.tokenizer or args.model, args.text,
                                       seqlen=args.seqlen, nsamples=args.nsamples,
                                       seed=args.seed))
    sens = measure_sensitivity(model, windows, args.scheme, batch=args.batch,
                               layers=args.layers, progress=True)
    sens["meta"].update(model=str(args.model), text=[str(t) for t in args.text],
                        seed=args.seed)
    write_json_atomic(out, sens)
    print(f"wrote {out}: {len(sens['layers'])} layers, reference {sens['meta']['scheme']}")
    return 0
