"""`mxmoe-jax run` end to end on the embedded default (few steps, few tokens): every artifact."""

from __future__ import annotations

import json

import pytest

from mxmoe_jax.cli import main as cli_main
from tests.conftest import ON_GPU

RUN = ["--train-steps", "3", "--seqlen", "64", "--nsamples", "2", "--max-windows", "2",
       "--wbits", "3.25"]


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """One uninterrupted run of the embedded default (few steps, few tokens)."""
    pytest.importorskip("pulp", reason="run's solve stage needs PuLP, which is not installed here")
    out = tmp_path_factory.mktemp("run") / "run"
    assert cli_main(["run", "--out", str(out), *RUN]) == 0
    return out


def _ppl(out):
    return json.loads((out / "report.json").read_text())["stages"]["eval"]["result"]["ppl"]


@pytest.mark.slow
def test_run_default_writes_every_stage(full_run):
    out = full_run
    for name in ("hf/config.json", "hf/tokenizer.json", "model/model.json", "trace.json",
                 "trace.png", "loss.json", "perf.json", "qconfig.json", "qconfig.frontier.png",
                 "qconfig.heatmap.png", "qmodel/qmodel.json", "stages.json", "report.json",
                 "report.md"):
        assert (out / name).is_file(), name
    ppl = _ppl(out)
    assert set(ppl) >= {"fp32", "w3a16_g128_asym", "mixed (solve, 3.25 bits)"}
    assert all(v["ppl"] > 1 for v in ppl.values())
    q = json.loads((out / "qconfig.json").read_text())
    assert q["summary"]["wbits"] <= 3.25 + 1e-9
    md = (out / "report.md").read_text()
    assert "| mixed (solve, 3.25 bits) |" in md
    for png in ("trace.png", "qconfig.frontier.png", "qconfig.heatmap.png"):
        assert f"]({png})" in md
    assert "analytic roofline" in md  # where the kernel times come from, said plainly
    if not ON_GPU:
        assert "Layer speed: not measured: no NVIDIA GPU" in md


@pytest.mark.slow
def test_a_killed_run_resumes_to_the_same_numbers(full_run, tmp_path, monkeypatch):
    """Killed during quantize, then rerun: the finished stages are reused, the rest redone, and
    the report's numbers equal the uninterrupted run's."""
    from mxmoe_jax import pipeline

    out = tmp_path / "run"
    real = pipeline._cli

    def killed_at_quantize(argv):
        if argv[0] == "quantize":
            raise KeyboardInterrupt
        real(argv)

    monkeypatch.setattr(pipeline, "_cli", killed_at_quantize)
    assert cli_main(["run", "--out", str(out), *RUN]) == 130  # Ctrl-C: one line, exit 130
    assert not (out / "report.json").exists()
    monkeypatch.setattr(pipeline, "_cli", real)
    assert cli_main(["run", "--out", str(out), *RUN]) == 0
    stages = json.loads((out / "report.json").read_text())["stages"]
    assert all(stages[s].get("reused") for s in ("train default model", "convert", "trace",
                                                 "calibrate", "profile", "solve"))
    assert not stages["quantize"].get("reused") and not stages["eval"].get("reused")
    assert _ppl(out) == _ppl(full_run)
    # a changed setting redoes that stage and every later one
    assert cli_main(["run", "--out", str(out), *RUN[:-1], "3.5"]) == 0
    stages = json.loads((out / "report.json").read_text())["stages"]
    assert stages["calibrate"].get("reused") and not stages["solve"].get("reused")
    assert not stages["eval"].get("reused")
    # --shapes-of adds a solve at a preset's shapes; everything else is reused
    assert cli_main(["run", "--out", str(out), *RUN[:-1], "3.5", "--shapes-of",
                     "deepseek-v2-lite"]) == 0
    stages = json.loads((out / "report.json").read_text())["stages"]
    extra = stages.pop("solve at deepseek-v2-lite shapes")
    assert all(r.get("reused") for r in stages.values()) and not extra.get("reused")
    q = json.loads((out / "qconfig-deepseek-v2-lite.json").read_text())
    assert sorted(q["layers"], key=int) == [str(i) for i in range(26)]
    assert len(q["layers"]["0"]) == 65  # 64 routed experts + the shared one
    md = (out / "report.md").read_text()
    assert "Accuracy comes from this model; speed from the deepseek-v2-lite shapes" in md


def test_run_refuses_a_non_empty_folder_that_is_not_a_run(tmp_path, capsys):
    (tmp_path / "keep.txt").write_text("x")
    for extra in ([], ["--fresh"]):
        assert cli_main(["run", "--out", str(tmp_path), *extra]) == 2
        assert "not empty and not a run folder" in capsys.readouterr().err
        assert (tmp_path / "keep.txt").read_text() == "x"


def test_run_with_a_model_needs_texts(tmp_path, capsys):
    assert cli_main(["run", "--model", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "--calib and --eval are required" in capsys.readouterr().err


def test_run_devices_past_the_devices_here_is_refused_first(tmp_path, capsys):
    import jax

    n = len(jax.devices()) + 1
    out = tmp_path / "o"
    assert cli_main(["run", "--devices", str(n), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"--devices: {n} is not between 1 and the {n - 1} JAX devices" in err
    assert "xla_force_host_platform_device_count" in err and not out.exists()
