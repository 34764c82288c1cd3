"""GPTQ of a whole model's expert blocks under a ``QuantPlan`` (the integration half of ``gptq``).

As MxMoE's ``gptq.py`` [code]: layer by layer, every planned block of the layer gathers its Hessian
in one pass over the calibration tokens (each routed expert from the tokens routed to it, the
shared expert and dense MLPs from every token; down_proj from the full-precision SwiGLU output,
online-rotated when the model is), all blocks of the layer are quantized (one vmapped GPTQ call
per (block, scheme)), and the quantized layer (weights and activation fake-quant) produces the
next layer's input. Returns the ``QuantizedWeight`` of each planned block, for
``fakequant.fake_quantize_params(..., quantized=...)`` or for packing.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mxmoe_jax.quant.fakequant import BLOCKS, QuantPlan, _block_keys, _mlp, _moe, _online
from mxmoe_jax.quant.gptq import (
    GPTQConfig,
    gptq_quantize,
    hessian_finalize,
    hessian_init,
    hessian_update,
)
from mxmoe_jax.quant.qtensor import QuantizedWeight, dequantize


@nnx.jit
def _attn_part(layer, x, positions):
    h = layer.attention_residual(x, positions)
    return h, layer.post_attn_norm(h)


def _swiglu_hidden(x, w_gate, w_up):
    return jax.nn.silu(x @ w_gate) * (x @ w_up)


def gptq_model(model, calib_ids: np.ndarray, plan: QuantPlan, *, rotation=None,
               config: GPTQConfig | None = None, batch_windows: int = 8,
               progress: bool = False) -> dict[tuple[int, int, str], QuantizedWeight]:
    """GPTQ every block of ``plan`` in ``model`` (not modified) on ``calib_ids`` [n, seqlen].

    ``rotation``: the ``Rotation`` the model was rotated with (its online down_proj rotation is
    applied to the down inputs, as at inference).
    """
    from mxmoe_jax.models import from_flat_params, to_flat_params
    from mxmoe_jax.models.moe import dispatch, route
    from mxmoe_jax.ops import grouped_matmul

    cfg = model.cfg
    config = config or GPTQConfig()
    work = from_flat_params(cfg, to_flat_params(model), dtype=model.dtype)  # mutated below
    pl = plan.as_dict()
    ids = np.asarray(calib_ids, np.int32)
    positions = jnp.arange(ids.shape[1], dtype=jnp.int32)
    xs = [work.embed_tokens(jnp.asarray(ids[s:s + batch_windows]))
          for s in range(0, len(ids), batch_windows)]
    out: dict[tuple[int, int, str], QuantizedWeight] = {}
    layers = range(cfg.num_layers)
    if progress:
        from tqdm import tqdm

        layers = tqdm(layers, desc="gptq", unit="layer")
    for i in layers:
        layer = work.layers[i]
        parts = [_attn_part(layer, x, positions) for x in xs]  # [(h, y)]
        planned = {(e, b): s for (li, e, b), s in pl.items() if li == i}
        if planned:
            ys = [y.reshape(-1, cfg.hidden_size) for _, y in parts]
            if layer.is_moe:
                out.update(_gptq_moe_layer(cfg, layer.mlp, i, ys, planned, rotation, config,
                                           dispatch, route, grouped_matmul))
            else:
                out.update(_gptq_dense(layer.mlp, i, 0, ys, planned, rotation, config))
            _write_back(cfg, layer.mlp, i, out)
        if layer.is_moe:
            mlp_fn = nnx.jit(functools.partial(_moe, layer=i, plan=pl, rotation=rotation))
        else:
            mlp_fn = nnx.jit(functools.partial(
                _mlp, schemes={b: pl.get((i, 0, b)) for b in BLOCKS}, rotation=rotation))
        xs = [h + mlp_fn(layer.mlp, y) for h, y in parts]
    return out


def _hessian_all(rows_list, k):
    state = hessian_init(1, k)
    for r in rows_list:
        state = hessian_update(state, r, jnp.asarray([r.shape[0]], jnp.int32))
    return hessian_finalize(state)  # [1, K, K]


def _gptq_dense(mlp, layer_idx, expert, ys, planned, rotation, config):
    """A dense SwiGLU MLP (dense layer or shared expert) seen by every token."""
    w = {b: getattr(mlp, f"{b}_proj").kernel[...].astype(jnp.float32) for b in BLOCKS}
    h_in = _hessian_all(ys, w["gate"].shape[0])
    hid = [_online(_swiglu_hidden(y.astype(jnp.float32), w["gate"], w["up"]), rotation,
                   w["gate"].shape[1]) for y in ys]
    h_down = _hessian_all(hid, w["down"].shape[0])
    res = {}
    for b in BLOCKS:
        s = planned.get((expert, b))
        if s is None:
            continue
        qw = gptq_quantize(w[b][None], h_down if b == "down" else h_in, s, config)
        res[(layer_idx, expert, b)] = jax.tree.map(lambda a: a[0], qw)
    return res


def _gptq_moe_layer(cfg, block, layer_idx, ys, planned, rotation, config, dispatch, route,
                    grouped_matmul):
    e = cfg.num_experts
    w = {b: getattr(block.experts, b)[...].astype(jnp.float32) for b in BLOCKS}
    st_in = hessian_init(e, cfg.hidden_size)
    st_down = hessian_init(e, cfg.moe_intermediate_size)
    for y in ys:
        idx, _ = route(block.router_logits(y), cfg)
        d = dispatch(y.astype(jnp.float32), idx, e)
        st_in = hessian_update(st_in, d.x_sorted, d.group_sizes)
        g = grouped_matmul(d.x_sorted, w["gate"], d.group_sizes, out_dtype=jnp.float32)
        u = grouped_matmul(d.x_sorted, w["up"], d.group_sizes, out_dtype=jnp.float32)
        hid = _online(jax.nn.silu(g) * u, rotation, cfg.moe_intermediate_size)
        st_down = hessian_update(st_down, hid, d.group_sizes)
    h_in, h_down = hessian_finalize(st_in), hessian_finalize(st_down)
    res = {}
    for b in BLOCKS:
        by_scheme: dict = {}
        for (ex, bb), s in planned.items():
            if bb == b and ex < e:
                by_scheme.setdefault(s, []).append(ex)
        for s, experts in by_scheme.items():
            sel = jnp.asarray(sorted(experts))
            qw = gptq_quantize(w[b][sel], (h_down if b == "down" else h_in)[sel], s, config)
            for j, ex in enumerate(sorted(experts)):
                res[(layer_idx, ex, b)] = jax.tree.map(lambda a, j=j: a[j], qw)
    if cfg.shared_intermediate_size > 0 and any(ex == e for ex, _ in planned):
        res.update(_gptq_dense(block.shared, layer_idx, e, ys, planned, rotation, config))
    return res


def _write_back(cfg, mlp, layer_idx, quantized):
    """Put the dequantized weights of layer ``layer_idx`` into the working model."""
    for (li, ex, b), qw in quantized.items():
        if li != layer_idx:
            continue
        key, idx = _block_keys(cfg, li, ex)[b]
        parts = key.split("/")[3:]  # below layers/{i}/mlp
        obj = mlp
        for p in parts[:-1]:
            obj = getattr(obj, p)
        param = getattr(obj, parts[-1])
        deq = dequantize(qw).astype(param[...].dtype)
        param[...] = deq if idx is None else param[...].at[idx].set(deq)
