"""`ModelConfig`: one frozen description of an MoE decoder, resolved from a Hugging Face config.

Every family difference the models need is a plain field here, so the model code branches on
fields (``qk_norm``, ``router``, ``shared_intermediate_size``, ...) and never on ``model_type``.
Only attention is chosen by family: ``deepseek_v2`` uses MLA (``mxmoe_jax.models.mla``), every
other family the standard GQA attention.

Supported ``model_type`` values: ``qwen2_moe``, ``qwen3_moe``, ``mixtral``, ``olmoe``,
``deepseek_v2``. The raw HF dict is kept in ``hf_config`` so export can write it back unchanged.

Semantics follow transformers 5.x's own modeling files (``modeling_<family>.py``):

* qwen2_moe / qwen3_moe: a layer is MoE iff ``i not in mlp_only_layers`` and
  ``(i + 1) % decoder_sparse_step == 0`` (and ``num_experts > 0``); the others use the dense MLP
  of width ``intermediate_size``.
* deepseek_v2: a layer is MoE iff ``i >= first_k_dense_replace`` and ``i % moe_layer_freq == 0``
  (``moe_layer_freq`` is the original DeepSeek code's; transformers ignores it, default 1).
* Sliding window: mixtral when ``sliding_window`` is set (all layers); qwen3_moe when
  ``use_sliding_window``; qwen2_moe per ``layer_types`` (or its ``max_window_layers`` rule).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

SUPPORTED_MODEL_TYPES = ("qwen2_moe", "qwen3_moe", "mixtral", "olmoe", "deepseek_v2")
QK_NORMS = ("none", "head", "full")
ROUTERS = ("softmax", "ds_greedy", "ds_group_limited")


# The linear blocks of a SwiGLU expert, in MxMoE's order (gate and up read the block input, down
# reads silu(gate) * up).
BLOCKS = ("gate", "up", "down")


@dataclass(frozen=True, slots=True, kw_only=True)
class ModelConfig:
    """Architecture of one MoE causal LM (all sizes in elements; see the module docstring)."""

    model_type: str  # HF model_type, one of SUPPORTED_MODEL_TYPES
    vocab_size: int  # V
    hidden_size: int  # D
    num_layers: int  # decoder layers
    num_heads: int  # H, query heads
    num_kv_heads: int  # KV heads (GQA); H % KV == 0
    head_dim: int  # hd of the standard attention (config's head_dim when given, else D // H)
    rms_norm_eps: float  # epsilon of every RMSNorm
    rope_theta: float  # RoPE base
    # HF rope parameters when the rope type is not "default" (e.g. DS2's YaRN), else None;
    # a dict, so it is left out of the hash (NNX keeps the config as static graph data)
    rope_scaling: dict | None = field(default=None, hash=False)
    max_position_embeddings: int = 4096  # the model's context length (YaRN reads it)
    attention_bias: bool = False  # bias on q/k/v projections
    o_proj_bias: bool = False  # bias on o_proj (qwen3_moe / olmoe with attention_bias)
    qk_norm: str = "none"  # "none" | "head" (qwen3: RMSNorm over hd) | "full" (olmoe: over H*hd)
    clip_qkv: float | None = None  # olmoe: clamp q, k, v to [-clip, clip] after the norms
    sliding_window: int | None = None  # window in tokens for layers in sliding_layers, else None
    sliding_layers: tuple[int, ...] = ()  # layers that use sliding_window
    tie_word_embeddings: bool = False  # logits use embed.embedding (no lm_head)
    num_experts: int  # E, routed experts per MoE layer
    num_experts_per_tok: int  # k, experts per token
    moe_intermediate_size: int  # I of each routed expert
    intermediate_size: int  # width of the dense MLP layers
    norm_topk_prob: bool = False  # renormalise the top-k softmax weights to sum to 1
    routed_scaling_factor: float = 1.0  # DS2: routed weights are multiplied by this
    router: str = "softmax"  # "softmax" | "ds_greedy" | "ds_group_limited"
    n_group: int | None = None  # DS2 group_limited_greedy: expert groups
    topk_group: int | None = None  # DS2 group_limited_greedy: groups kept per token
    shared_intermediate_size: int = 0  # width of the shared expert MLP; 0 = none
    shared_expert_gate: bool = False  # qwen2_moe: shared output times sigmoid(x @ shared_gate)
    mlp_only_layers: tuple[int, ...] = ()  # qwen: layers forced dense
    decoder_sparse_step: int = 1  # qwen: every n-th layer is MoE
    first_k_dense_replace: int = 0  # DS2: the first k layers are dense
    moe_layer_freq: int = 1  # DS2: MoE every n-th layer after the dense ones
    q_lora_rank: int | None = None  # DS2 MLA: query LoRA rank, None = plain q_proj
    kv_lora_rank: int = 0  # DS2 MLA: compressed KV width
    qk_nope_head_dim: int = 0  # DS2 MLA: per-head q/k width without rope
    qk_rope_head_dim: int = 0  # DS2 MLA: per-head q/k width with rope
    v_head_dim: int = 0  # DS2 MLA: per-head value width
    # the raw HF config.json dict, kept for export; not compared or hashed
    hf_config: dict = field(default_factory=dict, hash=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"model_type {self.model_type!r} is not supported; "
                             f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads",
                     "head_dim", "num_experts", "num_experts_per_tok", "moe_intermediate_size",
                     "decoder_sparse_step", "moe_layer_freq"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"ModelConfig.{name} must be a positive int, got {value!r}")
        for name in ("intermediate_size", "shared_intermediate_size", "first_k_dense_replace",
                     "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"ModelConfig.{name} must be an int >= 0, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"ModelConfig.num_heads ({self.num_heads}) must be a multiple of "
                             f"num_kv_heads ({self.num_kv_heads})")
        if self.num_experts_per_tok > self.num_experts:
            raise ValueError(f"ModelConfig.num_experts_per_tok ({self.num_experts_per_tok}) "
                             f"exceeds num_experts ({self.num_experts})")
        if self.qk_norm not in QK_NORMS:
            raise ValueError(f"ModelConfig.qk_norm must be one of {QK_NORMS}, got {self.qk_norm!r}")
        if self.router not in ROUTERS:
            raise ValueError(f"ModelConfig.router must be one of {ROUTERS}, got {self.router!r}")
        if not self.rms_norm_eps > 0:
            raise ValueError(f"ModelConfig.rms_norm_eps must be > 0, got {self.rms_norm_eps!r}")
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise ValueError(f"ModelConfig.sliding_window must be None or > 0, "
                             f"got {self.sliding_window!r}")
        if self.sliding_layers and self.sliding_window is None:
            raise ValueError("ModelConfig.sliding_layers is set but sliding_window is None")
        if any(not 0 <= i < self.num_layers for i in self.sliding_layers):
            raise ValueError(f"ModelConfig.sliding_layers {self.sliding_layers} has an index "
                             f"outside 0..{self.num_layers - 1}")
        if self.router == "ds_group_limited":
            if not self.n_group or not self.topk_group:
                raise ValueError("ModelConfig.n_group and topk_group must be set for "
                                 "router='ds_group_limited'")
            if self.num_experts % self.n_group:
                raise ValueError(f"ModelConfig.n_group ({self.n_group}) must divide num_experts "
                                 f"({self.num_experts})")
            if not 0 < self.topk_group <= self.n_group:
                raise ValueError(f"ModelConfig.topk_group ({self.topk_group}) must be in "
                                 f"1..n_group ({self.n_group})")
            if self.num_experts_per_tok > self.topk_group * self.num_experts // self.n_group:
                raise ValueError("ModelConfig.num_experts_per_tok exceeds the experts in the "
                                 "topk_group kept groups")
        if self.shared_expert_gate and self.shared_intermediate_size <= 0:
            raise ValueError("ModelConfig.shared_expert_gate needs shared_intermediate_size > 0")
        if self.model_type == "deepseek_v2":
            for name in ("kv_lora_rank", "qk_rope_head_dim", "v_head_dim"):
                if getattr(self, name) <= 0:
                    raise ValueError(f"ModelConfig.{name} must be > 0 for deepseek_v2")
        if any(self.is_moe_layer(i) is False for i in range(self.num_layers)) and \
                self.intermediate_size <= 0:
            raise ValueError("ModelConfig.intermediate_size must be > 0 when a layer is dense")

    # ------------------------------------------------------------------ queries

    def is_moe_layer(self, i: int) -> bool:
        """Whether decoder layer ``i`` has the MoE block (else the dense MLP)."""
        if self.model_type == "deepseek_v2":
            return i >= self.first_k_dense_replace and i % self.moe_layer_freq == 0
        return i not in self.mlp_only_layers and (i + 1) % self.decoder_sparse_step == 0

    def layer_sliding_window(self, i: int) -> int | None:
        """The attention window of layer ``i`` in tokens, or None for full causal attention."""
        return self.sliding_window if i in self.sliding_layers else None

    @property
    def moe_layers(self) -> tuple[int, ...]:
        """Indices of the MoE layers, in order."""
        return tuple(i for i in range(self.num_layers) if self.is_moe_layer(i))

    def fingerprint(self) -> str:
        """``<model_type>-<12 hex>``: a hash of what the artifacts of this model depend on (its
        family, vocabulary, layer count, MoE layers, expert count and sizes, top-k). trace.json,
        loss.json and qconfig.json carry it and every consumer compares it with its model's."""
        import hashlib
        import json

        key = dict(model_type=self.model_type, vocab=self.vocab_size, hidden=self.hidden_size,
                   layers=self.num_layers, moe_layers=list(self.moe_layers),
                   experts=self.num_experts, top_k=self.num_experts_per_tok,
                   moe_inter=self.moe_intermediate_size, inter=self.intermediate_size,
                   shared=self.shared_intermediate_size)
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
        return f"{self.model_type}-{digest}"

    # ------------------------------------------------------------------ (de)serialisation

    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly dict (tuples become lists); ``from_dict`` inverts it."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """Inverse of ``to_dict``; unknown keys are an error naming them."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"ModelConfig.from_dict: unknown keys {unknown}")
        kwargs = dict(d)
        for key in ("sliding_layers", "mlp_only_layers"):
            if key in kwargs:
                kwargs[key] = tuple(int(i) for i in kwargs[key])
        return cls(**kwargs)

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> ModelConfig:
        """Resolve an HF ``config.json`` dict (see the module docstring for the rules)."""
        if not isinstance(hf, dict):
            raise ValueError(f"ModelConfig.from_hf expects a dict, got {type(hf).__name__}")
        model_type = hf.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"model_type {model_type!r} is not supported; "
                             f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
        return cls(**_resolve_hf(model_type, hf), hf_config=dict(hf))


