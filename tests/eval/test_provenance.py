"""`eval --qconfig` with a quantizer other than the recorded one: refused, or run with a warning."""

from __future__ import annotations

import json

from conftest import BOOKS_EVAL, require_shared

from mxmoe_jax.cli import main as cli_main


def _qconfig(path, quantizer):
    # the tiny model: 6 MoE layers of 16 routed experts + the shared expert (index 16)
    layers = {str(i): {str(e): dict.fromkeys(("gate", "up", "down"), "w4a16_g-1_asym")
                       for e in range(17)} for i in range(6)}
    path.write_text(json.dumps({"format": "mxmoe-jax/qconfig/1", "meta": {"quantizer": quantizer},
                                "layers": layers, "summary": {}}))
    return path


def test_eval_checks_the_recorded_quantizer(tiny_model_dir, tmp_path, capsys):
    require_shared(BOOKS_EVAL)
    q = _qconfig(tmp_path / "q.json", {"method": "gptq", "hadamard": False, "seed": 42,
                                       "calibration": None})
    args = ["eval", "--model", str(tiny_model_dir), "--text", str(BOOKS_EVAL), "--seqlen", "64",
            "--max-windows", "1", "--json", "--qconfig", str(q)]
    assert cli_main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "was solved from GPTQ losses" in err
    assert cli_main(args + ["--allow-quantizer-mismatch"]) == 0
    captured = capsys.readouterr()
    assert f"warning: {q} was solved from GPTQ losses" in captured.err
    assert json.loads(captured.out.strip().splitlines()[-1])["ppl"] > 1.0
