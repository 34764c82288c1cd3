"""``calibrate``: Δ per (layer, expert incl. shared, block, scheme) -> ``loss.json``.

The accuracy half of MxMoE's co-design (§4.1 of the paper, ``quant.py calib`` of the original):
how much does quantizing one linear block alone hurt? Two metrics, as the original:

* ``layer_out_norm`` (default): ``||Ô − O||_F`` of the decoder-layer output over every calibration
  token, on FP layer inputs (no error accumulation). Computed with the exact shortcut of
  ``loss.py``: all experts and blocks of a layer from one jitted pass per token chunk.
* ``model_out_norm``: the same for the final hidden state (after the final norm), by brute force:
  one pass from the layer to the top of the model per (layer, expert, block, scheme), i.e.
  ``L·(E+1)·3`` partial forwards per scheme. Only usable on tiny models.

Quantizers: ``rtn`` (``quant.rtn``) and ``gptq`` (Hessians from each expert's routed tokens, FP
inputs; ``quant.gptq``), optionally after the model is Hadamard-rotated exactly as ``eval
--hadamard`` rotates it (``quant.rotation.rotate_params(..., online_down=True)``: the residual
stream, and every down_proj input online, so the down blocks measured are the ones evaluated).

Memory: the hidden states of all calibration windows at the current layer (host), plus one token
chunk's activations on the device. Resumable: after each MoE layer the finished losses are written
atomically to ``<out>.partial.json``; a rerun with the same settings continues after the last
finished layer (earlier layers are only replayed in FP to rebuild their outputs).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from mxmoe_jax.calib import walk
from mxmoe_jax.calib.loss import (
    BLOCKS,
    MLPWeights,
    QuantizedBlocks,
    block_supported,
    combine_groups,
    losses_sq,
    pad_groups,
    selected_mlp,
)
from mxmoe_jax.config import ModelConfig
from mxmoe_jax.jsonio import read_json, write_json_atomic
from mxmoe_jax.quant.rotation import Rotation
from mxmoe_jax.quant.rtn import fake_quant_weight
from mxmoe_jax.quant.scheme import QScheme

FORMAT = "mxmoe-jax/loss/1"
METHODS = ("rtn", "gptq")
METRICS = ("layer_out_norm", "model_out_norm")


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class CalibConfig:
    """What to calibrate and how."""

    schemes: tuple[str, ...]  # QScheme names (parsed and normalised in __post_init__)
    method: str = "rtn"  # weight quantizer: "rtn" | "gptq"
    hadamard: bool = False  # the model is rotated (caller) and calibrate() gets its Rotation
    metric: str = "layer_out_norm"  # "layer_out_norm" | "model_out_norm"
    batch_tokens: int = 8192  # tokens per jitted chunk (bounds device memory)
    layers: tuple[int, ...] | None = None  # MoE layers to calibrate (None = all)

    def __post_init__(self):
        if not self.schemes:
            raise ValueError("schemes: give at least one scheme, e.g. w4a16_g128_asym")
        names = tuple(QScheme.parse(s).name for s in self.schemes)
        if len(set(names)) != len(names):
            raise ValueError(f"schemes: {list(self.schemes)} names a scheme twice")
        object.__setattr__(self, "schemes", names)
        if self.method not in METHODS:
            raise ValueError(f"method: {self.method!r} is not one of {METHODS}")
        if self.metric not in METRICS:
            raise ValueError(f"metric: {self.metric!r} is not one of {METRICS}")
        if self.batch_tokens < 1:
            raise ValueError(f"batch_tokens: {self.batch_tokens} must be positive")


# ------------------------------------------------------------------------------ quantizers

# quantize(w [..., K, N], scheme, hessian [..., K, K] | None) -> fake-quantized f32 [..., K, N]
Quantizer = Callable[[jax.Array, QScheme, jax.Array | None], jax.Array]


def _rtn(w, scheme, hessian):
    return fake_quant_weight(w, scheme)


def _gptq(w, scheme, hessian):
    from mxmoe_jax.quant.gptq import gptq_quantize
    from mxmoe_jax.quant.qtensor import dequantize

    if scheme.w_bits == 16:  # bf16 rounding, nothing to solve
        return fake_quant_weight(w, scheme)
    return dequantize(gptq_quantize(w, hessian, scheme))


QUANTIZERS: dict[str, Quantizer] = {"rtn": _rtn, "gptq": _gptq}


def quantize_mlp(w: MLPWeights, scheme: QScheme, quantize: Quantizer,
                 hessians: MLPWeights | None = None) -> QuantizedBlocks:
    """Every block of ``w`` (all experts at once) fake-quantized with ``scheme``; None where the
    scheme's ``group_size`` does not divide the block's K. ``hessians`` (GPTQ): per block,
    ``[..., K, K]`` (gate and up share one, the input's)."""
    out = {}
    for b in BLOCKS:
        wb = w.block(b)
        if not block_supported(scheme, wb.shape[-2]):
            out[b] = None
            continue
        hb = None if hessians is None else hessians.block(b)
        out[b] = jnp.asarray(quantize(wb, scheme, hb), jnp.float32)
    return QuantizedBlocks(**out, scheme=scheme)


# ------------------------------------------------------------------------------ jitted steps

@functools.partial(jax.jit, static_argnames=("cfg", "capacity"))
def _chunk_losses(cfg: ModelConfig, p: walk.MoEParams, x_td, mask, routed_q, shared_q, *,
                  capacity: int):
    """One token chunk: (Δ² ``[S, E(+1), 3]``, MoE output ``[T, D]`` f32). ``mask [T]``: 1 for
    real tokens, 0 for the chunk's padding."""
    idx, wt = walk.route_tokens(cfg, p.router, x_td)
    groups = pad_groups(x_td, idx, wt * mask[:, None], cfg.num_experts, capacity)
    r_sq, y = losses_sq(groups.x, groups.weight, p.routed, routed_q, batched=True,
                        down_signs=p.routed_down_signs)
    out = combine_groups(groups, y, x_td.shape[0])
    if p.shared is None:
        return r_sq, out
    gw = walk.shared_weight(p, x_td)
    s_sq, ys = losses_sq(x_td, gw * mask, p.shared, shared_q, batched=False,
                         down_signs=p.shared_down_signs)
    return jnp.concatenate([r_sq, s_sq[:, None, :]], axis=1), out + gw[:, None] * ys


@functools.partial(jax.jit, static_argnames=("cfg", "capacity"))
def _chunk_hessians(cfg: ModelConfig, p: walk.MoEParams, x_td, mask, *, capacity: int):
    """Σ x xᵀ over each expert's routed rows for gate/up (``[E, D, D]``) and down (``[E, I, I]``),
    plus the shared expert's (all tokens), and the row counts: GPTQ's Hessians, unnormalised."""
    idx, wt = walk.route_tokens(cfg, p.router, x_td)
    groups = pad_groups(x_td * mask[:, None], idx, wt, cfg.num_experts, capacity)
    rows = (groups.valid & (mask[groups.token] > 0)).astype(jnp.float32)  # [E, C]
    x = groups.x * rows[..., None]
    h = walk.swiglu_parts(x, p.routed, walk._bmm, p.routed_down_signs)[2] * rows[..., None]
    hi = jax.lax.Precision.HIGHEST
    out = {"gate_up": jnp.einsum("ecd,ecf->edf", x, x, precision=hi),
           "down": jnp.einsum("eci,ecj->eij", h, h, precision=hi), "n": rows.sum(axis=1)}
    if p.shared is not None:
        xs = x_td.astype(jnp.float32) * mask[:, None]
        hs = walk.swiglu_parts(xs, p.shared, walk._mm, p.shared_down_signs)[2]
        out["shared_gate_up"] = jnp.dot(xs.T, xs, precision=hi)
        out["shared_down"] = jnp.dot(hs.T, hs, precision=hi)
        out["shared_n"] = mask.sum()
    return out


@functools.partial(jax.jit, static_argnames=("cfg", "capacity"))
def _moe_one_block(cfg: ModelConfig, p: walk.MoEParams, x_td, expert, block, routed_q,
                   shared_q, *, capacity: int):
    """The MoE output ``[T, D]`` with only ``block`` (0 gate, 1 up, 2 down) of ``expert``
    quantized (``expert == E``: the shared expert). For the brute-force ``model_out_norm``."""
    e = cfg.num_experts
    idx, wt = walk.route_tokens(cfg, p.router, x_td)
    groups = pad_groups(x_td, idx, wt, e, capacity)
    rows = groups.valid & (jnp.arange(e)[:, None] == expert)
    y = selected_mlp(groups.x, p.routed, routed_q, block, rows, batched=True,
                     down_signs=p.routed_down_signs)
    out = combine_groups(groups, y, x_td.shape[0])
    if p.shared is not None:
        rows_s = jnp.full(x_td.shape[:1], expert == e)
        ys = selected_mlp(x_td, p.shared, shared_q, block, rows_s, batched=False,
                          down_signs=p.shared_down_signs)
        out = out + walk.shared_weight(p, x_td)[:, None] * ys
    return out


@jax.jit
def _sq_diff(a, b):
    d = a.astype(jnp.float32) - b.astype(jnp.float32)
    return jnp.sum(d * d)


# ------------------------------------------------------------------------------ the driver

def _progress(total: int, desc: str, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="chunk", leave=True, dynamic_ncols=True)


def _pad_rows(x: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Pad ``x [t, D]`` to ``n`` rows with zeros; returns (padded, mask [n] f32)."""
    t = x.shape[0]
    mask = np.zeros((n,), np.float32)
    mask[:t] = 1.0
    if t == n:
        return x, mask
    return np.concatenate([x, np.zeros((n - t, x.shape[1]), x.dtype)]), mask


def _hessians(cfg, p: walk.MoEParams, x_flat: np.ndarray, chunk: int, bar):
    acc = None
    for sl in walk.iter_batches(x_flat.shape[0], chunk):
        xc, mask = _pad_rows(x_flat[sl], chunk)
        xc = jnp.asarray(xc)
        cap = walk.chunk_capacity(cfg, p, xc)
        part = _chunk_hessians(cfg, p, xc, jnp.asarray(mask), capacity=cap)
        acc = part if acc is None else jax.tree.map(jnp.add, acc, part)
        if bar is not None:
            bar.update(1)
    # mean x xᵀ per expert (GPTQ's H up to a factor it is invariant to); 0 for an unused expert
    n = jnp.maximum(acc["n"], 1.0)[:, None, None]
    routed = MLPWeights(gate=acc["gate_up"] / n, up=acc["gate_up"] / n, down=acc["down"] / n)
    shared = None
    if p.shared is not None:
        ns = jnp.maximum(acc["shared_n"], 1.0)
        shared = MLPWeights(gate=acc["shared_gate_up"] / ns, up=acc["shared_gate_up"] / ns,
                            down=acc["shared_down"] / ns)
    return routed, shared


def _quantize_layer(p: walk.MoEParams, schemes: Sequence[QScheme], quantize: Quantizer,
                    hess: tuple | None):
    routed_q, shared_q = [], []
    for s in schemes:
        routed_q.append(quantize_mlp(p.routed, s, quantize, None if hess is None else hess[0]))
        if p.shared is not None:
            shared_q.append(quantize_mlp(p.shared, s, quantize,
                                         None if hess is None else hess[1]))
    return tuple(routed_q), tuple(shared_q)


def _supported(p: walk.MoEParams, scheme: QScheme, num_experts: int) -> list[list[bool]]:
    """[E(+1)][3]: which (expert, block) the scheme can quantize."""
    def row(w: MLPWeights):
        return [block_supported(scheme, w.block(b).shape[-2]) for b in BLOCKS]

    rows = [row(p.routed)] * num_experts
    if p.shared is not None:
        rows.append(row(p.shared))
    return rows


def _to_json_losses(sq: np.ndarray, supported: list[list[bool]]) -> dict[str, list]:
    """``[E(+1), 3]`` squared norms -> {"e": [Δ_gate, Δ_up, Δ_down]} (None: not quantizable)."""
    return {str(e): [math.sqrt(max(float(v), 0.0)) if ok else None
                     for v, ok in zip(sq[e], supported[e], strict=True)]
            for e in range(sq.shape[0])}


def _layer_out_norm(cfg, p, xn_flat, h_flat, schemes, quantize, chunk, method, bar):
    """Δ² ``[S, E(+1), 3]`` (f64) and the layer output ``[N, D]`` for one MoE layer.

    ``h_flat`` (the residual stream after attention) is overwritten with the layer output.
    """
    hess = None
    if method == "gptq":
        routed_h, shared_h = _hessians(cfg, p, xn_flat, chunk, bar)
        hess = (routed_h, shared_h)
    routed_q, shared_q = _quantize_layer(p, schemes, quantize, hess)
    total = None
    out = h_flat  # becomes the layer output in place: one host copy fewer
    for sl in walk.iter_batches(xn_flat.shape[0], chunk):
        xc, mask = _pad_rows(xn_flat[sl], chunk)
        xc = jnp.asarray(xc)
        cap = walk.chunk_capacity(cfg, p, xc)
        sq, moe = _chunk_losses(cfg, p, xc, jnp.asarray(mask), routed_q, shared_q, capacity=cap)
        sq = np.asarray(sq, np.float64)
        total = sq if total is None else total + sq
        n = sl.stop - sl.start
        out[sl] += np.asarray(moe[:n], np.float32)
        if bar is not None:
            bar.update(1)
    return total, out


def _model_out_norm(cfg, model, layer_idx, p, xn, h, final_ref, schemes, quantize, per, method,
                    chunk, bar, rotation):
    """Brute force: Δ² ``[S, E(+1), 3]`` of the final hidden state, one block at a time."""
    s_windows, t, d = xn.shape
    hess = None
    if method == "gptq":
        routed_h, shared_h = _hessians(cfg, p, xn.reshape(-1, d), chunk, None)
        hess = (routed_h, shared_h)
    routed_q, shared_q = _quantize_layer(p, schemes, quantize, hess)
    n_exp = cfg.num_experts + (1 if p.shared is not None else 0)
    later = [(j, model.layers[j]) for j in range(layer_idx + 1, cfg.num_layers)]
    later_p = {j: walk.moe_params(lay, rotation) for j, lay in later if lay.is_moe}
    total = np.zeros((len(schemes), n_exp, 3), np.float64)
    for si, s in enumerate(schemes):
        sup = _supported(p, s, cfg.num_experts)
        sh_q = shared_q[si] if shared_q else None
        for e in range(n_exp):
            for b in range(3):
                if not sup[e][b]:
                    continue
                acc = 0.0
                for sl in walk.iter_batches(s_windows, per):
                    x_td = jnp.asarray(xn[sl].reshape(-1, d))
                    cap = walk.chunk_capacity(cfg, p, x_td)
                    moe = _moe_one_block(cfg, p, x_td, e, b, routed_q[si], sh_q, capacity=cap)
                    x = jnp.asarray(h[sl]) + moe.reshape(h[sl].shape).astype(h.dtype)
                    for j, lay in later:
                        x = walk.layer_forward(cfg, lay, x, later_p.get(j), rotation)
                    acc += float(_sq_diff(walk.final_hidden(model, x), jnp.asarray(final_ref[sl])))
                total[si, e, b] = acc
                if bar is not None:
                    bar.update(1)
    return total


def _check_resume(partial: Path, meta: dict) -> tuple[dict, list[int]]:
    data = json.loads(partial.read_text())
    if data.get("format") != FORMAT or data.get("meta") != meta:
        raise ValueError(f"{partial} is from a run with other settings (model, text, schemes, "
                         "method, metric, tokens or seed); delete it to start afresh")
    return data["losses"], [int(i) for i in data.get("done_layers", [])]


def calibrate(model, windows: np.ndarray, config: CalibConfig, *, meta: dict,
              partial_path: str | os.PathLike | None = None, progress: bool = False,
              quantizer: Quantizer | None = None, rotation: Rotation | None = None) -> dict:
    """Run calibration on ``windows [S, T]``; returns the ``loss.json`` dict.

    ``rotation``: the ``Rotation`` that ``model`` was rotated with (`rotate_for_calibration`);
    its online down_proj part is applied to every down_proj input, as ``quant_forward`` does.

    ``meta`` is stored as given (the CLI fills model, text, seqlen, seed, ...); ``method``,
    ``metric``, ``hadamard``, ``schemes`` and ``num_tokens`` are set from ``config``/``windows``.
    With ``partial_path``, finished layers are kept there and a rerun resumes from it.
    ``quantizer`` overrides ``config.method``'s weight quantizer (tests, other algorithms).
    """
    cfg: ModelConfig = model.cfg
    windows = np.asarray(windows, np.int32)
    if windows.ndim != 2:
        raise ValueError(f"windows: expected [S, T] token ids, got shape {windows.shape}")
    s_windows, t = windows.shape
    schemes = [QScheme.parse(s) for s in config.schemes]
    meta = dict(meta, method=config.method, hadamard=config.hadamard, metric=config.metric,
                num_tokens=int(windows.size), seqlen=int(t), schemes=list(config.schemes))
    if config.hadamard and rotation is None:
        raise ValueError("rotation: config.hadamard is set but no rotation was given (rotate the "
                         "model with rotate_for_calibration and pass its Rotation)")
    if rotation is not None:  # resume only from a run with the same rotation
        meta.update(rotation_seed=rotation.seed, online_down=rotation.online_down)
    moe_layers = list(cfg.moe_layers)
    if not moe_layers:
        raise ValueError("model: it has no MoE layer to calibrate")
    wanted = moe_layers if config.layers is None else sorted(set(config.layers))
    bad = [i for i in wanted if i not in moe_layers]
    if bad:
        raise ValueError(f"layers: {bad} are not MoE layers of this model ({moe_layers})")
    if config.layers is not None:
        meta["layers"] = wanted
    quantize = quantizer or QUANTIZERS[config.method]

    losses: dict[str, dict] = {s.name: {} for s in schemes}
    done: list[int] = []
    partial = Path(partial_path) if partial_path is not None else None
    if partial is not None and partial.exists():
        losses, done = _check_resume(partial, meta)
        if progress and done:
            print(f"resuming from {partial}: layers {done} are done")

    per = walk.windows_per_batch(config.batch_tokens, t)
    chunk = config.batch_tokens
    hidden = np.concatenate([walk.to_host(walk.embed(model, jnp.asarray(windows[sl])))
                             for sl in walk.iter_batches(s_windows, per)])  # [S, T, D]
    final_ref = None
    if config.metric == "model_out_norm" and any(i not in done for i in wanted):
        x = hidden
        for i in range(cfg.num_layers):
            x = _fp_layer(cfg, model.layers[i], x, per, rotation)
        final_ref = np.concatenate([walk.to_host(walk.final_hidden(model, jnp.asarray(x[sl])))
                                    for sl in walk.iter_batches(s_windows, per)])
    last = max(wanted)
    times: list[float] = []
    for i in range(last + 1):
        layer = model.layers[i]
        if i not in wanted or i in done:
            hidden = _fp_layer(cfg, layer, hidden, per, rotation) if i < last else hidden
            continue
        start = time.perf_counter()
        h, xn = _attention(layer, hidden, per)
        if config.metric == "layer_out_norm":
            hidden = None  # not needed again: frees one [S, T, D] copy while the layer runs
        p = walk.moe_params(layer, rotation)
        d = h.shape[-1]
        n_chunks = -(-xn.shape[0] * t // chunk)
        if config.metric == "layer_out_norm":
            passes = n_chunks * (2 if config.method == "gptq" else 1)
            bar = _progress(passes, f"layer {i}/{cfg.num_layers - 1}", progress)
            sq, out = _layer_out_norm(cfg, p, xn.reshape(-1, d), h.reshape(-1, d), schemes,
                                      quantize, chunk, config.method, bar)
            hidden = out.reshape(h.shape)
        else:
            n_exp = cfg.num_experts + (1 if p.shared is not None else 0)
            bar = _progress(len(schemes) * n_exp * 3, f"layer {i}/{cfg.num_layers - 1}",
                            progress)
            sq = _model_out_norm(cfg, model, i, p, xn, h, final_ref, schemes, quantize, per,
                                 config.method, chunk, bar, rotation)
            hidden = _fp_layer(cfg, layer, hidden, per, rotation)
        if bar is not None:
            bar.close()
        for si, s in enumerate(schemes):
            losses[s.name][str(i)] = _to_json_losses(sq[si], _supported(p, s, cfg.num_experts))
        done.append(i)
        if partial is not None:
            write_json_atomic(partial, {"format": FORMAT, "meta": meta, "losses": losses,
                                        "done_layers": done})
        if progress:
            took = time.perf_counter() - start
            times.append(took)
            left = sum(1 for j in wanted if j not in done)
            print(f"layer {i}: {took:.1f} s; {left} layer(s) left, about "
                  f"{left * sum(times) / len(times):.0f} s")
    ordered = {s.name: {str(i): losses[s.name][str(i)] for i in wanted} for s in schemes}
    return {"format": FORMAT, "meta": meta, "losses": ordered}


def _attention(layer, hidden: np.ndarray, per: int) -> tuple[np.ndarray, np.ndarray]:
    hs, xs = [], []
    for sl in walk.iter_batches(hidden.shape[0], per):
        h, xn = walk.attention_part(layer, jnp.asarray(hidden[sl]))
        hs.append(walk.to_host(h))
        xs.append(walk.to_host(xn))
    return np.concatenate(hs), np.concatenate(xs)


def _fp_layer(cfg, layer, hidden: np.ndarray, per: int, rotation: Rotation | None = None
              ) -> np.ndarray:
    p = walk.moe_params(layer, rotation) if layer.is_moe else None
    return np.concatenate([
        walk.to_host(walk.layer_forward(cfg, layer, jnp.asarray(hidden[sl]), p, rotation))
        for sl in walk.iter_batches(hidden.shape[0], per)])


def write_losses(result: dict, out: str | os.PathLike) -> Path:
    """Write ``loss.json`` atomically."""
    return write_json_atomic(out, result)


def load_losses(path: str | os.PathLike) -> dict:
    """Read a ``loss.json`` and check its format tag."""
    return read_json(path, "loss.json", FORMAT)


def rotate_for_calibration(model, seed: int) -> tuple[object, Rotation]:
    """``(rotated model, Rotation)``: the rotation ``eval --hadamard`` applies
    (``rotate_params(..., online_down=True)``, same seed: same signs). Pass the Rotation to
    `calibrate`, which applies its online down_proj part; the model's own forward cannot."""
    from mxmoe_jax.models import from_flat_params, to_flat_params
    from mxmoe_jax.quant.rotation import rotate_params

    cfg, flat, rot = rotate_params(model.cfg, to_flat_params(model), seed=seed, online_down=True)
    return from_flat_params(cfg, flat, dtype=model.dtype), rot


def partial_path_for(out: str | os.PathLike) -> Path:
    """Where an interrupted run keeps its finished layers: ``<out>.partial.json``."""
    out = Path(out)
    return out.with_name(out.name + ".partial.json")


def calibrate_files(model_dir: str | os.PathLike, text: Sequence[str | os.PathLike],
                    config: CalibConfig, *, out: str | os.PathLike, seqlen: int = 4096,
                    nsamples: int = 128, sampling: str = "sample", seed: int = 42,
                    tokenizer_dir: str | os.PathLike | None = None,
                    progress: bool = False) -> dict:
    """Load a MODEL_DIR (fp32), cut ``text`` into windows, calibrate and write ``out``.

    Resumes from ``<out>.partial.json`` when a previous run with the same settings left one; the
    partial file is removed once ``out`` is written.
    """
    from mxmoe_jax.calib.data import token_windows, tokenize_texts
    from mxmoe_jax.eval.perplexity import load_tokenizer
    from mxmoe_jax.models.io import load_model_dir

    tokenizer = load_tokenizer(tokenizer_dir or model_dir)
    ids = token_windows(tokenize_texts(tokenizer, text), seqlen=seqlen, nsamples=nsamples,
                        sampling=sampling, seed=seed)
    _, model = load_model_dir(model_dir, dtype=jnp.float32)
    rotation = None
    if config.hadamard:
        model, rotation = rotate_for_calibration(model, seed)
    meta = {"model": str(model_dir), "text": [str(t) for t in text], "seed": seed,
            "sampling": sampling}
    partial = partial_path_for(out)
    result = calibrate(model, ids, config, meta=meta, partial_path=partial, progress=progress,
                       rotation=rotation)
    write_losses(result, out)
    partial.unlink(missing_ok=True)
    return result
