"""Expert parallelism: one MoE layer's routed experts sharded over a mesh axis (``shard_map``).

The devices of a one-axis ``jax.sharding.Mesh`` (axis ``"expert"`` by default) each hold a slice
of the tokens and the routed experts of their ``Placement`` (contiguous by default). Per device,
in one ``shard_map`` body, with JAX's own collectives only:

1. route its tokens (``models.moe.route``, router weights replicated);
2. sort its (token, slot) pairs by destination device (``models.moe.dispatch`` with the device of
   each pair's expert as the "expert") into a capacity-padded send buffer ``[N, C, D]``;
3. ``lax.all_to_all``: row block ``j`` goes to device ``j``, which receives ``[N, C, D]`` (block
   ``i`` from device ``i``) and the local slot of each row;
4. run its local experts on the received rows with the one per-device forward
   (``models.moe.dispatch`` by local slot, then ``models.moe.swiglu`` in the sorted layout:
   ``ops.grouped_matmul`` / the one-launch mixed kernel over its scheme groups);
5. ``lax.all_to_all`` the f32 outputs back and ``models.moe.combine`` them with the routing
   weights, exactly as the single-device forward combines its sorted rows;
6. the shared expert (if any) runs data-parallel on the device's tokens (weights replicated).

The same numbers as ``models.moe.moe_forward`` in the sorted layout: every row meets the same
weights through the same row-wise grouped matmul, and the k outputs of a token are summed in the
same order. Capacity ``C`` (rows per source-destination pair) is dropless by default: a device
receives at most ``tokens_per_device * min(k, experts on it)`` rows from one source. A smaller
``capacity`` drops the pairs past it (their contribution is zero), the usual capacity-factor
trade; the outputs then differ from the single-device forward.

**Local experts grouped by scheme.** ``shard_map`` traces one body for every device, so the
static ``SchemeGroup.experts`` of the local ``ExpertWeights`` must be the same on all devices,
while a mixed allocation gives each device its own mix of schemes. The local experts therefore
live in *slots*: experts of one *kind* (their gate_up and down scheme groups) get the same run of
slots on every device, as many as the device with the most experts of that kind needs. A device
with fewer fills the rest with a copy of another expert of the group (never routed to: its group
size is 0). A placement whose devices hold the same number of experts of each kind (any
placement of a uniform allocation) has no filler slots, ``Placement.by_kind`` keeps them below
``N - 1`` per kind; ``ShardedExperts.filler_slots`` counts them (memory held, no compute).

Limits: no hooks (capture, activation fake-quant): the padded calibration layout has its own
sharded path (`sharded_chunk_losses`). Not timed on several GPUs (no such machine was lent).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from mxmoe_jax.models.layers import matmul_precision
from mxmoe_jax.models.moe import (
    ExpertWeights,
    MoEBlock,
    RotationSigns,
    SchemeGroup,
    SortedRows,
    combine,
    dense_swiglu,
    dispatch,
    route,
    signs_of,
    swiglu,
)

AXIS = "expert"


def expert_mesh(num_devices: int, *, axis: str = AXIS, devices: Sequence | None = None) -> Mesh:
    """A one-axis mesh of the first ``num_devices`` devices (or of ``devices``)."""
    devices = list(jax.devices() if devices is None else devices)
    if not 1 <= num_devices <= len(devices):
        raise ValueError(f"num_devices: {num_devices} is not between 1 and the {len(devices)} "
                         "devices present (on the CPU set XLA_FLAGS="
                         "--xla_force_host_platform_device_count=N before JAX starts)")
    return Mesh(np.asarray(devices[:num_devices]), (axis,))


@dataclass(frozen=True, slots=True, kw_only=True)
class Placement:
    """Which device holds each routed expert."""

    device_of: tuple[int, ...]  # [E] device index of each expert
    num_devices: int  # devices on the mesh axis (every one holds at least one expert)

    def __post_init__(self):
        if self.num_devices < 1:
            raise ValueError(f"num_devices: {self.num_devices} must be positive")
        bad = [d for d in self.device_of if not 0 <= d < self.num_devices]
        if bad:
            raise ValueError(f"device_of: devices {sorted(set(bad))} are not in "
                             f"range({self.num_devices})")
        empty = sorted(set(range(self.num_devices)) - set(self.device_of))
        if empty:
            raise ValueError(f"device_of: devices {empty} hold no expert")

    @classmethod
    def contiguous(cls, num_experts: int, num_devices: int) -> Placement:
        """Experts ``[p*E/N, (p+1)*E/N)`` on device ``p`` (``E`` a multiple of ``N``)."""
        if num_devices < 1 or num_experts % num_devices:
            raise ValueError(f"num_devices: {num_devices} does not divide the {num_experts} "
                             "experts (a contiguous placement holds E/N experts per device)")
        per = num_experts // num_devices
        return cls(device_of=tuple(e // per for e in range(num_experts)), num_devices=num_devices)

    @classmethod
    def by_kind(cls, weights: ExpertWeights, num_devices: int) -> Placement:
        """Experts dealt round-robin over the devices in order of their (gate_up, down) scheme
        groups: every device gets ``E/N`` experts (``E`` a multiple of ``N``) and each scheme
        pair evenly (at most one apart), which keeps `shard_experts`' filler slots below
        ``N - 1`` per scheme pair. Not contiguous: ``SolveConfig.devices`` assumes contiguous."""
        e = weights.num_experts
        if num_devices < 1 or e % num_devices:
            raise ValueError(f"num_devices: {num_devices} does not divide the {e} experts")
        gu, dn = _group_of(weights.gate_up, e), _group_of(weights.down, e)
        order = sorted(range(e), key=lambda x: (gu[x], dn[x], x))
        device_of = [0] * e
        for i, x in enumerate(order):
            device_of[x] = i % num_devices
        return cls(device_of=tuple(device_of), num_devices=num_devices)

    @property
    def num_experts(self) -> int:
        return len(self.device_of)

    def experts_on(self, device: int) -> tuple[int, ...]:
        return tuple(e for e, d in enumerate(self.device_of) if d == device)


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class ShardedExperts:
    """A layer's routed ``ExpertWeights`` laid out in per-device slots (module docstring).

    Invariants: ``weights`` is an ``ExpertWeights`` of ``num_slots`` experts per device whose
    every leaf stacks the devices' slots ``[N * num_slots_of_group, ...]`` (device-major), so that
    sharding leaf axis 0 over the mesh axis leaves each device the ``ExpertWeights`` of its own
    slots (static expert indices: the slots, the same on every device). ``dest[e]`` and
    ``slot[e]`` are the device and the local slot of expert ``e``; ``filler_slots`` counts the
    slots (over all devices) that hold a copy and are never routed to.
    """

    weights: ExpertWeights
    dest: tuple[int, ...] = dataclasses.field(metadata=dict(static=True))  # [E]
    slot: tuple[int, ...] = dataclasses.field(metadata=dict(static=True))  # [E]
    num_devices: int = dataclasses.field(metadata=dict(static=True))
    max_local: int = dataclasses.field(metadata=dict(static=True))  # most real experts/device
    filler_slots: int = dataclasses.field(metadata=dict(static=True))

    @property
    def num_slots(self) -> int:
        return self.weights.num_experts


def _group_of(groups: tuple[SchemeGroup, ...], num_experts: int) -> list[int]:
    out = [-1] * num_experts
    for i, g in enumerate(groups):
        for e in g.experts:
            out[e] = i
    if min(out) < 0:
        raise ValueError("weights: the scheme groups do not cover every expert")
    return out


def shard_experts(weights: ExpertWeights, placement: Placement) -> ShardedExperts:
    """Lay ``weights`` (``E`` routed experts grouped by scheme) out in per-device slots.

    The result's leaves are NumPy arrays on the host; `ExpertParallelMoE` puts them on the mesh
    (each device receives only its slice).
    """
    e, n_dev = weights.num_experts, placement.num_devices
    if placement.num_experts != e:
        raise ValueError(f"placement: it places {placement.num_experts} experts, the layer has {e}")
    gu_of = _group_of(weights.gate_up, e)
    dn_of = _group_of(weights.down, e)
    kinds = sorted({(gu_of[x], dn_of[x]) for x in range(e)})
    on = [placement.experts_on(p) for p in range(n_dev)]
    # per kind: as many slots as the device with most experts of that kind needs
    count = {k: max(sum((gu_of[x], dn_of[x]) == k for x in on[p]) for p in range(n_dev))
             for k in kinds}
    start, off = {}, 0
    for k in kinds:
        start[k], off = off, off + count[k]
    num_slots = off
    occupant = np.full((n_dev, num_slots), -1)  # [N, slots] expert in each slot, -1 filler
    slot = [0] * e
    for p in range(n_dev):
        used = dict.fromkeys(kinds, 0)
        for x in on[p]:  # ascending
            k = (gu_of[x], dn_of[x])
            slot[x] = start[k] + used[k]
            occupant[p, slot[x]] = x
            used[k] += 1

    def project(groups, kind_index):
        out = []
        for i, g in enumerate(groups):
            slots = [s for k in kinds if k[kind_index] == i
                     for s in range(start[k], start[k] + count[k])]
            pos = {x: j for j, x in enumerate(g.experts)}
            take = [pos[occupant[p, s]] if occupant[p, s] >= 0 else 0
                    for p in range(n_dev) for s in slots]  # filler: the group's first expert
            idx = np.asarray(take, np.int32)
            # gathered on the host: device_put then sends each device only its own slots
            out.append(SchemeGroup(w=jax.tree.map(lambda a, idx=idx: np.asarray(a)[idx], g.w),
                                   experts=tuple(slots), scheme=g.scheme))
        return tuple(out)

    local = ExpertWeights(gate_up=project(weights.gate_up, 0), down=project(weights.down, 1),
                          num_experts=num_slots)
    return ShardedExperts(weights=local, dest=tuple(placement.device_of), slot=tuple(slot),
                          num_devices=n_dev, max_local=max(len(o) for o in on),
                          filler_slots=int(np.sum(occupant < 0)))


def _is_routed_weight(path, value) -> bool:
    """The routed experts' weight variables (not their rotation signs)."""
    return (path[:1] == ("experts",) and isinstance(value, nnx.Variable)
            and not isinstance(value, RotationSigns))


