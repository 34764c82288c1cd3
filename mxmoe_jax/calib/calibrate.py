"""``calibrate``: Δ per (layer, expert incl. shared, block, scheme) -> ``loss.json``.

The accuracy half of MxMoE's co-design (§4.1 of the paper, ``quant.py calib`` of the original):
how much does quantizing one linear block alone hurt? Two metrics, as the original:

* ``layer_out_norm`` (default): ``||Ô − O||_F`` of the decoder-layer output over every calibration
  token, on FP layer inputs (no error accumulation). Computed with the exact shortcut of
  ``loss.py``: all experts and blocks of a layer from one jitted pass per token chunk.
* ``model_out_norm``: the same for the final hidden state (after the final norm), by brute force:
  one pass from the layer to the top of the model per (layer, expert, block, scheme), i.e.
  ``L·(E+1)·3`` partial forwards per scheme. Only usable on tiny models.

Every pass over an MoE block is the model's one forward, ``models.moe.moe_forward`` in the padded
layout: the shortcut reads the SwiGLU intermediates it captures (``Hooks(capture=...)``), GPTQ's
Hessians are the captured gate/up and down inputs (``quant.gptq.hessian_update_padded``), and the
brute force hands it the weights with one block substituted and an ``act_quant`` hook that
fake-quantizes that block's input rows. The rest of a layer runs as the model's own modules
(``walk``).

Quantizers: ``rtn`` (``quant.rtn``) and ``gptq`` (Hessians from each expert's routed tokens, FP
inputs; ``quant.gptq``), optionally after the model is Hadamard-rotated exactly as ``eval
--hadamard`` rotates it (``quant.rotation.rotate_params(..., online_down=True)``: the residual
stream, and every down_proj input online, so the down blocks measured are the ones evaluated);
`rotate_for_calibration` sets the online part on the model (``models.set_rotation``).

Group sizes: each block is quantized with ``QScheme.for_k(K)`` of the scheme asked for, so a group
size that does not divide a block's K is measured with the substituted one (w4a16_g128_asym on a
down_proj with K = 192: w4a16_g96_asym), its Δ stored under the requested name; loss.json's meta
``group_size_substitutions`` lists every such (scheme, K), and each is noted once on stderr.

Memory: the hidden states of all calibration windows at the current layer (host), plus one token
chunk's activations on the device. ``CalibConfig(devices=N)``: each chunk's routed-expert Δ² is
computed with the experts sharded over N devices (``calib.sharded``; ``layer_out_norm`` only,
GPTQ's Hessians still on one device), the same Δ up to the order of f32 sums. Resumable: after
each MoE layer the finished losses are written atomically to ``<out>.partial.json``; a rerun with
the same settings continues after the last finished layer (earlier layers are only replayed in FP
to rebuild their outputs).
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
from flax import nnx

from mxmoe_jax.calib import walk
from mxmoe_jax.calib.loss import MLPWeights, QuantizedBlocks, act_quant, block_supported, losses_sq
from mxmoe_jax.calib.sharded import ShardedChunkLosses
from mxmoe_jax.config import BLOCKS, ModelConfig
from mxmoe_jax.jsonio import LOSS_FORMAT as FORMAT
from mxmoe_jax.jsonio import read_json, write_json_atomic
from mxmoe_jax.models.model import online_rotation_widths
from mxmoe_jax.models.moe import ExpertWeights, Hooks, moe_forward, signs_of
from mxmoe_jax.parallel import expert_mesh
from mxmoe_jax.quant.gptq import (
    gptq_quantize,
    hessian_finalize,
    hessian_init,
    hessian_update_padded,
)
from mxmoe_jax.quant.qtensor import dequantize
from mxmoe_jax.quant.rotation import Rotation
from mxmoe_jax.quant.rtn import fake_quant_weight
from mxmoe_jax.quant.scheme import QScheme, for_block
from mxmoe_jax.quantize.rotation import rotate_model

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
    devices: int = 1  # routed experts sharded over this many devices (calib.sharded)

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
        if self.devices < 1 or self.batch_tokens % self.devices:
            raise ValueError(f"devices: {self.devices} must be positive and divide batch_tokens "
                             f"({self.batch_tokens})")
        if self.devices > 1 and self.metric != "layer_out_norm":
            raise ValueError("devices: only the layer_out_norm metric runs sharded")


# ------------------------------------------------------------------------------ quantizers

# quantize(w [..., K, N], scheme, hessian [..., K, K] | None) -> fake-quantized f32 [..., K, N]
Quantizer = Callable[[jax.Array, QScheme, jax.Array | None], jax.Array]


def _rtn(w, scheme, hessian):
    return fake_quant_weight(w, scheme)


def _gptq(w, scheme, hessian):
    if scheme.w_bits == 16:  # bf16 rounding, nothing to solve
        return fake_quant_weight(w, scheme)
    return dequantize(gptq_quantize(w, hessian, scheme))


QUANTIZERS: dict[str, Quantizer] = {"rtn": _rtn, "gptq": _gptq}


def quantize_mlp(w: MLPWeights, scheme: QScheme, quantize: Quantizer,
                 hessians: MLPWeights | None = None, *,
                 blocks: Sequence[str] = BLOCKS) -> QuantizedBlocks:
    """The ``blocks`` of ``w`` (all experts at once) fake-quantized with ``scheme``; None for the
    other blocks and where the scheme's ``group_size`` does not divide the block's K (callers
    pass ``scheme.for_k(K)``: see `_scheme_parts`). ``hessians`` (GPTQ): per block, ``[E, K, K]``
    (gate and up share one, the input's)."""
    out = {}
    for b in BLOCKS:
        wb = w.block(b)
        if b not in blocks or not block_supported(scheme, wb.shape[-2]):
            out[b] = None
            continue
        hb = None if hessians is None else hessians.block(b)
        out[b] = jnp.asarray(quantize(wb, scheme, hb), jnp.float32)
    return QuantizedBlocks(**out, scheme=scheme)


# ------------------------------------------------------------------------------ one MoE layer

def _stacks(block) -> list:
    """The block's SwiGLU stacks in loss.json's expert order: routed experts, then the shared."""
    return [block.experts] + ([block.shared] if hasattr(block, "shared") else [])


def _parts(cap: dict, mask: jax.Array) -> list[tuple[dict, jax.Array, jax.Array]]:
    """Per stack (`_stacks` order) of a padded-layout capture: ``(part, row_w, counts)``.

    ``part``: the stack's captured ``x, g, u, h, y``, each ``[E, C, ·]`` (the shared expert: a
    stack of one, ``[1, T, ·]``); ``row_w [E, C]``: each row's weight in the layer output, 0 for
    padding slots and for the chunk's padding tokens (``mask [T]`` 0); ``counts [E]``: the real
    rows of each expert, which come first in its group (groups keep token order and the chunk's
    padding tokens are its last ones).
    """
    g = cap["groups"]
    real = mask[g.token] * g.valid  # [E, C] f32
    out = [(cap["routed"], g.weight * mask[g.token],
            jnp.sum(real, axis=1).astype(jnp.int32))]
    if "shared" in cap:
        part = {k: v[None] for k, v in cap["shared"].items()}
        out.append((part, (cap["shared_weight"] * mask)[None],
                    jnp.sum(mask).astype(jnp.int32)[None]))
    return out


def _capture(block, x_td: jax.Array, capacity: int, *, routed: ExpertWeights | None = None,
             shared: ExpertWeights | None = None, act=None) -> tuple[jax.Array, dict]:
    """The one MoE forward in the padded layout, its intermediates captured (``out [T, D]``
    f32, capture)."""
    cap: dict = {}
    out = moe_forward(block, x_td, layout="padded", capacity=capacity, routed=routed,
                      shared=shared, hooks=Hooks(act_quant=act, capture=cap))
    return out, cap


@functools.partial(nnx.jit, static_argnames="capacity")
def _chunk_losses(block, x_td, mask, variants, *, capacity: int):
    """One token chunk: (Δ² ``[S, E(+1), 3]``, MoE output ``[T, D]`` f32). ``mask [T]``: 1 for
    real tokens, 0 for the chunk's padding. ``variants``: per stack, one `QuantizedBlocks` per
    scheme."""
    out, cap = _capture(block, x_td, capacity)
    sq = [losses_sq(part, row_w, MLPWeights.of(stack).down, q, down_signs=signs_of(stack))
          for stack, (part, row_w, _), q in zip(_stacks(block), _parts(cap, mask), variants,
                                                strict=True)]
    return jnp.concatenate(sq, axis=1), out


@functools.partial(nnx.jit, static_argnames="capacity")
def _chunk_hessians(block, x_td, mask, states, *, capacity: int):
    """Add one token chunk's FP inputs to GPTQ's Hessian states: per stack, the gate_up input
    ``x`` and the down input ``h`` (rotated online, as down sees it) of each expert's real rows."""
    _, cap = _capture(block, x_td, capacity)
    return [(hessian_update_padded(s_in, part["x"], counts),
             hessian_update_padded(s_down, part["h"], counts))
            for (s_in, s_down), (part, _, counts) in zip(states, _parts(cap, mask), strict=True)]


@functools.partial(nnx.jit, static_argnames="capacity")
def _moe_one_block(block, x_td, expert, blk, variants, *, capacity: int):
    """The MoE output ``[T, D]`` f32 with only block ``blk`` (traced: 0 gate, 1 up, 2 down) of
    ``expert`` (traced; ``E``: the shared expert) quantized: the forward gets that block's
    weights substituted and, for a weight-activation scheme, its input rows fake-quantized (the
    hooks see each row's expert, the shared expert as ``E``). One compilation for every
    (expert, block). For the brute-force ``model_out_norm``."""
    e_routed = block.cfg.num_experts
    stacks = _stacks(block)
    scheme = variants[0].scheme
    weights = []
    for k, (stack, q) in enumerate(zip(stacks, variants, strict=True)):
        fp = MLPWeights.of(stack)
        ids = jnp.arange(fp.gate.shape[0]) + (0 if k == 0 else e_routed)  # [n] expert index
        blocks = []
        for i, b in enumerate(BLOCKS):
            wq = q.block(b)
            sel = ((ids == expert) & (blk == i))[:, None, None]
            blocks.append(fp.block(b) if wq is None else jnp.where(sel, wq, fp.block(b)))
        weights.append(ExpertWeights.dense(*blocks))
    act = None
    if not scheme.weight_only:
        ok = {b: [q.block(b) is not None for q in variants] for b in BLOCKS}  # [routed, shared]

        def act(rows, b, experts):
            if not block_supported(scheme, rows.shape[-1]):  # a stack whose block is in
                return rows  # another part (its K): never selected, and not quantizable here
            i = BLOCKS.index(b)
            supported = jnp.where(experts == e_routed, ok[b][-1], ok[b][0])
            sel = (experts == expert) & (blk == i) & supported
            return jnp.where(sel[..., None], act_quant(rows, scheme), rows)

    out, _ = _capture(block, x_td, capacity, routed=weights[0],
                      shared=weights[1] if len(weights) > 1 else None, act=act)
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


def _hessians(block, x_flat: np.ndarray, chunk: int, bar) -> list[MLPWeights]:
    """Per stack (`_stacks` order): mean x xᵀ per expert (GPTQ's H up to a factor it is
    invariant to; 0 for an unused expert) of the gate/up input and of the down input."""
    fps = [MLPWeights.of(s) for s in _stacks(block)]
    states = [(hessian_init(w.gate.shape[0], w.gate.shape[1]),
               hessian_init(w.down.shape[0], w.down.shape[1])) for w in fps]
    for sl in walk.iter_batches(x_flat.shape[0], chunk):
        xc, mask = _pad_rows(x_flat[sl], chunk)
        xc = jnp.asarray(xc)
        states = _chunk_hessians(block, xc, jnp.asarray(mask), states,
                                 capacity=walk.chunk_capacity(block, xc))
        if bar is not None:
            bar.update(1)
    out = []
    for s_in, s_down in states:
        h_in = hessian_finalize(s_in)
        out.append(MLPWeights(gate=h_in, up=h_in, down=hessian_finalize(s_down)))
    return out


# (index of the requested scheme, the scheme its blocks are quantized with, per stack the blocks)
Part = tuple[int, QScheme, tuple[frozenset[str], ...]]


def _scheme_parts(block, schemes: Sequence[QScheme]) -> list[Part]:
    """The layer's variants: per requested scheme, one part per scheme (``QScheme.for_k`` of each
    block's K) its blocks are quantized with, and which blocks of each stack that is.

    One part per scheme unless its group size does not divide some K: w4a16_g128_asym on gate/up
    K = 256 and down K = 192 has the parts w4a16_g128_asym (gate, up) and w4a16_g96_asym (down).
    They are separate `QuantizedBlocks` because one fake-quantizes the activations with one
    scheme; each block is in exactly one part, so a scheme's Δ² is the sum of its parts'.
    """
    fps = [MLPWeights.of(st) for st in _stacks(block)]
    parts: list[Part] = []
    for si, s in enumerate(schemes):
        used = [{b: s.for_k(w.block(b).shape[-2]) for b in BLOCKS} for w in fps]
        for u in dict.fromkeys(x for per in used for x in per.values()):
            parts.append((si, u, tuple(frozenset(b for b in BLOCKS if per[b] == u)
                                       for per in used)))
    return parts


def _quantize_layer(block, parts: Sequence[Part], quantize: Quantizer,
                    hess: list[MLPWeights] | None) -> list[tuple[QuantizedBlocks, ...]]:
    """Per stack (`_stacks` order), one `QuantizedBlocks` per part (`_scheme_parts`)."""
    fps = [MLPWeights.of(s) for s in _stacks(block)]
    return [tuple(quantize_mlp(w, u, quantize, None if hess is None else hess[k], blocks=bs[k])
                  for _, u, bs in parts) for k, w in enumerate(fps)]


def _merge_parts(sq_parts: np.ndarray, parts: Sequence[Part], n_schemes: int) -> np.ndarray:
    """Δ² ``[P, E(+1), 3]`` per part -> ``[S, E(+1), 3]`` per requested scheme (a block is
    zero in every part but its own)."""
    out = np.zeros((n_schemes, *sq_parts.shape[1:]), sq_parts.dtype)
    for p, (si, _, _) in enumerate(parts):
        out[si] += sq_parts[p]
    return out


def _supported(block, scheme: QScheme) -> list[list[bool]]:
    """[E(+1)][3]: which (expert, block) the scheme can quantize (as ``scheme.for_k(K)``)."""
    rows = []
    for stack in _stacks(block):
        w = MLPWeights.of(stack)
        ks = [w.block(b).shape[-2] for b in BLOCKS]
        rows += [[block_supported(scheme.for_k(k), k) for k in ks]] * w.gate.shape[0]
    return rows


def group_size_substitutions(cfg: ModelConfig, schemes: Sequence[QScheme]) -> list[dict]:
    """Every (scheme, K) of the calibrated expert blocks where ``QScheme.for_k`` changes the
    group size, as loss.json's meta ``group_size_substitutions`` records it: ``{"scheme":
    requested, "k": K, "blocks": [...], "used": substituted}``; each is noted on stderr
    (`for_block`, once per process)."""
    widths = {"gate_proj/up_proj": cfg.hidden_size, "down_proj": cfg.moe_intermediate_size}
    if cfg.shared_intermediate_size > 0:
        widths["shared down_proj"] = cfg.shared_intermediate_size
    by_k: dict[int, list[str]] = {}
    for name, k in widths.items():
        by_k.setdefault(int(k), []).append(name)
    out = []
    for s in schemes:
        for k, names in by_k.items():
            used = for_block(s, k, ", ".join(names))
            if used != s:
                out.append({"scheme": s.name, "k": k, "blocks": names, "used": used.name})
    return out


def _to_json_losses(sq: np.ndarray, supported: list[list[bool]]) -> dict[str, list]:
    """``[E(+1), 3]`` squared norms -> {"e": [Δ_gate, Δ_up, Δ_down]} (None: not quantizable)."""
    return {str(e): [math.sqrt(max(float(v), 0.0)) if ok else None
                     for v, ok in zip(sq[e], supported[e], strict=True)]
            for e in range(sq.shape[0])}


def _layer_out_norm(block, xn_flat, h_flat, schemes, quantize, chunk, method, bar, mesh=None):
    """Δ² ``[S, E(+1), 3]`` (f64) and the layer output ``[N, D]`` for one MoE layer.

    ``h_flat`` (the residual stream after attention) is overwritten with the layer output.
    ``mesh``: the routed experts' Δ² computed sharded over it (``calib.sharded``).
    """
    hess = _hessians(block, xn_flat, chunk, bar) if method == "gptq" else None
    parts = _scheme_parts(block, schemes)
    variants = _quantize_layer(block, parts, quantize, hess)
    if mesh is None:
        def chunk_losses(x_td, mask, *, capacity):
            return _chunk_losses(block, x_td, mask, variants, capacity=capacity)
    else:
        chunk_losses = ShardedChunkLosses(block, variants, mesh)
    total = None
    out = h_flat  # becomes the layer output in place: one host copy fewer
    for sl in walk.iter_batches(xn_flat.shape[0], chunk):
        xc, mask = _pad_rows(xn_flat[sl], chunk)
        xc = jnp.asarray(xc)
        sq, moe = chunk_losses(xc, jnp.asarray(mask), capacity=walk.chunk_capacity(block, xc))
        sq = np.asarray(sq, np.float64)
        total = sq if total is None else total + sq
        n = sl.stop - sl.start
        out[sl] += np.asarray(moe[:n], np.float32)
        if bar is not None:
            bar.update(1)
    return _merge_parts(total, parts, len(schemes)), out


def _model_out_norm(cfg, model, layer_idx, xn, h, final_ref, schemes, quantize, per, method,
                    chunk, bar):
    """Brute force: Δ² ``[S, E(+1), 3]`` of the final hidden state, one block at a time."""
    block = model.layers[layer_idx].mlp
    s_windows, t, d = xn.shape
    hess = _hessians(block, xn.reshape(-1, d), chunk, None) if method == "gptq" else None
    parts = _scheme_parts(block, schemes)
    variants = _quantize_layer(block, parts, quantize, hess)
    n_exp = cfg.num_experts + len(_stacks(block)) - 1
    later = model.layers[layer_idx + 1:]
    total = np.zeros((len(schemes), n_exp, 3), np.float64)
    for si, s in enumerate(schemes):
        sup = _supported(block, s)
        for e in range(n_exp):
            stack = 0 if e < cfg.num_experts else 1
            for b in range(3):
                if not sup[e][b]:
                    continue
                # the part that quantizes this block (others are FP in it): its weights and acts
                p = next(p for p, (pi, _, bs) in enumerate(parts)
                         if pi == si and BLOCKS[b] in bs[stack])
                vs = tuple(v[p] for v in variants)
                acc = 0.0
                for sl in walk.iter_batches(s_windows, per):
                    x_td = jnp.asarray(xn[sl].reshape(-1, d))
                    moe = _moe_one_block(block, x_td, e, b, vs,
                                         capacity=walk.chunk_capacity(block, x_td))
                    x = jnp.asarray(h[sl]) + moe.reshape(h[sl].shape).astype(h.dtype)
                    for lay in later:
                        x = walk.run_layer(lay, x)
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
              quantizer: Quantizer | None = None, rotation: Rotation | None = None,
              moe_inputs: dict | None = None) -> dict:
    """Run calibration on ``windows [S, T]``; returns the ``loss.json`` dict.

    ``rotation``: the ``Rotation`` that ``model`` was rotated with (`rotate_for_calibration`,
    which also sets it on the model: the model applies its online down_proj part itself); here
    it is only recorded in ``meta`` and checked against the model.

    ``meta`` is stored as given (the CLI fills model, text, seqlen, seed, ...); ``method``,
    ``metric``, ``hadamard``, ``schemes`` and ``num_tokens`` are set from ``config``/``windows``.
    With ``partial_path``, finished layers are kept there and a rerun resumes from it.
    ``quantizer`` overrides ``config.method``'s weight quantizer (tests, other algorithms).
    ``moe_inputs``: a dict that receives, for each layer measured, the MoE-block input Δ was
    measured on (``{layer: [S*T, D]`` host array``}``). A reference that recomputes that input
    in another program can differ from it in the last place on the GPU (GEMMs of other shapes
    round differently), which moves 4- or 8-bit activation codes at near-ties; checks of Δ
    against a brute force start from these inputs instead.
    """
    cfg: ModelConfig = model.cfg
    windows = np.asarray(windows, np.int32)
    if windows.ndim != 2:
        raise ValueError(f"windows: expected [S, T] token ids, got shape {windows.shape}")
    s_windows, t = windows.shape
    schemes = [QScheme.parse(s) for s in config.schemes]
    meta = dict(meta, model_fingerprint=cfg.fingerprint(), method=config.method,
                hadamard=config.hadamard, metric=config.metric,
                num_tokens=int(windows.size), seqlen=int(t), schemes=list(config.schemes))
    substituted = group_size_substitutions(cfg, schemes)
    if substituted:  # Δ of those blocks is the substituted scheme's, under the requested name
        meta["group_size_substitutions"] = substituted
    if config.hadamard and rotation is None:
        raise ValueError("rotation: config.hadamard is set but no rotation was given (rotate the "
                         "model with rotate_for_calibration and pass its Rotation)")
    if rotation is not None:  # resume only from a run with the same rotation
        have, want = online_rotation_widths(model), sorted(rotation.down)
        if have != want:
            raise ValueError(f"model: it rotates down_proj inputs of widths {have} online, the "
                             f"rotation those of {want}; call models.set_rotation(model, rotation) "
                             "(rotate_for_calibration does)")
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
    mesh = expert_mesh(config.devices) if config.devices > 1 else None

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
            x = _fp_layer(model.layers[i], x, per)
        final_ref = np.concatenate([walk.to_host(walk.final_hidden(model, jnp.asarray(x[sl])))
                                    for sl in walk.iter_batches(s_windows, per)])
    last = max(wanted)
    times: list[float] = []
    for i in range(last + 1):
        layer = model.layers[i]
        if i not in wanted or i in done:
            hidden = _fp_layer(layer, hidden, per) if i < last else hidden
            continue
        start = time.perf_counter()
        h, xn = _attention(layer, hidden, per)
        if moe_inputs is not None:
            moe_inputs[i] = xn.reshape(-1, xn.shape[-1])
        if config.metric == "layer_out_norm":
            hidden = None  # not needed again: frees one [S, T, D] copy while the layer runs
        block = layer.mlp
        d = h.shape[-1]
        n_chunks = -(-xn.shape[0] * t // chunk)
        if config.metric == "layer_out_norm":
            passes = n_chunks * (2 if config.method == "gptq" else 1)
            bar = _progress(passes, f"layer {i}/{cfg.num_layers - 1}", progress)
            sq, out = _layer_out_norm(block, xn.reshape(-1, d), h.reshape(-1, d), schemes,
                                      quantize, chunk, config.method, bar, mesh)
            hidden = out.reshape(h.shape)
        else:
            n_exp = cfg.num_experts + len(_stacks(block)) - 1
            bar = _progress(len(schemes) * n_exp * 3, f"layer {i}/{cfg.num_layers - 1}",
                            progress)
            sq = _model_out_norm(cfg, model, i, xn, h, final_ref, schemes, quantize, per,
                                 config.method, chunk, bar)
            hidden = _fp_layer(layer, hidden, per)
        if bar is not None:
            bar.close()
        for si, s in enumerate(schemes):
            losses[s.name][str(i)] = _to_json_losses(sq[si], _supported(block, s))
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


def _fp_layer(layer, hidden: np.ndarray, per: int) -> np.ndarray:
    return np.concatenate([walk.to_host(walk.run_layer(layer, jnp.asarray(hidden[sl])))
                           for sl in walk.iter_batches(hidden.shape[0], per)])


def write_losses(result: dict, out: str | os.PathLike) -> Path:
    """Write ``loss.json`` atomically."""
    return write_json_atomic(out, result)


def load_losses(path: str | os.PathLike) -> dict:
    """Read a ``loss.json`` and check its format tag."""
    return read_json(path, "loss.json", FORMAT)


def rotate_for_calibration(model, seed: int) -> tuple[object, Rotation]:
    """``(rotated model, Rotation)``: the rotation ``eval --hadamard`` applies
    (``rotate_params(..., online_down=True)``, same seed: same signs), with its online down_proj
    part set on the model (``models.set_rotation``), whose forward then applies it. Pass the
    Rotation to `calibrate` too: it is recorded in the loss.json meta."""
    return rotate_model(model, seed=seed, online_down=True)


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
    from mxmoe_jax.data import model_windows
    from mxmoe_jax.models.io import load_config, load_model_dir

    ids = model_windows(load_config(model_dir), tokenizer_dir or model_dir, text, seqlen=seqlen,
                        nsamples=nsamples, sampling=sampling, seed=seed)
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
