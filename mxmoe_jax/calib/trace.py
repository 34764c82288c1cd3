"""Expert tracing (the original's ``moe_tracer``): tokens and routing weight per expert per layer.

For every calibration window and every MoE layer, count the tokens routed to each expert (each
token counts once per expert in its top-k) and sum their routing weights; average both over the
windows and round the counts (§1.1 of the fact sheet), so ``access_freq`` sums to about
``num_tokens * topk``. Output: ``trace.json`` in the ``mxmoe-jax/trace/1`` schema, which keeps the
original's ``access_freq`` layout, and a heatmap (layers x experts).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from mxmoe_jax.calib import walk
from mxmoe_jax.jsonio import TRACE_FORMAT as FORMAT
from mxmoe_jax.jsonio import read_json
from mxmoe_jax.models.moe import capacity_for


@functools.partial(jax.jit, static_argnames="num_experts")
def _counts(topk_idx: jax.Array, topk_weight: jax.Array, num_experts: int):
    """Per window: tokens per expert ``[B, E]`` int32 and summed routing weights ``[B, E]``."""
    onehot = jax.nn.one_hot(topk_idx, num_experts, dtype=jnp.float32)  # [B, T, k, E]
    return (onehot.sum(axis=(1, 2)).astype(jnp.int32),
            jnp.einsum("btke,btk->be", onehot, topk_weight, precision=jax.lax.Precision.HIGHEST))


def _trace_batch(model, ids: jax.Array) -> tuple[list, list]:
    """Run the model layer by layer on ``ids [B, T]``; per MoE layer ``[B, E]`` counts/weights."""
    cfg = model.cfg
    b, t = ids.shape
    x = walk.embed(model, ids)
    counts, wsums = [], []
    for layer in model.layers:
        if not layer.is_moe:
            x = walk.run_layer(layer, x)
            continue
        h, xn = walk.attention_part(layer, x)
        x_td = xn.reshape(b * t, -1)
        idx, wt, biggest = walk.routing(layer.mlp, x_td)
        c, w = _counts(idx.reshape(b, t, -1), wt.reshape(b, t, -1), cfg.num_experts)
        counts.append(np.asarray(c))
        wsums.append(np.asarray(w, np.float64))
        moe = walk.moe_block(layer.mlp, x_td, capacity=capacity_for(int(biggest)))
        x = (h + moe.reshape(h.shape).astype(h.dtype)).astype(h.dtype)
    return counts, wsums


def trace_counts(model, windows: np.ndarray, *, batch_tokens: int = 8192,
                 progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Tokens per expert ``[L_moe, S, E]`` int and summed routing weights ``[L_moe, S, E]`` f64
    for the windows ``[S, T]`` (windows are run ``max(1, batch_tokens // T)`` at a time)."""
    if not model.cfg.moe_layers:
        raise ValueError("model: it has no MoE layer to trace")
    windows = np.asarray(windows, np.int32)
    s, t = windows.shape
    per = max(1, batch_tokens // t)
    starts = range(0, s, per)
    if progress:
        from tqdm import tqdm

        starts = tqdm(starts, desc="trace", unit="batch", total=-(-s // per))
    counts, wsums = [], []
    for i in starts:
        c, w = _trace_batch(model, jnp.asarray(windows[i:i + per]))
        counts.append(np.stack(c))
        wsums.append(np.stack(w))
    return np.concatenate(counts, axis=1), np.concatenate(wsums, axis=1)


def percentile_stats(access_freq: Sequence[int]) -> dict:
    """Share of the routed tokens taken by the n busiest experts, for a few n (as the original)."""
    freq = np.asarray(access_freq, np.int64)
    e = len(freq)
    order = np.argsort(-freq, kind="stable")
    total = max(int(freq.sum()), 1)
    ns = sorted({1, 2, 4, *(max(1, round(e * f)) for f in (1 / 8, 1 / 4, 1 / 2, 3 / 4))})
    out = {}
    for n in (n for n in ns if n <= e):
        top = order[:n]
        out[str(n)] = {"topk_ids": [int(i) for i in top], "freq": [int(freq[i]) for i in top],
                       "percent": round(float(freq[top].sum()) / total, 6)}
    return out


def build_trace(cfg, counts: np.ndarray, wsums: np.ndarray, *, model: str,
                text: Sequence[str], num_tokens: int) -> dict:
    """The ``mxmoe-jax/trace/1`` dict from ``trace_counts``' arrays."""
    moe_layers = list(cfg.moe_layers)
    if counts.shape[0] != len(moe_layers):
        raise ValueError(f"counts: {counts.shape[0]} layers, the model has {len(moe_layers)} MoE")
    out = {
        "format": FORMAT, "model": str(model), "model_fingerprint": cfg.fingerprint(),
        "text": [str(f) for f in text],
        "topk": cfg.num_experts_per_tok, "NK": [cfg.moe_intermediate_size, cfg.hidden_size],
        "num_layers": len(moe_layers), "num_tokens": int(num_tokens),
        "num_samples": int(counts.shape[1]),
        "num_shared_experts": (cfg.shared_intermediate_size / cfg.moe_intermediate_size
                               if cfg.shared_intermediate_size else 0),
        "moe_layers": moe_layers,
    }
    for j, i in enumerate(moe_layers):
        freq = [int(v) for v in np.rint(counts[j].mean(axis=0))]
        out[f"layer-{i}"] = {"access_freq": freq,
                             "weights_sum": [float(v) for v in wsums[j].mean(axis=0)],
                             "percentile_stats": percentile_stats(freq)}
    return out


def load_trace(path: str | os.PathLike) -> dict:
    """Read a ``trace.json`` and check its format tag."""
    return read_json(path, "trace.json", FORMAT)


def expert_share(trace: dict) -> np.ndarray:
    """``[L_moe, E]`` share of the routed (token, slot) pairs per expert, in percent."""
    rows = []
    for i in trace["moe_layers"]:
        f = np.asarray(trace[f"layer-{i}"]["access_freq"], np.float64)
        rows.append(100.0 * f / max(f.sum(), 1.0))
    return np.stack(rows)


def plot_traces(traces: Sequence[dict], titles: Sequence[str], out: str | os.PathLike) -> Path:
    """Heatmaps (layers x experts, % of routed tokens) side by side on one colour scale (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mats = [expert_share(t) for t in traces]
    vmax = max(float(m.max()) for m in mats)
    e = mats[0].shape[1]
    fig, axes = plt.subplots(1, len(mats), figsize=(1.2 + 0.25 * e * len(mats) + 1.5, 0.6
                                                     + 0.35 * mats[0].shape[0] + 1.2),
                             squeeze=False, constrained_layout=True)
    im = None
    for ax, m, title, tr in zip(axes[0], mats, titles, traces, strict=True):
        im = ax.imshow(m, aspect="auto", cmap="viridis", vmin=0.0, vmax=vmax,
                       interpolation="nearest")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("expert")
        ax.set_ylabel("layer")
        ax.set_yticks(range(m.shape[0]), [str(i) for i in tr["moe_layers"]])
        ax.set_xticks(range(0, m.shape[1], max(1, m.shape[1] // 16)))
    fig.colorbar(im, ax=list(axes[0]), label=f"% of routed tokens (uniform = {100 / e:.1f})")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.stem}.tmp{os.getpid()}{out.suffix}")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, out)
    return out


def trace_files(model_dir: str | os.PathLike, text: Sequence[str | os.PathLike], *,
                seqlen: int = 4096, nsamples: int = 32, sampling: str = "sample", seed: int = 42,
                tokenizer_dir: str | os.PathLike | None = None, batch_tokens: int = 8192,
                progress: bool = False) -> dict:
    """Load a MODEL_DIR or QMODEL_DIR (its own routing, on quantized layer inputs), cut
    ``text`` into windows with its tokenizer, and trace it."""
    import jax.numpy as jnp

    from mxmoe_jax.data import model_windows
    from mxmoe_jax.models.io import load_config
    from mxmoe_jax.quantize.checkpoint import load_any

    ids = model_windows(load_config(model_dir), tokenizer_dir or model_dir, text, seqlen=seqlen,
                        nsamples=nsamples, sampling=sampling, seed=seed)
    cfg, model = load_any(model_dir, dtype=jnp.float32)
    counts, wsums = trace_counts(model, ids, batch_tokens=batch_tokens, progress=progress)
    return build_trace(cfg, counts, wsums, model=str(model_dir), text=[str(t) for t in text],
                       num_tokens=ids.shape[1])
