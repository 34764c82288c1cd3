"""HF -> MODEL_DIR -> Flax logits equal transformers' on every fixture (stored and live), and the
round trip HF -> Flax -> HF reproduces the original checkpoint tensor for tensor."""

from __future__ import annotations

import json

import ml_dtypes
import numpy as np
import pytest
from convert_helpers import (
    FIXTURE_NAMES,
    HF_FIXTURES,
    assert_logits_close,
    converted,
    fixture_inputs,
    hf_live_logits,
    our_logits,
)
from mxmoe_jax.convert.export import export_hf
from mxmoe_jax.convert.hf_to_flax import convert_hf
from safetensors.numpy import load_file

from mxmoe_jax.models.io import load_flat_params


def _hf_tensors(hf_dir) -> dict[str, np.ndarray]:
    """Every tensor of an HF folder, read with safetensors directly (not our reader)."""
    out = {}
    for f in sorted(hf_dir.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _config(name: str) -> dict:
    return json.loads((HF_FIXTURES / name / "config.json").read_text())


def test_fixtures_cover_the_families_and_features():
    """The fixture set exercises what issue 2 lists (a guard against regenerating it smaller)."""
    cfgs = {n: _config(n) for n in FIXTURE_NAMES}
    types = {c["model_type"] for c in cfgs.values()}
    assert types == {"qwen2_moe", "qwen3_moe", "mixtral", "olmoe", "deepseek_v2"}
    qwen2 = [c for c in cfgs.values() if c["model_type"] == "qwen2_moe"]
    assert {c["norm_topk_prob"] for c in qwen2} == {True, False}
    assert any(c["mlp_only_layers"] and c["decoder_sparse_step"] > 1 for c in qwen2)
    ds2 = [c for c in cfgs.values() if c["model_type"] == "deepseek_v2"]
    assert {c["q_lora_rank"] is None for c in ds2} == {True, False}
    assert {c["topk_method"] for c in ds2} == {"greedy", "group_limited_greedy"}
    assert all(c["rope_parameters"]["rope_type"] == "yarn" and c["first_k_dense_replace"] == 1
               and c["routed_scaling_factor"] != 1 for c in ds2)
    assert any(c["model_type"] == "mixtral" and c.get("sliding_window") for c in cfgs.values())
    assert any((HF_FIXTURES / n / "model.safetensors.index.json").exists() for n in FIXTURE_NAMES)
    fused = [n for n in FIXTURE_NAMES
             if any(k.endswith("experts.gate_up_proj") for k in _hf_tensors(HF_FIXTURES / n))]
    assert fused, "no fixture in transformers' fused expert layout"


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_logits_match_stored_transformers_logits(name):
    ids, want = fixture_inputs(name)
    assert_logits_close(our_logits(converted(name), ids), want, name)


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_logits_match_live_transformers(name, tmp_path):
    ids, _ = fixture_inputs(name)
    (live,) = hf_live_logits([HF_FIXTURES / name], ids, tmp_path)
    assert_logits_close(our_logits(converted(name), ids), live, f"{name} (live)")


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_round_trip_reproduces_the_checkpoint(name, tmp_path):
    """HF -> MODEL_DIR -> HF gives the hub-layout tensors of the original, bit for bit, and our
    converter reads the export back to identical params."""
    model_dir = converted(name)
    exported = export_hf(model_dir, tmp_path / "hf", max_shard_bytes=150_000)
    got = _hf_tensors(exported)
    # the fused twin's hub-layout original is its sibling saved by save_pretrained
    original = name.removesuffix("_fused")
    want = _hf_tensors(HF_FIXTURES / original)
    assert sorted(got) == sorted(want)
    for key in want:
        assert got[key].dtype == want[key].dtype and np.array_equal(got[key], want[key]), key
    hf_cfg = json.loads((exported / "config.json").read_text())
    assert hf_cfg["model_type"] == _config(name)["model_type"]
    assert hf_cfg["dtype"] == "float32"
    again = convert_hf(exported, tmp_path / "again", "fp32").out
    _, a = load_flat_params(model_dir)
    _, b = load_flat_params(again)
    assert sorted(a) == sorted(b)
    assert all(np.array_equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("name", ["qwen2_moe_sparse_step", "deepseek_v2_qlora"])
def test_round_trip_live_transformers_logits_identical(name, tmp_path):
    ids, _ = fixture_inputs(name)
    exported = export_hf(converted(name), tmp_path / "hf")
    before, after = hf_live_logits([HF_FIXTURES / name, exported], ids, tmp_path)
    assert np.array_equal(before, after)


def test_bf16_conversion_rounds_the_fp32_params():
    name = "deepseek_v2_qlora"
    _, f32 = load_flat_params(converted(name, "fp32"))
    _, b16 = load_flat_params(converted(name, "bf16"))
    assert sorted(f32) == sorted(b16)
    for k, v in f32.items():
        assert b16[k].dtype == ml_dtypes.bfloat16, k
        assert np.array_equal(b16[k], v.astype(ml_dtypes.bfloat16)), k