def split_block(block: MoEBlock):
    """``(graphdef, placeholder for the routed weights, the rest of the state)``: the routed
    weights travel sharded (`ShardedExperts`), so the replicated state must not carry them."""
    graphdef, routed, rest = nnx.split(block, _is_routed_weight, ...)
    placeholder = jax.tree.map(lambda a: np.zeros((), a.dtype), routed)
    return graphdef, placeholder, rest


def _local_experts(sharded: ShardedExperts, block: MoEBlock, x_td: jax.Array, *, axis: str,
                   capacity: int | None, impl: str | None) -> jax.Array:
    """The routed experts' combined output ``[t, D]`` f32 of this device's tokens (steps 1-5)."""
    cfg = block.cfg
    n, dtype = sharded.num_devices, block.dtype
    idx, weight = route(block.router_logits(x_td), cfg)  # [t, k]
    x_td = x_td.astype(dtype)
    t, k = idx.shape
    dest = jnp.asarray(sharded.dest, jnp.int32)[idx]  # [t, k] device of each pair
    slot = jnp.asarray(sharded.slot, jnp.int32)[idx]  # [t, k] its slot there
    cap = t * min(k, sharded.max_local) if capacity is None else capacity
    d = dispatch(x_td, dest, n)  # pairs sorted by destination device
    dest_sorted = dest.reshape(-1)[d.order]  # [t*k]
    pos = jnp.arange(t * k, dtype=jnp.int32) - (jnp.cumsum(d.group_sizes) - d.group_sizes)[
        dest_sorted]  # row of each pair within its destination's block
    at = (dest_sorted, pos)
    num_slots = sharded.num_slots
    send_x = jnp.zeros((n, cap, x_td.shape[-1]), dtype).at[at].set(d.x_sorted, mode="drop")
    send_slot = jnp.full((n, cap), num_slots, jnp.int32).at[at].set(
        slot.reshape(-1)[d.order], mode="drop")  # empty rows: slot num_slots (none)
    recv_x = jax.lax.all_to_all(send_x, axis, 0, 0)  # [N, C, D], block i from device i
    recv_slot = jax.lax.all_to_all(send_slot, axis, 0, 0)  # [N, C]
    m = n * cap
    # the received rows through this device's experts, the per-device forward as it is
    dl = dispatch(recv_x.reshape(m, -1), recv_slot.reshape(m, 1), num_slots + 1)
    rows = SortedRows(dl.group_sizes[:num_slots], m, precision=matmul_precision(dtype),
                      impl=impl)
    y = swiglu(dl.x_sorted, sharded.weights, rows, down_signs=signs_of(block.experts),
               dtype=dtype)  # [m, D] f32; rows of no slot (sorted last) come out 0
    y_recv = combine(y, dl, jnp.ones((m, 1), jnp.float32))  # [m, D] in received order
    back = jax.lax.all_to_all(y_recv.reshape(n, cap, -1), axis, 0, 0)  # [N, C, D]
    kept = (pos < cap)[:, None]
    y_pairs = jnp.where(kept, back[dest_sorted, jnp.minimum(pos, cap - 1)], 0.0)  # [t*k, D]
    return combine(y_pairs, d, weight)


