"""`mxmoe-jax run` end to end on the embedded default (few steps, few tokens): every artifact."""

from __future__ import annotations

import json

import pytest

from mxmoe_jax.cli import main as cli_main


@pytest.mark.slow
def test_run_default_writes_every_stage(tmp_path, capsys):
    pytest.importorskip("pulp", reason="run's solve stage needs PuLP, which is not installed here")
    out = tmp_path / "run"
    rc = cli_main(["run", "--out", str(out), "--train-steps", "3", "--seqlen", "64",
                   "--nsamples", "2", "--max-windows", "2", "--wbits", "3.25"])
    assert rc == 0
    for name in ("hf/config.json", "hf/tokenizer.json", "model/model.json", "trace.json",
                 "trace.png", "loss.json", "perf.json", "qconfig.json", "report.json",
                 "report.md"):
        assert (out / name).is_file(), name
    report = json.loads((out / "report.json").read_text())
    ppl = report["stages"]["eval"]["ppl"]
    assert set(ppl) >= {"fp32", "w3a16_g128_asym", "mixed (solve, 3.25 bits)"}
    assert all(v["ppl"] > 1 for v in ppl.values())
    q = json.loads((out / "qconfig.json").read_text())
    assert q["summary"]["wbits"] <= 3.25 + 1e-9
    assert "| mixed (solve, 3.25 bits) |" in capsys.readouterr().out


def test_run_refuses_a_non_empty_out_without_force(tmp_path, capsys):
    (tmp_path / "keep.txt").write_text("x")
    assert cli_main(["run", "--out", str(tmp_path)]) == 2
    assert "not empty" in capsys.readouterr().err
    assert (tmp_path / "keep.txt").read_text() == "x"


def test_run_with_a_model_needs_texts(tmp_path, capsys):
    assert cli_main(["run", "--model", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "--calib and --eval are required" in capsys.readouterr().err
