"""ModelConfig.from_hf: every family's fields, layer kinds, errors, and the to_dict round trip."""

from __future__ import annotations

import dataclasses
import json

import pytest

from mxmoe_jax.config import SUPPORTED_MODEL_TYPES, ModelConfig

# Abridged hub config.json files (real sizes, keys as the hub / transformers 5 write them).
QWEN15_MOE = {  # Qwen/Qwen1.5-MoE-A2.7B
    "model_type": "qwen2_moe", "vocab_size": 151936, "hidden_size": 2048,
    "num_hidden_layers": 24, "num_attention_heads": 16, "num_key_value_heads": 16,
    "intermediate_size": 5632, "moe_intermediate_size": 1408,
    "shared_expert_intermediate_size": 5632, "num_experts": 60, "num_experts_per_tok": 4,
    "norm_topk_prob": False, "decoder_sparse_step": 1, "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0, "tie_word_embeddings": False, "use_sliding_window": False,
    "sliding_window": 32768, "max_window_layers": 21, "hidden_act": "silu",
}
QWEN3_MOE = {  # Qwen/Qwen3-30B-A3B
    "model_type": "qwen3_moe", "vocab_size": 151936, "hidden_size": 2048,
    "num_hidden_layers": 48, "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128,
    "intermediate_size": 6144, "moe_intermediate_size": 768, "num_experts": 128,
    "num_experts_per_tok": 8, "norm_topk_prob": True, "decoder_sparse_step": 1,
    "mlp_only_layers": [], "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "rope_scaling": None,
    "attention_bias": False, "use_sliding_window": False, "sliding_window": None,
    "tie_word_embeddings": False,
}
MIXTRAL = {  # mistralai/Mixtral-8x7B-v0.1
    "model_type": "mixtral", "vocab_size": 32000, "hidden_size": 4096, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": 8, "intermediate_size": 14336,
    "num_local_experts": 8, "num_experts_per_tok": 2, "rms_norm_eps": 1e-5,
    "rope_theta": 1000000.0, "sliding_window": None, "tie_word_embeddings": False,
}
OLMOE = {  # allenai/OLMoE-1B-7B-0924
    "model_type": "olmoe", "vocab_size": 50304, "hidden_size": 2048, "num_hidden_layers": 16,
    "num_attention_heads": 16, "num_key_value_heads": 16, "intermediate_size": 1024,
    "num_experts": 64, "num_experts_per_tok": 8, "norm_topk_prob": False, "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0, "clip_qkv": None, "attention_bias": False,
}
DS2_LITE = {  # deepseek-ai/DeepSeek-V2-Lite
    "model_type": "deepseek_v2", "vocab_size": 102400, "hidden_size": 2048,
    "num_hidden_layers": 27, "num_attention_heads": 16, "num_key_value_heads": 16,
    "intermediate_size": 10944, "moe_intermediate_size": 1408, "n_routed_experts": 64,
    "n_shared_experts": 2, "num_experts_per_tok": 6, "first_k_dense_replace": 1,
    "moe_layer_freq": 1, "topk_method": "greedy", "n_group": 1, "topk_group": 1,
    "routed_scaling_factor": 1.0, "norm_topk_prob": False, "q_lora_rank": None,
    "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128,
    "rms_norm_eps": 1e-6, "rope_theta": 10000, "max_position_embeddings": 163840,
    "rope_scaling": {"type": "yarn", "factor": 40, "beta_fast": 32, "beta_slow": 1,
                     "mscale": 0.707, "mscale_all_dim": 0.707,
                     "original_max_position_embeddings": 4096},
}


