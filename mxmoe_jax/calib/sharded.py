"""Calibration's per-chunk Δ² of one MoE layer with the routed experts sharded over devices.

`ShardedChunkLosses` computes what ``calibrate._chunk_losses`` computes for a token chunk, Δ²
``[P, E(+1), 3]`` per scheme part, expert and block, and the MoE output ``[T, D]`` f32, with the
routed experts (their FP weights and every part's fake-quantized weights) split contiguously over
a one-axis mesh (``parallel.expert_mesh``), in one ``shard_map``:

* the chunk's tokens are replicated (calibration chunks are small next to the experts); every
  device routes them all (the block's router, replicated) and gathers into padded groups
  ``[E/N, C, D]`` only the rows routed to its own experts (``models.moe.pad_groups`` with the
  other devices' experts mapped to one extra group, which is dropped);
* it runs the one forward's SwiGLU in the padded layout on its experts, capturing the
  intermediates (``models.moe.swiglu`` with ``Hooks(capture=...)``), and computes their Δ²
  (``calib.loss.losses_sq``): each expert's Δ only involves the rows routed to it (``loss.py``),
  so no Δ needs another device's data; the devices' ``[P, E/N, 3]`` are concatenated;
* the shared expert runs data-parallel on the device's 1/N of the tokens; its Δ² is summed over
  the devices (``psum``);
* the MoE output is one ``psum`` of the devices' routed contributions and shared expert outputs
  (each on its own tokens' rows).

The same numbers as the single-device pass up to the order of f32 sums (the MoE output's
per-token sum over experts and the shared expert's Δ² over token slices are added in another
order). GPTQ's Hessians are not sharded (``calibrate`` accumulates them on one device).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from mxmoe_jax.calib.loss import MLPWeights, losses_sq
from mxmoe_jax.models.moe import (
    Groups,
    Hooks,
    PaddedRows,
    combine_groups,
    dense_swiglu,
    pad_groups,
    route,
    signs_of,
    swiglu,
)
from mxmoe_jax.parallel import AXIS, split_block


def _local_groups(groups: Groups, n: int) -> Groups:
    """The first ``n`` groups (this device's experts) of a `Groups`."""
    return Groups(x=groups.x[:n], weight=groups.weight[:n], token=groups.token[:n],
                  valid=groups.valid[:n])


@functools.lru_cache(maxsize=64)
def _compiled(graphdef, mesh: Mesh, axis: str, capacity: int):
    n = mesh.shape[axis]

    def body(x_td, mask, state, routed_fp, routed_q, shared_q):
        placeholder, rest = state
        blk = nnx.merge(graphdef, placeholder, rest)
        cfg = blk.cfg
        t = x_td.shape[0]
        per = cfg.num_experts // n
        me = jax.lax.axis_index(axis)
        idx, weight = route(blk.router_logits(x_td), cfg)  # [T, k], every token
        local = idx - me * per
        local = jnp.where((local >= 0) & (local < per), local, per)  # other devices': group per
        groups = _local_groups(pad_groups(x_td, local, weight, per + 1, capacity), per)
        cap: dict = {}
        y = swiglu(groups.x, routed_fp.expert_weights(), PaddedRows(per, capacity),
                   down_signs=signs_of(blk.experts), hooks=Hooks(capture=cap),
                   dtype=jnp.float32)  # [E/N, C, D]
        row_w = groups.weight * mask[groups.token]
        sq_routed = losses_sq(cap["routed"], row_w, routed_fp.down, routed_q,
                              down_signs=signs_of(blk.experts))  # [P, E/N, 3]
        out = combine_groups(groups, y, t)  # [T, D] this device's experts' part
        if cfg.shared_intermediate_size <= 0:
            return (sq_routed, jnp.zeros((len(routed_q), 0, 3), jnp.float32),
                    jax.lax.psum(out, axis))
        ts = t // n
        xs = jax.lax.dynamic_slice_in_dim(x_td, me * ts, ts)  # this device's tokens
        ms = jax.lax.dynamic_slice_in_dim(mask, me * ts, ts)
        cap = {}
        ys = dense_swiglu(blk.shared, xs, dtype=jnp.float32, hooks=Hooks(capture=cap),
                          capture_key="shared", expert_index=cfg.num_experts)
        sw = blk.shared_weight(xs)  # [T/N]
        part = {k: v[None] for k, v in cap["shared"].items()}  # a stack of one
        sq_shared = jax.lax.psum(
            losses_sq(part, (sw * ms)[None], MLPWeights.of(blk.shared).down, shared_q,
                      down_signs=signs_of(blk.shared)), axis)  # [P, 1, 3]
        # plus the shared expert's output on this device's tokens; the psum gathers them
        out = out + jax.lax.dynamic_update_slice_in_dim(jnp.zeros_like(out), sw[:, None] * ys,
                                                        me * ts, 0)
        return sq_routed, sq_shared, jax.lax.psum(out, axis)

    spec = P(axis)
    return jax.jit(jax.shard_map(body, mesh=mesh,
                                 in_specs=(P(), P(), P(), spec, spec, P()),
                                 out_specs=(P(None, axis), P(), P())))


class ShardedChunkLosses:
    """``ShardedChunkLosses(block, variants, mesh)(x [T, D], mask [T], capacity=C)`` ->
    ``(Δ² [P, E(+1), 3], MoE output [T, D] f32)``, as ``calibrate._chunk_losses(block, x, mask,
    variants, capacity=C)`` (module docstring). ``variants``: per stack (routed, then shared),
    one `QuantizedBlocks` per part. ``T`` a multiple of the device count, ``E`` too."""

    def __init__(self, block, variants, mesh: Mesh, *, axis: str = AXIS):
        n = mesh.shape[axis]
        e = block.cfg.num_experts
        if e % n:
            raise ValueError(f"mesh: {n} devices do not divide the {e} routed experts (sharded "
                             "calibration places E/N experts on each device)")
        routed_q = tuple(variants[0])
        shared_q = tuple(variants[1]) if len(variants) > 1 else ()
        self.mesh, self.axis, self.n = mesh, axis, n
        graphdef, placeholder, rest = split_block(block)
        expert_sharding = NamedSharding(mesh, P(axis))
        host = functools.partial(jax.tree.map, np.asarray)  # device_put sends each its slice
        self.routed = jax.device_put((host(MLPWeights.of(block.experts)), host(routed_q)),
                                     expert_sharding)
        self.replicated = jax.device_put(((placeholder, rest), shared_q),
                                         NamedSharding(mesh, P()))
        self.graphdef = graphdef

    def __call__(self, x_td: jax.Array, mask: jax.Array, *, capacity: int):
        if x_td.shape[0] % self.n:
            raise ValueError(f"x_td: {x_td.shape[0]} tokens are not a multiple of the {self.n} "
                             "devices (pad the chunk)")
        fn = _compiled(self.graphdef, self.mesh, self.axis, int(capacity))
        state, shared_q = self.replicated
        sq_routed, sq_shared, out = fn(x_td, mask, state, *self.routed, shared_q)
        return jnp.concatenate([sq_routed, sq_shared], axis=1), out


__all__ = ["ShardedChunkLosses"]
