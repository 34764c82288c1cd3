"""The HF <-> flat-key name map: one table of rules, per-family names as table parameters.

Our parameters are named by flat keys (``layers/3/mlp/experts/gate``, see
``mxmoe_jax.models.param_shapes``); which keys exist for a config is the model's business. This
module only says, for each key, where it lives in a Hugging Face checkpoint and how the tensor is
transformed:

- ``COPY``: same array (norm scales, biases, embeddings).
- ``TRANSPOSE``: HF linear weight ``[out, in]`` -> our kernel ``[in, out]``.
- ``STACK_T``: per-expert HF weights ``experts.{e}.X.weight`` ``[out, in]``, e = 0..E-1 ->
  ``[E, in, out]`` (the hub layout every family's released checkpoints use).
- ``FUSED_GATE`` / ``FUSED_UP``: transformers 5's in-memory ``mlp.experts.gate_up_proj``
  ``[E, 2I, D]`` (gate rows first, then up) -> ``[E, D, I]``.
- ``FUSED_DOWN``: ``mlp.experts.down_proj`` ``[E, D, I]`` -> ``[E, I, D]``.

Export writes the hub layout (``COPY``/``TRANSPOSE``/``STACK_T`` inverted), never the fused one.
HF names are templates over ``{i}`` (layer), ``{e}`` (expert) and the family fields of
`FamilyNames` (``{moe}``, ``{w_gate}``, ...).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import numpy as np


class Transform(Enum):
    COPY = "copy"
    TRANSPOSE = "transpose"
    STACK_T = "stack_t"
    FUSED_GATE = "fused_gate"
    FUSED_UP = "fused_up"
    FUSED_DOWN = "fused_down"


COPY, TRANSPOSE, STACK_T = Transform.COPY, Transform.TRANSPOSE, Transform.STACK_T
FUSED_GATE, FUSED_UP, FUSED_DOWN = Transform.FUSED_GATE, Transform.FUSED_UP, Transform.FUSED_DOWN


@dataclass(frozen=True, slots=True, kw_only=True)
class FamilyNames:
    """The HF module names that differ between families (hub layout)."""

    moe: str = "mlp"  # module holding router + experts (Mixtral: block_sparse_moe)
    w_gate: str = "gate_proj"  # per-expert gate linear (Mixtral: w1)
    w_up: str = "up_proj"  # per-expert up linear (Mixtral: w3)
    w_down: str = "down_proj"  # per-expert down linear (Mixtral: w2)
    shared: str = "shared_expert"  # shared dense expert (DeepSeek-V2: shared_experts)


FAMILIES: dict[str, FamilyNames] = {
    "qwen2_moe": FamilyNames(),
    "qwen3_moe": FamilyNames(),
    "olmoe": FamilyNames(),
    "mixtral": FamilyNames(moe="block_sparse_moe", w_gate="w1", w_up="w3", w_down="w2"),
    "deepseek_v2": FamilyNames(shared="shared_experts"),
}

# Keys outside the layers: our key -> (HF name, transform).
GLOBAL_RULES: dict[str, tuple[str, Transform]] = {
    "embed/embedding": ("model.embed_tokens.weight", COPY),
    "final_norm/scale": ("model.norm.weight", COPY),
    "lm_head/kernel": ("lm_head.weight", TRANSPOSE),
}

# Keys of layer i: our key after "layers/{i}/" -> (HF name after "model.layers.{i}.", transform).
LAYER_RULES: dict[str, tuple[str, Transform]] = {
    "input_norm/scale": ("input_layernorm.weight", COPY),
    "post_attn_norm/scale": ("post_attention_layernorm.weight", COPY),
    # standard attention (qwen2_moe, qwen3_moe, mixtral, olmoe); q_proj is also DS2's no-lora query
    "attn/q_proj/kernel": ("self_attn.q_proj.weight", TRANSPOSE),
    "attn/q_proj/bias": ("self_attn.q_proj.bias", COPY),
    "attn/k_proj/kernel": ("self_attn.k_proj.weight", TRANSPOSE),
    "attn/k_proj/bias": ("self_attn.k_proj.bias", COPY),
    "attn/v_proj/kernel": ("self_attn.v_proj.weight", TRANSPOSE),
    "attn/v_proj/bias": ("self_attn.v_proj.bias", COPY),
    "attn/o_proj/kernel": ("self_attn.o_proj.weight", TRANSPOSE),
    "attn/o_proj/bias": ("self_attn.o_proj.bias", COPY),
    "attn/q_norm/scale": ("self_attn.q_norm.weight", COPY),
    "attn/k_norm/scale": ("self_attn.k_norm.weight", COPY),
    # DeepSeek-V2 MLA
    "attn/q_a_proj/kernel": ("self_attn.q_a_proj.weight", TRANSPOSE),
    "attn/q_a_norm/scale": ("self_attn.q_a_layernorm.weight", COPY),
    "attn/q_b_proj/kernel": ("self_attn.q_b_proj.weight", TRANSPOSE),
    "attn/kv_a_proj/kernel": ("self_attn.kv_a_proj_with_mqa.weight", TRANSPOSE),
    "attn/kv_a_norm/scale": ("self_attn.kv_a_layernorm.weight", COPY),
    "attn/kv_b_proj/kernel": ("self_attn.kv_b_proj.weight", TRANSPOSE),
    # dense MLP layers
    "mlp/gate_proj/kernel": ("mlp.gate_proj.weight", TRANSPOSE),
    "mlp/up_proj/kernel": ("mlp.up_proj.weight", TRANSPOSE),
    "mlp/down_proj/kernel": ("mlp.down_proj.weight", TRANSPOSE),
    # MoE layers, hub layout
    "mlp/router/kernel": ("{moe}.gate.weight", TRANSPOSE),
    "mlp/experts/gate": ("{moe}.experts.{e}.{w_gate}.weight", STACK_T),
    "mlp/experts/up": ("{moe}.experts.{e}.{w_up}.weight", STACK_T),
    "mlp/experts/down": ("{moe}.experts.{e}.{w_down}.weight", STACK_T),
    "mlp/shared/gate_proj/kernel": ("{moe}.{shared}.gate_proj.weight", TRANSPOSE),
    "mlp/shared/up_proj/kernel": ("{moe}.{shared}.up_proj.weight", TRANSPOSE),
    "mlp/shared/down_proj/kernel": ("{moe}.{shared}.down_proj.weight", TRANSPOSE),
    "mlp/shared_gate/kernel": ("{moe}.shared_expert_gate.weight", TRANSPOSE),
}

# transformers 5's fused expert layout (what ``model.state_dict()`` holds; Mixtral's
# block_sparse_moe is renamed to mlp there); read, never written.
FUSED_EXPERT_RULES: dict[str, tuple[str, Transform]] = {
    "mlp/router/kernel": ("mlp.gate.weight", TRANSPOSE),
    "mlp/experts/gate": ("mlp.experts.gate_up_proj", FUSED_GATE),
    "mlp/experts/up": ("mlp.experts.gate_up_proj", FUSED_UP),
    "mlp/experts/down": ("mlp.experts.down_proj", FUSED_DOWN),
}

# HF tensors that carry no parameters of ours (rotary caches some old checkpoints saved).
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


@dataclass(frozen=True, slots=True)
class Source:
    """Where one of our keys comes from: HF names (one per expert for STACK_T) and a transform."""

    key: str  # our flat key
    hf_names: tuple[str, ...]  # HF tensors read, in order
    transform: Transform
    shape: tuple[int, ...]  # our shape (from param_shapes)

    def hf_shapes(self) -> tuple[tuple[int, ...], ...]:
        """The HF shape each of ``hf_names`` must have for our ``shape``."""
        s = self.shape
        match self.transform:
            case Transform.COPY:
                return (s,)
            case Transform.TRANSPOSE:
                return (s[::-1],)
            case Transform.STACK_T:
                return tuple((s[2], s[1]) for _ in self.hf_names)
            case Transform.FUSED_GATE | Transform.FUSED_UP:
                return ((s[0], 2 * s[2], s[1]),)
            case Transform.FUSED_DOWN:
                return ((s[0], s[2], s[1]),)
        raise AssertionError(self.transform)


def family(model_type: str) -> FamilyNames:
    try:
        return FAMILIES[model_type]
    except KeyError:
        raise ValueError(f"unknown model_type {model_type!r}; supported: "
                         f"{', '.join(sorted(FAMILIES))}") from None


def layer_of(key: str) -> int | None:
    """Layer index of a flat key (``layers/3/...`` -> 3), None for the global keys."""
    parts = key.split("/", 2)
    return int(parts[1]) if parts[0] == "layers" else None


def sources(model_type: str, shapes: dict[str, tuple[int, ...]],
            fused_layers: frozenset[int] = frozenset()) -> list[Source]:
    """Where each of our keys (``shapes``: flat key -> shape) comes from in an HF checkpoint.

    ``fused_layers``: layers whose experts are stored in transformers' fused layout.
    """
    names = family(model_type)
    out = []
    for key, shape in shapes.items():
        i = layer_of(key)
        if i is None:
            if key not in GLOBAL_RULES:
                raise NotImplementedError(f"no HF name for parameter {key}")
            hf, tr = GLOBAL_RULES[key]
            out.append(Source(key, (hf,), tr, tuple(shape)))
            continue
        sub = key.split("/", 2)[2]
        rules = FUSED_EXPERT_RULES if i in fused_layers and sub in FUSED_EXPERT_RULES \
            else LAYER_RULES
        if sub not in rules:
            raise NotImplementedError(f"no HF name for parameter {key}")
        template, tr = rules[sub]
        prefix = f"model.layers.{i}."
        fields = dict(moe=names.moe, w_gate=names.w_gate, w_up=names.w_up, w_down=names.w_down,
                      shared=names.shared)
        if tr is STACK_T:
            hf = tuple(prefix + template.format(e=e, **fields) for e in range(shape[0]))
        else:
            hf = (prefix + template.format(e=0, **fields),)
        out.append(Source(key, hf, tr, tuple(shape)))
    return out


def fused_expert_layers(hf_keys) -> frozenset[int]:
    """Layers whose experts use transformers 5's fused layout in this checkpoint."""
    out = set()
    for k in hf_keys:
        if k.endswith(".mlp.experts.gate_up_proj") and k.startswith("model.layers."):
            out.add(int(k.split(".")[2]))
    return frozenset(out)


