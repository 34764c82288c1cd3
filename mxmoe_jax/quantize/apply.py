"""Quantized SwiGLU stacks: an ``Allocation`` applied to a model's expert weights.

Each SwiGLU stack (a MoE layer's routed experts, its shared expert, a dense MLP) with at least one
allocated block becomes a ``models.moe.QuantizedExperts`` whose ``ExpertWeights`` group the
experts by scheme per projection: ``gate_up`` (gate and up share a scheme; quantized fused as
``[n, D, 2I]``, which equals quantizing them apart: every scale and GPTQ update is per output
channel) and ``down``. Quantized groups hold ``PackedWeight`` (the kernels' layout, and the bytes
on disk); w16a16 groups hold the weights rounded to bf16 (the unquantized baseline of MxMoE), stored
in the model dtype; blocks the allocation leaves out keep their FP values. Only expert blocks are
quantized (attention, router, shared gate, embeddings and head stay), as in the original.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from mxmoe_jax.alloc.qconfig import Allocation
from mxmoe_jax.models import from_flat_params, swiglu_stacks, to_flat_params
from mxmoe_jax.models.moe import (
    ExpertWeights,
    QuantizedExperts,
    RotationSigns,
    SchemeGroup,
    signs_of,
)
from mxmoe_jax.quant.packing import pack
from mxmoe_jax.quant.qtensor import QuantizedWeight
from mxmoe_jax.quant.rtn import quantize_rtn
from mxmoe_jax.quant.scheme import W16A16, QScheme

PROJS = ("gate_up", "down")

# (layer, MxMoE expert index, projection) -> QuantizedWeight of that expert's projection
# (gate_up: [D, 2I] fused, down: [I, D])
Quantized = dict[tuple[int, int, str], QuantizedWeight]


def stack_index(mxmoe_expert: int | None, stack_expert: int) -> int:
    """MxMoE's expert index of expert ``stack_expert`` of a stack (None: routed experts)."""
    return stack_expert if mxmoe_expert is None else mxmoe_expert


def fp_projection(weights: ExpertWeights, proj: str) -> jax.Array:
    """The FP weights of a dense ``ExpertWeights`` projection, ``[E, K, N]`` f32 (gate_up fused)."""
    (group,) = getattr(weights, proj)
    w = group.w
    if isinstance(w, tuple):
        w = jnp.concatenate(w, axis=-1)
    return jnp.asarray(w, jnp.float32)


def allocated_stacks(model, allocation: Allocation):
    """``(layer, mxmoe index, stack, {stack expert: {proj: scheme}})`` of every stack with an
    allocated block (gate's scheme stands for gate_up)."""
    alloc = allocation.as_dict()
    for layer, idx, stack in swiglu_stacks(model):
        n = stack.weights().num_experts
        plan = {}
        for j in range(n):
            e = stack_index(idx, j)
            gu, dn = alloc.get((layer, e, "gate")), alloc.get((layer, e, "down"))
            if gu is not None or dn is not None:
                plan[j] = {"gate_up": gu, "down": dn}
        if plan:
            yield layer, idx, stack, plan


def rtn_weights(model, allocation: Allocation) -> Quantized:
    """RTN codes of every allocated block (w16a16 blocks have none: they are bf16-rounded)."""
    out: Quantized = {}
    for layer, idx, stack, plan in allocated_stacks(model, allocation):
        w = stack.weights()
        for proj in PROJS:
            by_scheme: dict[QScheme, list[int]] = {}
            for j, p in plan.items():
                if p[proj] is not None and p[proj].w_bits != 16:
                    by_scheme.setdefault(p[proj], []).append(j)
            if not by_scheme:
                continue
            full = fp_projection(w, proj)
            for s, experts in by_scheme.items():
                # all experts at once (one compilation per scheme and shape), then the chosen
                qw = split_experts(quantize_rtn(full, s), list(range(w.num_experts)))
                out.update({(layer, stack_index(idx, j), proj): qw[j] for j in experts})
    return out