def _req(hf: dict, key: str, model_type: str) -> Any:
    if hf.get(key) is None:
        raise ValueError(f"{model_type} config.json is missing {key!r}")
    return hf[key]


def _rope(hf: dict) -> tuple[float, dict | None]:
    """(rope_theta, rope_scaling) from transformers 5's ``rope_parameters`` or the legacy keys."""
    params = hf.get("rope_parameters")
    if isinstance(params, dict) and params:
        theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
        rope_type = params.get("rope_type", params.get("type", "default"))
        scaling = None if rope_type == "default" else dict(params)
        return theta, scaling
    theta = float(hf.get("rope_theta", 10000.0))
    scaling = hf.get("rope_scaling")
    if isinstance(scaling, dict):
        rope_type = scaling.get("rope_type", scaling.get("type", "default"))
        scaling = None if rope_type == "default" else dict(scaling)
    else:
        scaling = None
    return theta, scaling


def _resolve_hf(mt: str, hf: dict) -> dict[str, Any]:
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"{mt} config.json has hidden_act={act!r}; only 'silu' is supported")
    d = int(_req(hf, "hidden_size", mt))
    h = int(_req(hf, "num_attention_heads", mt))
    n_layers = int(_req(hf, "num_hidden_layers", mt))
    kv = hf.get("num_key_value_heads") or h
    theta, scaling = _rope(hf)
    common: dict[str, Any] = dict(
        model_type=mt,
        vocab_size=int(_req(hf, "vocab_size", mt)),
        hidden_size=d,
        num_layers=n_layers,
        num_heads=h,
        num_kv_heads=int(kv),
        head_dim=int(hf.get("head_dim") or d // h),
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        rope_scaling=scaling,
        max_position_embeddings=int(hf.get("max_position_embeddings") or 4096),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        num_experts_per_tok=int(_req(hf, "num_experts_per_tok", mt)),
        intermediate_size=int(hf.get("intermediate_size") or 0),
    )
    if mt in ("qwen2_moe", "qwen3_moe"):
        n_exp = hf.get("num_experts") or hf.get("num_local_experts")
        if not n_exp:
            raise ValueError(f"{mt} config.json is missing 'num_experts'")
        common.update(
            num_experts=int(n_exp),
            moe_intermediate_size=int(_req(hf, "moe_intermediate_size", mt)),
            norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
            mlp_only_layers=tuple(int(i) for i in (hf.get("mlp_only_layers") or ())),
            decoder_sparse_step=int(hf.get("decoder_sparse_step") or 1),
        )
        use_sw = bool(hf.get("use_sliding_window", False)) and bool(hf.get("sliding_window"))
        if mt == "qwen2_moe":
            shared = int(hf.get("shared_expert_intermediate_size") or 0)
            common.update(
                attention_bias=bool(hf.get("qkv_bias", True)),
                shared_intermediate_size=shared,
                shared_expert_gate=shared > 0,
            )
            layer_types = hf.get("layer_types")
            if layer_types is None:
                max_window = int(hf.get("max_window_layers", 28))
                layer_types = ["sliding_attention" if (i + 1) % 2 and i < max_window and use_sw
                               else "full_attention" for i in range(n_layers)]
            if len(layer_types) != n_layers:
                raise ValueError(f"{mt} config.json: layer_types has {len(layer_types)} entries "
                                 f"for {n_layers} layers")
            sliding = tuple(i for i, t in enumerate(layer_types) if t == "sliding_attention")
            if sliding and not hf.get("sliding_window"):
                raise ValueError(f"{mt} config.json: layer_types has sliding layers but "
                                 "sliding_window is not set")
            common.update(sliding_window=int(hf["sliding_window"]) if sliding else None,
                          sliding_layers=sliding)
        else:
            bias = bool(hf.get("attention_bias", False))
            common.update(attention_bias=bias, o_proj_bias=bias, qk_norm="head")
            if use_sw:
                common.update(sliding_window=int(hf["sliding_window"]),
                              sliding_layers=tuple(range(n_layers)))
    elif mt == "mixtral":
        n_exp = hf.get("num_local_experts") or hf.get("num_experts")
        if not n_exp:
            raise ValueError("mixtral config.json is missing 'num_local_experts'")
        common.update(
            num_experts=int(n_exp),
            # Mixtral's experts are w1 (gate) / w3 (up) / w2 (down) of width intermediate_size
            moe_intermediate_size=int(_req(hf, "intermediate_size", mt)),
            norm_topk_prob=True,  # softmax, top-k, renormalise == softmax over the top-k logits
        )
        if hf.get("sliding_window"):
            common.update(sliding_window=int(hf["sliding_window"]),
                          sliding_layers=tuple(range(n_layers)))
    elif mt == "olmoe":
        n_exp = hf.get("num_experts") or hf.get("num_local_experts")
        if not n_exp:
            raise ValueError("olmoe config.json is missing 'num_experts'")
        bias = bool(hf.get("attention_bias", False))
        clip = hf.get("clip_qkv")
        common.update(
            num_experts=int(n_exp),
            # OLMoE's experts have width intermediate_size (it has no moe_intermediate_size)
            moe_intermediate_size=int(hf.get("moe_intermediate_size")
                                      or _req(hf, "intermediate_size", mt)),
            norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
            attention_bias=bias,
            o_proj_bias=bias,
            qk_norm="full",
            clip_qkv=float(clip) if clip is not None else None,
            # transformers' OlmoeAttention ignores a head_dim key: hd = D // H always
            head_dim=d // h,
        )
    else:  # deepseek_v2
        if hf.get("mlp_bias"):
            raise ValueError("deepseek_v2 config.json has mlp_bias=true; not supported")
        method = hf.get("topk_method") or "greedy"
        routers = {"greedy": "ds_greedy", "group_limited_greedy": "ds_group_limited"}
        if method not in routers:
            raise ValueError(f"deepseek_v2 config.json has topk_method={method!r}; "
                             f"supported: {sorted(routers)}")
        scoring = hf.get("scoring_func") or "softmax"
        if scoring != "softmax":
            raise ValueError(f"deepseek_v2 config.json has scoring_func={scoring!r}; only "
                             "'softmax' (DeepSeek-V2) is supported")
        moe_i = int(_req(hf, "moe_intermediate_size", mt))
        n_shared = int(hf.get("n_shared_experts") or 0)
        q_lora = hf.get("q_lora_rank")
        common.update(
            num_experts=int(_req(hf, "n_routed_experts", mt)),
            moe_intermediate_size=moe_i,
            # transformers' DeepseekV2TopkRouter never renormalises (norm_topk_prob is unused)
            norm_topk_prob=False,
            routed_scaling_factor=float(hf.get("routed_scaling_factor", 1.0)),
            router=routers[method],
            n_group=int(hf["n_group"]) if hf.get("n_group") else None,
            topk_group=int(hf["topk_group"]) if hf.get("topk_group") else None,
            shared_intermediate_size=n_shared * moe_i,
            first_k_dense_replace=int(hf.get("first_k_dense_replace") or 0),
            moe_layer_freq=int(hf.get("moe_layer_freq") or 1),
            attention_bias=bool(hf.get("attention_bias", False)),
            q_lora_rank=int(q_lora) if q_lora else None,
            kv_lora_rank=int(_req(hf, "kv_lora_rank", mt)),
            qk_nope_head_dim=int(_req(hf, "qk_nope_head_dim", mt)),
            qk_rope_head_dim=int(_req(hf, "qk_rope_head_dim", mt)),
            v_head_dim=int(_req(hf, "v_head_dim", mt)),
            # the MLA module uses the fields above; head_dim is the q/k head width
            head_dim=int(hf["qk_nope_head_dim"]) + int(hf["qk_rope_head_dim"]),
        )
    return common