def to_ours(src: Source, arrays: list[np.ndarray]) -> np.ndarray:
    """Apply ``src.transform`` to the HF arrays read for it."""
    match src.transform:
        case Transform.COPY:
            out = arrays[0]
        case Transform.TRANSPOSE:
            out = arrays[0].T
        case Transform.STACK_T:
            out = np.stack([a.T for a in arrays])
        case Transform.FUSED_GATE:
            out = arrays[0][:, : src.shape[2], :].transpose(0, 2, 1)
        case Transform.FUSED_UP:
            out = arrays[0][:, src.shape[2]:, :].transpose(0, 2, 1)
        case Transform.FUSED_DOWN:
            out = arrays[0].transpose(0, 2, 1)
    return np.ascontiguousarray(out)


def to_hf(src: Source, ours: np.ndarray) -> list[np.ndarray]:
    """The inverse of `to_ours` for the hub layout: one array per ``src.hf_names``."""
    match src.transform:
        case Transform.COPY:
            return [np.ascontiguousarray(ours)]
        case Transform.TRANSPOSE:
            return [np.ascontiguousarray(ours.T)]
        case Transform.STACK_T:
            return [np.ascontiguousarray(ours[e].T) for e in range(ours.shape[0])]
    raise ValueError(f"export writes the hub layout only, not {src.transform}")