def _shared(block: MoEBlock, x_td: jax.Array, impl: str | None,
            shared: ExpertWeights | None) -> jax.Array:
    """The gated shared expert's output ``[t, D]`` f32 on this device's tokens (zeros: none);
    ``shared`` replaces its weights."""
    cfg = block.cfg
    if cfg.shared_intermediate_size <= 0:
        return jnp.zeros(x_td.shape, jnp.float32)
    x_td = x_td.astype(block.dtype)
    ys = dense_swiglu(block.shared, x_td, dtype=block.dtype, expert_index=cfg.num_experts,
                      impl=impl, weights=shared)
    return block.shared_weight(x_td)[:, None] * ys.astype(jnp.float32)


@functools.lru_cache(maxsize=64)
def _compiled(graphdef, mesh: Mesh, axis: str, capacity: int | None, impl: str | None):
    """The jitted ``shard_map`` of one block structure (cached: blocks of one structure, e.g.
    the same layer with other router weights, share one compilation per input shape)."""

    def body(x_td, state, experts):
        placeholder, rest, shared = state
        blk = nnx.merge(graphdef, placeholder, rest)
        y = _local_experts(experts, blk, x_td, axis=axis, capacity=capacity, impl=impl)
        return y + _shared(blk, x_td, impl, shared)

    # check_vma=False: the Pallas kernels' pallas_call out_shapes carry no varying-axes type
    # (shard_map refuses them otherwise); every output here is per device (out_specs P(axis))
    return jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P(axis), P(), P(axis)),
                                 out_specs=P(axis), check_vma=False))


