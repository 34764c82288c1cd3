"""The shared trained model (../shared/models/qwen2moe-tiny-books): converted, its parameter count
and its greedy continuation match what its README documents for transformers."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TINY_MODEL, require_shared
from convert_helpers import assert_logits_close, hf_live_logits
from mxmoe_jax.convert.hf_to_flax import convert_hf

from mxmoe_jax.models import forward, io

PROMPT = "It is a truth universally acknowledged"
# transformers' greedy output, 30 new tokens, fp32 (the model's README)
GREEDY = ("It is a truth universally acknowledged by the\nsituing of the two young ladies, and the "
          "two ladies in the country,\nand the two ladies were to be married")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    require_shared(TINY_MODEL)
    out = tmp_path_factory.mktemp("tiny") / "model"
    report = convert_hf(TINY_MODEL, out, "fp32")
    assert report.num_params == 21_398_784
    return out


def test_param_count_and_tokenizer(tiny_dir):
    cfg, flat = io.load_flat_params(tiny_dir)
    assert sum(v.size for v in flat.values()) == 21_398_784
    assert cfg.tie_word_embeddings and "lm_head/kernel" not in flat
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (tiny_dir / name).is_file(), name


def test_greedy_continuation_matches_transformers(tiny_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_dir), local_files_only=True)
    _, model = io.load_model_dir(tiny_dir)
    ids = list(tok(PROMPT)["input_ids"])
    n_new, width = 30, 64
    assert len(ids) + n_new <= width
    # one fixed width (one compilation); causal attention makes the padding after t irrelevant
    for _ in range(n_new):
        buf = np.zeros((1, width), np.int32)
        buf[0, : len(ids)] = ids
        logits = np.asarray(forward(model, jnp.asarray(buf)))[0, len(ids) - 1]
        assert np.all(np.isfinite(logits))
        ids.append(int(np.argmax(logits)))
    assert tok.decode(ids) == GREEDY


def test_logits_match_live_transformers(tiny_dir, tmp_path):
    ids = np.random.default_rng(0).integers(0, 8192, size=(2, 96)).astype(np.int32)
    _, model = io.load_model_dir(tiny_dir)
    ours = np.asarray(forward(model, jnp.asarray(ids)))
    (live,) = hf_live_logits([TINY_MODEL], ids, tmp_path)
    assert_logits_close(ours, live, "qwen2moe-tiny-books (live)")


def test_bf16_round_trip_reproduces_the_checkpoint(tmp_path):
    """Stored in bf16: convert --dtype bf16 then export-hf gives back every tensor bit for bit."""
    from mxmoe_jax.convert.export import export_hf
    from safetensors.numpy import load_file

    require_shared(TINY_MODEL)
    model_dir = convert_hf(TINY_MODEL, tmp_path / "model", "bf16").out
    hf = export_hf(model_dir, tmp_path / "hf", max_shard_bytes=16 * 2**20)
    got, want = {}, {}
    for f in hf.glob("*.safetensors"):
        got.update(load_file(str(f)))
    for f in TINY_MODEL.glob("*.safetensors"):
        want.update(load_file(str(f)))
    assert sorted(got) == sorted(want)
    assert all(got[k].dtype == want[k].dtype and np.array_equal(got[k], want[k]) for k in want)
    assert (hf / "model.safetensors.index.json").is_file() and (hf / "tokenizer.json").is_file()
