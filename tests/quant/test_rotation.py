"""Hadamard rotation is function-preserving (fp32 logits within 1e-4) for every family."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from mxmoe_jax.quant.rotation import (
    load_rotation,
    make_rotation,
    rotate_params,
    save_rotation,
)
from mxmoe_jax.quantize.rotation import rotate_model
from tests.conftest import FIXTURES, TINY_MODEL, require_shared
from tests.quant.helpers import FIXTURE_NAMES, load_hf_flat


def _logits(cfg, flat, ids, rot=None):
    """Logits of the model of ``flat``, applying ``rot``'s online down_proj rotation if given."""
    from mxmoe_jax.models import forward, from_flat_params, set_rotation

    model = from_flat_params(cfg, flat)
    if rot is not None:
        set_rotation(model, rot)
    return np.asarray(forward(model, ids))


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_rotation_preserves_logits(name):
    from mxmoe_jax.models import forward, from_flat_params

    d = FIXTURES / "hf" / name
    cfg, flat = load_hf_flat(d)
    ids = jnp.asarray(np.load(d / "inputs.npz")["input_ids"])
    ref = np.asarray(forward(from_flat_params(cfg, flat), ids))
    if name in ("qwen2_moe_sparse_step", "deepseek_v2_lite"):  # dense + MoE layers, shared experts
        # the logits helper without a rotation is the model's own forward
        np.testing.assert_array_equal(_logits(cfg, flat, ids), ref)
    cfg_r, flat_r, rot = rotate_params(cfg, flat, seed=3)
    assert not cfg_r.tie_word_embeddings
    assert set(flat_r) == set(flat) | {"lm_head/kernel"}
    # norms are fused away, the residual stream and the weights really changed
    assert all(np.all(v == 1) for k, v in flat_r.items() if k.endswith("norm/scale")
               and ("input_norm" in k or "post_attn" in k or k == "final_norm/scale"))
    assert not np.allclose(flat_r["embed/embedding"], flat["embed/embedding"])
    got = _logits(cfg_r, flat_r, ids, rot)
    assert np.abs(got - ref).max() <= 1e-4
    # without the online part the plain model forward is enough
    cfg_n, flat_n, rot_n = rotate_params(cfg, flat, seed=3, online_down=False)
    assert not rot_n.online_down
    np.testing.assert_array_equal(rot_n.residual, rot.residual)
    assert np.abs(np.asarray(forward(from_flat_params(cfg_n, flat_n), ids)) - ref).max() <= 1e-4


@pytest.mark.slow
def test_rotation_preserves_tiny_model_logits():
    from mxmoe_jax.models import forward, from_flat_params

    require_shared(TINY_MODEL)
    cfg, flat = load_hf_flat(TINY_MODEL)
    ids = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (1, 96)), jnp.int32)
    model = from_flat_params(cfg, flat)
    ref = np.asarray(forward(model, ids))
    cfg_r, flat_r, rot = rotate_params(cfg, flat, seed=0)
    assert set(rot.down) == {192, 768}  # routed experts and the shared expert
    assert np.abs(_logits(cfg_r, flat_r, ids, rot) - ref).max() <= 1e-4


def test_rotate_model():
    from mxmoe_jax.models import forward, from_flat_params

    d = FIXTURES / "hf" / "qwen2_moe_sparse_step"  # tied embeddings: the head gets untied
    cfg, flat = load_hf_flat(d)
    ids = jnp.asarray(np.load(d / "inputs.npz")["input_ids"])
    model = from_flat_params(cfg, flat)
    rotated = rotate_model(model, seed=0, online_down=False)[0]
    assert cfg.tie_word_embeddings and not rotated.cfg.tie_word_embeddings
    ref = np.asarray(forward(model, ids))
    assert np.abs(np.asarray(forward(rotated, ids)) - ref).max() <= 1e-4
    # with the online down_proj rotation the rotated model's own forward applies it
    online, rot = rotate_model(model, seed=0, online_down=True)
    assert rot.online_down and not online.cfg.tie_word_embeddings
    assert np.abs(np.asarray(forward(online, ids)) - ref).max() <= 1e-4


def test_rotation_saved_and_loaded(tmp_path):
    cfg, flat = load_hf_flat(FIXTURES / "hf" / "deepseek_v2_lite")
    _, _, rot = rotate_params(cfg, flat, seed=11)
    assert set(rot.down) == {cfg.moe_intermediate_size, cfg.shared_intermediate_size,
                             cfg.intermediate_size}
    path = save_rotation(rot, tmp_path / "rotation.npz")
    again = load_rotation(path)
    assert again.seed == 11
    np.testing.assert_array_equal(again.residual, rot.residual)
    assert set(again.down) == set(rot.down)
    for w in rot.down:
        np.testing.assert_array_equal(again.down[w], rot.down[w])
    # the signs are a function of the seed: drawing them again gives the same vectors
    np.testing.assert_array_equal(make_rotation(cfg, 11).residual, rot.residual)
    with pytest.raises(FileNotFoundError):
        load_rotation(tmp_path / "missing.npz")


def test_unknown_parameter_is_an_error():
    cfg, flat = load_hf_flat(FIXTURES / "hf" / "mixtral")
    flat = dict(flat)
    flat["layers/0/attn/mystery/kernel"] = np.zeros((64, 64), np.float32)
    with pytest.raises(ValueError, match="mystery"):
        rotate_params(cfg, flat)