class ExpertParallelMoE:
    """One MoE block run expert-parallel on ``mesh`` (module docstring).

    ``ExpertParallelMoE(block, mesh)(x [T, D]) -> [T, D]`` f32, sharded over the tokens: the
    numbers of ``moe_forward(block, x, routed=, shared=)`` (sorted layout): ``routed`` /
    ``shared`` replace the block's expert weights (e.g. quantized stacks); ``placement`` defaults
    to contiguous. The block's other
    weights (router, shared expert and gate) are replicated; the routed weights are sharded and
    passed as arguments, never compiled in as constants.
    """

    def __init__(self, block: MoEBlock, mesh: Mesh, *, axis: str = AXIS,
                 placement: Placement | None = None, routed: ExpertWeights | None = None,
                 shared: ExpertWeights | None = None, capacity: int | None = None,
                 impl: str | None = None):
        if axis not in mesh.axis_names or len(mesh.axis_names) != 1:
            raise ValueError(f"mesh: expected a one-axis mesh named {axis!r}, got axes "
                             f"{mesh.axis_names}")
        if capacity is not None and capacity < 1:
            raise ValueError(f"capacity: {capacity} must be positive (None: dropless)")
        n = mesh.shape[axis]
        e = block.cfg.num_experts
        self.mesh, self.axis = mesh, axis
        self.placement = placement or Placement.contiguous(e, n)
        if self.placement.num_devices != n:
            raise ValueError(f"placement: it spans {self.placement.num_devices} devices, the "
                             f"mesh axis {n}")
        routed = block.experts.weights() if routed is None else routed
        sharded = shard_experts(routed, self.placement)
        graphdef, placeholder, rest = split_block(block)
        self.experts = jax.device_put(sharded, NamedSharding(mesh, P(axis)))
        self.state = jax.device_put((placeholder, rest, shared), NamedSharding(mesh, P()))
        self._fn = _compiled(graphdef, mesh, axis, capacity, impl)

    def __call__(self, x_td: jax.Array) -> jax.Array:
        t = x_td.shape[0]
        n = self.mesh.shape[self.axis]
        pad = -t % n  # tokens per device must be equal: pad with zero tokens, drop their rows
        if pad:
            x_td = jnp.concatenate([x_td, jnp.zeros((pad, x_td.shape[1]), x_td.dtype)])
        return self._fn(x_td, self.state, self.experts)[:t]



__all__ = ["AXIS", "ExpertParallelMoE", "Placement", "ShardedExperts", "expert_mesh",
           "shard_experts"]
