"""Quantized evaluation: qconfig plans, uniform schemes, rotation, on the tiny trained model."""

from __future__ import annotations

import json

import pytest
from conftest import BOOKS_EVAL, require_shared

from mxmoe_jax.cli import main as cli_main


def _ppl(capsys, model_dir, *extra) -> float:
    rc = cli_main(["eval", "--model", str(model_dir), "--text", str(BOOKS_EVAL), "--seqlen", "256",
                   "--max-windows", "2", "--json", *extra])
    assert rc == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])["ppl"]


def _qconfig(path, cfg_layers, experts, scheme_of):
    layers = {str(i): {str(e): {b: scheme_of(i, e, b) for b in ("gate", "up", "down")}
                       for e in range(experts)} for i in cfg_layers}
    path.write_text(json.dumps({"format": "mxmoe-jax/qconfig/1", "meta": {}, "layers": layers,
                                "summary": {}}))
    return path


@pytest.mark.slow
def test_uniform_qconfig_equals_scheme_and_bits_order(tiny_model_dir, tmp_path, capsys):
    require_shared(BOOKS_EVAL)
    fp = _ppl(capsys, tiny_model_dir)
    w8 = _ppl(capsys, tiny_model_dir, "--scheme", "w8a16_g-1_asym")
    w2 = _ppl(capsys, tiny_model_dir, "--scheme", "w2a16_g64_asym")
    # 16 routed experts + the shared expert (index 16), 6 MoE layers
    q = _qconfig(tmp_path / "q.json", range(6), 17, lambda i, e, b: "w2a16_g64_asym")
    w2_q = _ppl(capsys, tiny_model_dir, "--qconfig", str(q))
    assert w2_q == pytest.approx(w2, rel=1e-6)
    assert abs(w8 - fp) / fp < 0.01 < (w2 - fp) / fp
    # mixed: w8 everywhere but the down blocks at w2 lies between the two uniform ones
    mixed = _qconfig(tmp_path / "m.json", range(6), 17,
                     lambda i, e, b: "w2a16_g64_asym" if b == "down" else "w8a16_g-1_asym")
    mid = _ppl(capsys, tiny_model_dir, "--qconfig", str(mixed))
    assert w8 < mid < w2


@pytest.mark.slow
def test_rotation_alone_keeps_the_perplexity(tiny_model_dir, capsys):
    require_shared(BOOKS_EVAL)
    fp = _ppl(capsys, tiny_model_dir)
    assert _ppl(capsys, tiny_model_dir, "--hadamard") == pytest.approx(fp, rel=1e-4)


def test_bad_qconfig_is_a_clear_error(tiny_model_dir, tmp_path, capsys):
    require_shared(BOOKS_EVAL)
    q = _qconfig(tmp_path / "q.json", [99], 1, lambda i, e, b: "w4a16_g-1_asym")
    rc = cli_main(["eval", "--model", str(tiny_model_dir), "--text", str(BOOKS_EVAL),
                   "--seqlen", "256", "--max-windows", "1", "--qconfig", str(q)])
    assert rc == 2
    assert "layer 99 is not a layer of this model" in capsys.readouterr().err
