"""`mxmoe-jax bench`: the variants it builds, its files, its refusal without a GPU, bad input."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest

from mxmoe_jax.cli import main as cli_main
from tests.conftest import FIXTURES, ON_GPU

HF = FIXTURES / "hf" / "qwen2_moe_norm"  # 2 MoE layers, 8 experts + a gated shared expert


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("qwen2-bench") / "model"
    assert cli_main(["convert", "--hf", str(HF), "--out", str(out)]) == 0
    return out


def test_stack_values_are_the_fp_weights_and_uniform_variants_quantize_them(model_dir):
    from mxmoe_jax.eval.bench_cli import stack_values, uniform_weights
    from mxmoe_jax.models.io import load_model_dir
    from mxmoe_jax.quant.scheme import QScheme

    _, model = load_model_dir(model_dir, dtype=jnp.float32)
    ex = model.layers[0].mlp.experts
    vals = stack_values(ex.weights())
    want = np.concatenate([np.asarray(ex.gate[...]), np.asarray(ex.up[...])], axis=-1)
    np.testing.assert_array_equal(np.asarray(vals["gate_up"]), want)
    np.testing.assert_array_equal(np.asarray(vals["down"]), np.asarray(ex.down[...]))
    down = np.asarray(ex.down[...])
    errs = []
    for name in ("w8a16_g-1_sym", "w2a16_g-1_sym"):
        back = np.asarray(stack_values(uniform_weights(vals, QScheme.parse(name)))["down"])
        errs.append(np.linalg.norm(back - down) / np.linalg.norm(down))
    assert 0 < errs[0] < 0.02 < errs[1]  # 8 bits near, 2 bits far


@pytest.mark.skipif(ON_GPU, reason="checks the refusal on a machine without a GPU")
def test_without_a_gpu_it_says_so_and_writes_nothing(model_dir, tmp_path, capsys):
    out = tmp_path / "b"
    assert cli_main(["bench", "--model", str(model_dir), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no NVIDIA GPU" in err[0] and "--reference" in err[0]
    assert not out.exists()


def test_reference_run_writes_rows_for_every_variant(model_dir, tmp_path):
    out = tmp_path / "b"
    schemes = ["w8a16_g-1_sym", "w2a16_g-1_sym"]
    assert cli_main(["bench", "--model", str(model_dir), "--out", str(out), "--reference",
                     "--tokens", "8", "20", "--layers", "1", "--schemes", *schemes]) == 0
    doc = json.loads((out / "bench.json").read_text())
    assert doc["format"] == "mxmoe-jax.bench/1" and doc["reference_only"] is True
    rows = {(r["tokens"], r["variant"]): r for r in doc["rows"]}
    assert set(rows) == {(t, v) for t in (8, 20) for v in ["model", "bf16", *schemes]}
    for t in (8, 20):
        assert rows[(t, "bf16")]["rel_to_bf16"] == 0.0
        assert all(r["us"] is None for r in doc["rows"])
        assert 0 < rows[(t, "w8a16_g-1_sym")]["rel_to_bf16"] < rows[(t, "w2a16_g-1_sym")][
            "rel_to_bf16"]
    md = (out / "bench.md").read_text()
    assert md.count("\n") == 2 + len(rows)
    assert not (out / "bench.png").exists()  # no times, no chart
    # a second run without --force refuses and keeps the files
    before = (out / "bench.json").read_bytes()
    assert cli_main(["bench", "--model", str(model_dir), "--out", str(out), "--reference"]) == 2
    assert (out / "bench.json").read_bytes() == before


def test_reference_run_on_a_qmodel_dir_times_its_packed_weights(model_dir, tmp_path):
    """A QMODEL_DIR's block (packed weights in its state) runs through the jitted layer with its
    weights as arguments; its own allocation is the 'model' row."""
    q = tmp_path / "q"
    assert cli_main(["quantize", "--model", str(model_dir), "--scheme", "w4a16_g-1_asym",
                     "--out", str(q)]) == 0
    out = tmp_path / "b"
    assert cli_main(["bench", "--model", str(q), "--out", str(out), "--reference",
                     "--tokens", "8", "--layers", "1", "--schemes", "w4a16_g-1_asym",
                     "w2a16_g-1_sym"]) == 0
    rows = {r["variant"]: r for r in json.loads((out / "bench.json").read_text())["rows"]}
    assert set(rows) == {"model", "bf16", "w4a16_g-1_asym", "w2a16_g-1_sym"}
    # RTN w4a16 of the model's dequantized values finds the model's own codes: the same output
    model = rows["model"]["rel_to_bf16"]
    assert 0 < model < 1e-2
    assert rows["w4a16_g-1_asym"]["rel_to_bf16"] == pytest.approx(model, rel=1e-6)
    assert rows["w2a16_g-1_sym"]["rel_to_bf16"] > 10 * model


@pytest.mark.parametrize("where", ["under_a_file", "a_file"])
def test_an_out_that_cannot_be_written_is_refused_before_measuring(model_dir, tmp_path, capsys,
                                                                    where):
    blocker = tmp_path / "blocker"
    blocker.write_text("a file")
    out = blocker / "b" if where == "under_a_file" else blocker
    assert cli_main(["bench", "--model", str(model_dir), "--out", str(out), "--reference",
                     "--tokens", "8", "--layers", "1"]) == 2
    err = capsys.readouterr().err
    # one line: the error, with no run started before it (a run prints "bench: MODEL ..." first)
    assert err.startswith("mxmoe-jax bench: error:") and err.count("\n") == 1
    assert str(blocker) in err and blocker.read_text() == "a file"


@pytest.mark.parametrize("flag,value,match", [
    ("--layers", ["5"], "not MoE layers"),
    ("--tokens", ["0"], "positive token counts"),
    ("--schemes", ["w5a16"], "w5a16"),
])
def test_bad_input_is_one_line_exit_2(model_dir, tmp_path, capsys, flag, value, match):
    out = tmp_path / "b"
    assert cli_main(["bench", "--model", str(model_dir), "--out", str(out), "--reference",
                     flag, *value]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and match in err[0]
    assert not out.exists()


@pytest.mark.gpu
def test_gpu_run_times_every_variant_on_the_kernels(model_dir, tmp_path):
    out = tmp_path / "b"
    assert cli_main(["bench", "--model", str(model_dir), "--out", str(out), "--tokens", "32",
                     "--reps", "3", "--schemes", "w8a8_g-1_sym", "w4a16_g-1_sym"]) == 0
    doc = json.loads((out / "bench.json").read_text())
    assert all(r["us"] > 0 and r["launches"] >= 1 for r in doc["rows"])
    assert all(r["rel_to_reference"] < 2e-2 for r in doc["rows"])
    assert (out / "bench.png").stat().st_size > 0
