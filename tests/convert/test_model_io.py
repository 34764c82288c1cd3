"""MODEL_DIR save/load: load(save(x)) is x, bit for bit and dtype for dtype."""

from __future__ import annotations

import json

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from convert_helpers import HF_FIXTURES, converted
from flax import nnx

from mxmoe_jax.config import ModelConfig
from mxmoe_jax.models import MoECausalLM, io, param_shapes, to_flat_params

NAME = "qwen3_moe"


def _cfg():
    return io.load_config(converted(NAME))


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_load_of_save_is_identical(dtype, tmp_path):
    cfg = _cfg()
    rng = np.random.default_rng(0)
    want = {k: rng.standard_normal(s).astype(io.np_dtype(dtype))
            for k, s in param_shapes(cfg).items()}
    io.save_model_dir(cfg, want, tmp_path / "m")
    cfg2, got = io.load_flat_params(tmp_path / "m")
    assert cfg2 == cfg and cfg2.hf_config == cfg.hf_config
    assert sorted(got) == sorted(want)
    for k in want:
        assert got[k].dtype == want[k].dtype and np.array_equal(got[k], want[k]), k
    manifest = json.loads((tmp_path / "m" / io.MANIFEST).read_text())
    assert manifest["dtype"] == io.dtype_name(dtype)
    assert manifest["groups"][0] == io.GLOBALS
    assert manifest["groups"][1:] == [f"layers/{i}" for i in range(cfg.num_layers)]
    # config.json beside it is the HF config the model came from
    hf = json.loads((tmp_path / "m" / io.HF_CONFIG).read_text())
    assert ModelConfig.from_hf(hf) == cfg


def test_save_a_model_object_and_load_it_back(tmp_path):
    cfg = _cfg()
    model = MoECausalLM(cfg, dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(3))
    io.save_model_dir(cfg, model, tmp_path / "m")
    cfg2, loaded = io.load_model_dir(tmp_path / "m")
    a, b = to_flat_params(model), to_flat_params(loaded)
    assert cfg2 == cfg and sorted(a) == sorted(b)
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_load_with_a_dtype_casts(tmp_path):
    _, f32 = io.load_flat_params(converted(NAME))
    _, b16 = io.load_flat_params(converted(NAME), dtype="bf16")
    assert all(b16[k].dtype == ml_dtypes.bfloat16 for k in b16)
    assert all(np.array_equal(b16[k], f32[k].astype(ml_dtypes.bfloat16)) for k in f32)
    _, model = io.load_model_dir(converted(NAME), dtype=jnp.bfloat16)
    assert all(v.dtype == jnp.bfloat16 for v in to_flat_params(model).values())


def test_save_refuses_non_empty_dir_and_bad_params(tmp_path):
    cfg = _cfg()
    _, flat = io.load_flat_params(converted(NAME))
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "x").write_text("x")
    with pytest.raises(FileExistsError):
        io.save_model_dir(cfg, flat, tmp_path / "m")
    bad = dict(flat)
    bad["layers/0/attn/q_proj/kernel"] = np.full_like(bad["layers/0/attn/q_proj/kernel"], np.nan)
    with pytest.raises(ValueError, match="non-finite"):
        io.save_model_dir(cfg, bad, tmp_path / "n")
    assert not (tmp_path / "n").exists()


def test_not_a_model_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match="convert it first"):
        io.load_model_dir(HF_FIXTURES / NAME)  # an HF folder, not a MODEL_DIR
    with pytest.raises(FileNotFoundError, match="not a MODEL_DIR"):
        io.load_model_dir(tmp_path / "nowhere")
    (tmp_path / io.MANIFEST).write_text(json.dumps({"format": "other"}))
    with pytest.raises(ValueError, match="format"):
        io.load_flat_params(tmp_path)


def test_tokenizer_files_are_copied(tmp_path):
    src = tmp_path / "hf"
    src.mkdir()
    (src / "tokenizer.json").write_text("{}")
    (src / "tokenizer_config.json").write_text("{}")
    (src / "unrelated.txt").write_text("no")
    cfg = _cfg()
    _, flat = io.load_flat_params(converted(NAME))
    io.save_model_dir(cfg, flat, tmp_path / "m", tokenizer_dir=src)
    names = {p.name for p in (tmp_path / "m").iterdir()}
    assert {"tokenizer.json", "tokenizer_config.json"} <= names and "unrelated.txt" not in names