def split_experts(qw: QuantizedWeight, keys: list) -> Quantized:
    """A stack of ``len(keys)`` experts' codes as one host ``QuantizedWeight`` per key."""
    qw = jax.tree.map(np.asarray, qw)
    return {key: jax.tree.map(lambda a, i=i: a[i], qw) for i, key in enumerate(keys)}


_pack_one = jax.jit(pack)  # one expert [K, N]: one compilation per scheme and shape


def _pack(parts: list[QuantizedWeight]):
    """The experts' codes packed one by one and stacked ``[n, ...]`` (on the host)."""
    packed = [jax.tree.map(np.asarray, _pack_one(p)) for p in parts]
    return jax.tree.map(lambda *a: jnp.asarray(np.stack(a)), *packed)


def quantized_stack(weights: ExpertWeights, layer: int, idx: int | None, plan: dict,
                    quantized: Quantized, dtype) -> ExpertWeights:
    """One stack's ``ExpertWeights`` grouped by scheme (module docstring)."""
    n = weights.num_experts
    groups = {}
    for proj in PROJS:
        full = fp_projection(weights, proj)  # [E, K, N] f32
        by_scheme: dict[QScheme | None, list[int]] = {}
        for j in range(n):
            by_scheme.setdefault(plan.get(j, {}).get(proj), []).append(j)
        out = []
        for s, experts in sorted(by_scheme.items(), key=lambda kv: (kv[0] is not None,
                                                                   str(kv[0]))):
            sel = full[np.asarray(experts)]
            if s is None:  # not allocated: FP values as they are
                group = SchemeGroup(w=sel.astype(dtype), experts=tuple(experts), scheme=W16A16)
            elif s.w_bits == 16:  # w16a16: bf16 weights
                group = SchemeGroup(w=sel.astype(jnp.bfloat16).astype(dtype),
                                    experts=tuple(experts), scheme=W16A16)
            else:
                parts = []
                for j in experts:
                    key = (layer, stack_index(idx, j), proj)
                    if key not in quantized:
                        raise ValueError(f"quantized: no codes for layer {layer} expert "
                                         f"{key[1]} {proj} ({s.name})")
                    qw = quantized[key]
                    if qw.scheme != s:
                        raise ValueError(f"quantized[{key}]: scheme {qw.scheme.name} but the "
                                         f"allocation says {s.name}")
                    parts.append(qw)
                group = SchemeGroup(w=_pack(parts), experts=tuple(experts), scheme=s)
            out.append(group)
        groups[proj] = tuple(out)
    return ExpertWeights(gate_up=groups["gate_up"], down=groups["down"], num_experts=n)


def quantize_model(model, allocation: Allocation, quantized: Quantized | None = None):
    """A copy of ``model`` whose allocated stacks are quantized (RTN unless ``quantized`` gives
    the codes, e.g. from GPTQ). The copy shares nothing mutable with ``model``."""
    quantized = rtn_weights(model, allocation) if quantized is None else quantized
    out = copy_model(model)
    for layer, idx, stack, plan in list(allocated_stacks(out, allocation)):
        ew = quantized_stack(stack.weights(), layer, idx, plan, quantized, out.dtype)
        replace_stack(out, layer, idx, QuantizedExperts(ew, dtype=out.dtype,
                                                        down_signs=signs_of(stack)))
    return out


def copy_model(model):
    """An independent copy of an FP ``MoECausalLM`` (params copied, rotation signs kept)."""
    out = from_flat_params(model.cfg, to_flat_params(model), dtype=model.dtype)
    for (_, _, src), (_, _, dst) in zip(swiglu_stacks(model), swiglu_stacks(out), strict=True):
        signs = signs_of(src)
        dst.down_signs = None if signs is None else RotationSigns(jnp.asarray(signs))
    return out


def replace_stack(model, layer: int, idx: int | None, new) -> None:
    """Put ``new`` where stack ``(layer, idx)`` is (routed experts, shared expert or dense MLP)."""
    mlp = model.layers[layer].mlp
    if not model.layers[layer].is_moe:
        model.layers[layer].mlp = new
    elif idx is None:
        mlp.experts = new
    else:
        mlp.shared = new
