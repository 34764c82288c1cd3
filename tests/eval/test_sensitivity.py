"""`mxmoe-jax sensitivity` and `solve --sensitivity`: per-layer loss per unit of Δ², checked by
brute force (the layer's weights replaced in the FP model, NLL and block outputs in NumPy)."""

from __future__ import annotations

import dataclasses
import json

import jax.numpy as jnp
import numpy as np
import pytest

from mxmoe_jax.alloc.problem import group_arrays, layer_weights, weigh_layers
from mxmoe_jax.cli import main as cli_main
from mxmoe_jax.eval.sensitivity import measure_sensitivity
from mxmoe_jax.quant.rtn import fake_quant_weight
from tests.conftest import FIXTURES

SCHEME = "w2a16_g-1_asym"


def _np_nll(logits, ids) -> float:
    z = np.asarray(logits, np.float64)[:, :-1]
    z = z - z.max(axis=-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=-1, keepdims=True))
    return float(-np.take_along_axis(logp, ids[:, 1:, None], axis=-1).mean())


def _brute(model, ids, layer):
    """(NLL increase, Σ ||Ô − O||² of the MoE block) with layer ``layer``'s expert weights
    replaced by their RTN fake quantization in the FP model's own parameters."""
    from mxmoe_jax.models import forward, forward_hidden

    mlp = model.layers[layer].mlp
    params = [getattr(mlp.experts, b) for b in ("gate", "up", "down")]
    if getattr(mlp, "shared", None) is not None:
        params += [getattr(mlp.shared, f"{b}_proj").kernel for b in ("gate", "up", "down")]
    x = forward_hidden(model, jnp.asarray(ids), capture=[layer], with_logits=False)[1][layer]
    fp_out = np.asarray(mlp(x), np.float64)
    fp_nll = _np_nll(forward(model, jnp.asarray(ids)), ids)
    saved = [p[...] for p in params]
    try:
        for p in params:
            p[...] = fake_quant_weight(p[...], SCHEME)
        q_out = np.asarray(mlp(x), np.float64)
        q_nll = _np_nll(forward(model, jnp.asarray(ids)), ids)
    finally:
        for p, v in zip(params, saved, strict=True):
            p[...] = v
    return q_nll - fp_nll, float(np.sum((q_out - fp_out) ** 2))


# shared experts with a gate; no shared expert; a dense first layer plus shared experts (the
# other families' MoE blocks are the same code: models/moe.py)
@pytest.mark.parametrize("family", ["qwen2_moe_norm", "mixtral", "deepseek_v2_lite"])
def test_sensitivity_equals_brute_force(family, tmp_path):
    """Routed experts and the shared ones where there are; dense layers are not measured."""
    from mxmoe_jax.models.io import load_model_dir

    hf = FIXTURES / "hf" / family
    assert cli_main(["convert", "--hf", str(hf), "--out", str(tmp_path / "m")]) == 0
    model = load_model_dir(tmp_path / "m", dtype=jnp.float32)[1]
    ids = np.asarray(np.load(hf / "inputs.npz")["input_ids"])
    sens = measure_sensitivity(model, ids, SCHEME, batch=1)
    assert sens["meta"]["scheme"] == SCHEME
    assert sorted(sens["layers"], key=int) == [str(i) for i in model.cfg.moe_layers]
    for li, got in sens["layers"].items():
        dnll, sq = _brute(model, ids, int(li))
        assert sq > 0
        np.testing.assert_allclose(got["delta_sq"], sq, rtol=1e-4)
        np.testing.assert_allclose(got["dnll"], dnll, rtol=1e-3, atol=1e-6)
        assert got["alpha"] == pytest.approx(got["dnll"] / got["delta_sq"])


def test_layer_weights_and_weighing():
    sens = {"layers": {"0": {"alpha": 3.0}, "1": {"alpha": 1.0}}}
    w = layer_weights(sens, ["0", "1"])
    assert w == pytest.approx({"0": 1.5, "1": 0.5})  # mean 1
    with pytest.raises(ValueError, match="no measurement for layers"):
        layer_weights(sens, ["0", "2"])
    with pytest.raises(ValueError, match="no positive alpha"):
        layer_weights({"layers": {"0": {"alpha": 0.0}}}, ["0"])

    @dataclasses.dataclass(frozen=True)
    class Layer:  # the fields group_arrays reads
        layer: str
        loss: np.ndarray
        time: np.ndarray
        bpw: np.ndarray
        abpw: np.ndarray
        size: np.ndarray

    @dataclasses.dataclass(frozen=True)
    class Inputs:
        layers: list

    rng = np.random.default_rng(0)
    layers = [Layer(li, rng.uniform(0.1, 1, (3, 3, 2)), np.ones((3, 2, 2)), np.ones((3, 2, 2)),
                    np.ones((3, 2, 2)), np.ones((3, 2))) for li in ("0", "1")]
    for proxy in ("squared", "frobenius"):
        weighed = weigh_layers(Inputs(layers), w, proxy)
        for a, b in zip(layers, weighed.layers, strict=True):
            np.testing.assert_allclose(group_arrays(b, proxy)["loss"],
                                       w[a.layer] * group_arrays(a, proxy)["loss"])


def test_cli_writes_and_refuses(tiny_model_dir, tmp_path, capsys):
    text = tmp_path / "calib.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 40)
    out = tmp_path / "sens.json"
    args = ["sensitivity", "--model", str(tiny_model_dir), "--text", str(text), "--seqlen", "16",
            "--nsamples", "2", "--layers", "0", "5", "--out", str(out)]
    assert cli_main(args) == 0
    sens = json.loads(out.read_text())
    assert sens["format"] == "mxmoe-jax/sensitivity/1" and sorted(sens["layers"]) == ["0", "5"]
    assert cli_main(args) == 2  # exists, no --force
    assert "--force" in capsys.readouterr().err
    missing = tmp_path / "nothing.txt"
    assert cli_main([*args[:4], str(missing), *args[5:-1], str(tmp_path / "other.json")]) == 2
    assert not (tmp_path / "other.json").exists()
    assert cli_main([*args, "--force", "--scheme", "w16a16"]) == 2