def test_qwen2_moe():
    cfg = ModelConfig.from_hf(QWEN15_MOE)
    assert (cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (24, 16, 16, 128)
    assert cfg.attention_bias and not cfg.o_proj_bias  # qkv_bias defaults to True, o_proj none
    assert cfg.qk_norm == "none" and cfg.router == "softmax" and not cfg.norm_topk_prob
    assert cfg.shared_intermediate_size == 5632 and cfg.shared_expert_gate
    assert cfg.num_experts == 60 and cfg.moe_intermediate_size == 1408
    assert cfg.rope_theta == 1e6 and cfg.rope_scaling is None
    assert cfg.sliding_window is None  # use_sliding_window false
    assert cfg.moe_layers == tuple(range(24))


def test_qwen3_moe_and_transformers5_spelling():
    cfg = ModelConfig.from_hf(QWEN3_MOE)
    assert cfg.head_dim == 128 and cfg.qk_norm == "head" and cfg.norm_topk_prob
    assert cfg.num_experts == 128 and cfg.shared_intermediate_size == 0
    assert not cfg.shared_expert_gate and not cfg.attention_bias
    # transformers 5.24 writes num_local_experts and rope_parameters for qwen3_moe
    hf5 = {k: v for k, v in QWEN3_MOE.items() if k not in ("num_experts", "rope_theta")}
    hf5.update(num_local_experts=128, rope_parameters={"rope_theta": 5e5, "rope_type": "default"})
    cfg5 = ModelConfig.from_hf(hf5)
    assert cfg5.num_experts == 128 and cfg5.rope_theta == 5e5 and cfg5.rope_scaling is None


def test_mixtral():
    cfg = ModelConfig.from_hf(MIXTRAL)
    assert cfg.num_experts == 8 and cfg.moe_intermediate_size == 14336
    assert cfg.norm_topk_prob  # softmax -> top-k -> renormalise
    assert cfg.head_dim == 128 and cfg.sliding_window is None and cfg.sliding_layers == ()
    swa = ModelConfig.from_hf({**MIXTRAL, "sliding_window": 4096})
    assert swa.sliding_window == 4096
    assert all(swa.layer_sliding_window(i) == 4096 for i in range(32))


def test_olmoe():
    cfg = ModelConfig.from_hf(OLMOE)
    assert cfg.qk_norm == "full" and cfg.clip_qkv is None
    assert cfg.moe_intermediate_size == 1024 and cfg.num_experts == 64
    assert ModelConfig.from_hf({**OLMOE, "clip_qkv": 8.0}).clip_qkv == 8.0
    biased = ModelConfig.from_hf({**OLMOE, "attention_bias": True})
    assert biased.attention_bias and biased.o_proj_bias


def test_deepseek_v2_lite():
    cfg = ModelConfig.from_hf(DS2_LITE)
    assert cfg.router == "ds_greedy" and cfg.num_experts == 64 and cfg.num_experts_per_tok == 6
    assert cfg.shared_intermediate_size == 2 * 1408 and not cfg.shared_expert_gate
    assert cfg.q_lora_rank is None and cfg.kv_lora_rank == 512
    assert (cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim) == (128, 64, 128)
    assert cfg.rope_scaling["factor"] == 40 and cfg.max_position_embeddings == 163840
    assert cfg.moe_layers == tuple(range(1, 27))  # first_k_dense_replace = 1
    v2 = ModelConfig.from_hf({**DS2_LITE, "q_lora_rank": 1536, "n_group": 8, "topk_group": 3,
                              "topk_method": "group_limited_greedy",
                              "routed_scaling_factor": 16.0})
    assert v2.q_lora_rank == 1536 and v2.router == "ds_group_limited"
    assert (v2.n_group, v2.topk_group, v2.routed_scaling_factor) == (8, 3, 16.0)


def test_deepseek_v2_layer_rule():
    cfg = ModelConfig.from_hf({**DS2_LITE, "num_hidden_layers": 7, "first_k_dense_replace": 2,
                               "moe_layer_freq": 2})
    # original DeepSeek rule: i >= first_k_dense_replace and i % moe_layer_freq == 0
    assert cfg.moe_layers == (2, 4, 6)


def test_qwen_mlp_only_layers_and_sparse_step():
    cfg = ModelConfig.from_hf({**QWEN15_MOE, "num_hidden_layers": 6, "mlp_only_layers": [0, 3]})
    assert cfg.moe_layers == (1, 2, 4, 5)
    step = ModelConfig.from_hf({**QWEN15_MOE, "num_hidden_layers": 6, "decoder_sparse_step": 2})
    assert step.moe_layers == (1, 3, 5)  # (i + 1) % step == 0
    both = ModelConfig.from_hf({**QWEN3_MOE, "num_hidden_layers": 6, "decoder_sparse_step": 3,
                                "mlp_only_layers": [5]})
    assert both.moe_layers == (2,)


def test_qwen2_sliding_layers():
    hf = {**QWEN15_MOE, "num_hidden_layers": 6, "use_sliding_window": True,
          "sliding_window": 64, "max_window_layers": 4}
    cfg = ModelConfig.from_hf(hf)  # transformers: odd (i + 1) and i < max_window_layers
    assert cfg.sliding_layers == (0, 2) and cfg.layer_sliding_window(0) == 64
    assert cfg.layer_sliding_window(1) is None
    types = ["sliding_attention", "full_attention"] * 3
    cfg = ModelConfig.from_hf({**hf, "layer_types": types})
    assert cfg.sliding_layers == (0, 2, 4)


def test_unknown_model_type():
    with pytest.raises(ValueError, match="llama") as err:
        ModelConfig.from_hf({**MIXTRAL, "model_type": "llama"})
    for name in SUPPORTED_MODEL_TYPES:
        assert name in str(err.value)
    with pytest.raises(ValueError, match="None"):
        ModelConfig.from_hf({k: v for k, v in MIXTRAL.items() if k != "model_type"})


@pytest.mark.parametrize("key", ["hidden_size", "num_attention_heads", "num_experts_per_tok"])
def test_missing_key_is_named(key):
    with pytest.raises(ValueError, match=key):
        ModelConfig.from_hf({k: v for k, v in MIXTRAL.items() if k != key})


def test_bad_values_name_the_field():
    cfg = ModelConfig.from_hf(MIXTRAL)
    with pytest.raises(ValueError, match="num_kv_heads"):
        dataclasses.replace(cfg, num_kv_heads=5)
    with pytest.raises(ValueError, match="qk_norm"):
        dataclasses.replace(cfg, qk_norm="layer")
    with pytest.raises(ValueError, match="num_experts_per_tok"):
        dataclasses.replace(cfg, num_experts_per_tok=9)
    with pytest.raises(ValueError, match="n_group"):
        ModelConfig.from_hf({**DS2_LITE, "topk_method": "group_limited_greedy", "n_group": 5})
    with pytest.raises(ValueError, match="topk_method"):
        ModelConfig.from_hf({**DS2_LITE, "topk_method": "noaux_tc"})
    with pytest.raises(ValueError, match="scoring_func"):
        ModelConfig.from_hf({**DS2_LITE, "scoring_func": "sigmoid"})
    with pytest.raises(ValueError, match="hidden_act"):
        ModelConfig.from_hf({**MIXTRAL, "hidden_act": "gelu"})


@pytest.mark.parametrize("hf", [QWEN15_MOE, QWEN3_MOE, MIXTRAL, OLMOE, DS2_LITE],
                         ids=lambda h: h["model_type"])
def test_to_dict_round_trip(hf):
    cfg = ModelConfig.from_hf(hf)
    d = json.loads(json.dumps(cfg.to_dict()))  # JSON-serialisable
    back = ModelConfig.from_dict(d)
    assert back == cfg and back.hf_config == hf
    hash(cfg)  # NNX keeps the config as static data: it must hash despite its dict fields
    with pytest.raises(ValueError, match="bogus"):
        ModelConfig.from_dict({**d, "bogus": 1})
