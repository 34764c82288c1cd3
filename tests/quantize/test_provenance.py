"""A qconfig's recorded quantizer (``meta.quantizer``) against the one `quantize` / `eval` run."""

from __future__ import annotations

import json

import pytest

from mxmoe_jax.alloc.qconfig import quantizer_mismatch, quantizer_record
from mxmoe_jax.cli import main as cli_main
from tests.conftest import FIXTURES

HF = FIXTURES / "hf" / "qwen2_moe_norm"  # 2 MoE layers, 8 experts + a gated shared expert

GPTQ_META = {"model": "m", "text": ["data/books-calib.txt"], "seed": 42, "sampling": "sample",
             "method": "gptq", "hadamard": False, "metric": "layer_out_norm",
             "num_tokens": 16 * 512, "seqlen": 512, "schemes": ["w4a16_g-1_asym"]}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("qwen2") / "model"
    assert cli_main(["convert", "--hf", str(HF), "--out", str(out)]) == 0
    return out


def _qconfig(path, quantizer):
    meta = {} if quantizer == "absent" else {"quantizer": quantizer}
    layers = {str(i): {str(e): dict.fromkeys(("gate", "up", "down"), "w4a16_g-1_asym")
                       for e in range(9)} for i in range(2)}
    path.write_text(json.dumps({"format": "mxmoe-jax/qconfig/1", "meta": meta, "summary": {},
                                "layers": layers}))
    return path


def _quantize(model_dir, q, out, *extra):
    return cli_main(["quantize", "--model", str(model_dir), "--qconfig", str(q), *extra,
                     "--out", str(out)])


def test_record_from_loss_meta():
    rec = quantizer_record(GPTQ_META)
    assert rec == {"method": "gptq", "hadamard": False, "seed": 42,
                   "calibration": {"text": ["data/books-calib.txt"],
                                   "text_names": ["books-calib.txt"], "windows": 16,
                                   "seqlen": 512, "sampling": "sample"}}
    # RTN: no calibration; an old or hand-made loss.json: unknown fields stay null
    assert quantizer_record({"method": "rtn", "hadamard": True, "seed": 7,
                             "rotation_seed": 7}) == {"method": "rtn", "hadamard": True,
                                                      "seed": 7}
    assert quantizer_record({"method": "gptq"}) == {
        "method": "gptq", "hadamard": None, "seed": None,
        "calibration": {"text": None, "text_names": None, "windows": None, "seqlen": None,
                        "sampling": None}}
    assert quantizer_record({}) is None


def test_calibration_differences_are_warnings_only(tmp_path, capsys):
    from mxmoe_jax.quantize.pipeline import QuantizeConfig, check_quantizer

    calib = tmp_path / "books-calib.txt"
    calib.write_text("some text")
    q = {"meta": {"quantizer": quantizer_record(GPTQ_META)}}
    same = QuantizeConfig(method="gptq", calib=(str(calib),), calib_windows=16, seqlen=512)
    check_quantizer(q, same)
    assert capsys.readouterr().err == ""
    other = tmp_path / "wiki.txt"
    other.write_text("other text")
    check_quantizer(q, QuantizeConfig(method="gptq", calib=(str(other),), calib_windows=8,
                                      seqlen=256, seed=1))
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("warning: qconfig: this run's GPTQ calibration")
    for part in ("text wiki.txt (recorded books-calib.txt)", "windows 8 (recorded 16)",
                 "seqlen 256 (recorded 512)", "seed 1 (recorded 42)"):
        assert part in err
    # the reverse direction (RTN losses, GPTQ asked for) is an error too
    rtn = {"meta": {"quantizer": {"method": "rtn", "hadamard": False, "seed": 42}}}
    with pytest.raises(ValueError, match="solved from RTN losses.*pass --method rtn"):
        check_quantizer(rtn, same)
    # a Hadamard rotation seeded differently: a warning
    had = {"meta": {"quantizer": {"method": "rtn", "hadamard": True, "seed": 42}}}
    assert quantizer_mismatch(had, method="rtn", hadamard=True, calib=[], calib_windows=16,
                              seqlen=512, seed=3) == (
        None, ["qconfig: this run's Hadamard rotation differs from the one its losses were "
               "measured with: seed 3 (recorded 42)"])


def test_gptq_qconfig_quantized_with_rtn_is_refused(model_dir, tmp_path, capsys):
    q = _qconfig(tmp_path / "q.json", quantizer_record(GPTQ_META))
    out = tmp_path / "qmodel"
    assert _quantize(model_dir, q, out) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert (f"quantize: error: {q} was solved from GPTQ losses (calibrate --method gptq); pass "
            "--method gptq --calib FILE, or pass --allow-quantizer-mismatch to run RTN anyway"
            ) in err
    assert not out.exists()
    # eval fails the same way, before it reads the text or the tokenizer (the fixture has none)
    assert cli_main(["eval", "--model", str(model_dir), "--text", str(tmp_path / "absent.txt"),
                     "--qconfig", str(q)]) == 2
    err = capsys.readouterr().err
    assert "eval: error:" in err and "--allow-quantizer-mismatch" in err
    # the override: a loud warning, and the QMODEL_DIR is written
    assert _quantize(model_dir, q, out, "--allow-quantizer-mismatch") == 0
    err = capsys.readouterr().err
    assert f"warning: {q} was solved from GPTQ losses" in err and "runs RTN" in err
    assert (out / "qmodel.json").is_file()


def test_hadamard_mismatch_is_refused_and_no_record_is_not_checked(model_dir, tmp_path, capsys):
    q = _qconfig(tmp_path / "q.json", {"method": "rtn", "hadamard": True, "seed": 42})
    out = tmp_path / "qmodel"
    assert _quantize(model_dir, q, out) == 2
    err = capsys.readouterr().err
    assert ("solved from RTN losses of the Hadamard-rotated model (calibrate --method rtn "
            "--hadamard); pass --hadamard, or pass --allow-quantizer-mismatch to run RTN without "
            "--hadamard anyway") in err
    assert not out.exists()
    unrotated = _qconfig(tmp_path / "u.json", {"method": "rtn", "hadamard": False, "seed": 42})
    assert _quantize(model_dir, unrotated, out, "--hadamard") == 2
    assert "drop --hadamard" in capsys.readouterr().err and not out.exists()
    # older, imported or hand-written qconfigs carry no record: no check, no warning
    for name, quantizer in (("absent", "absent"), ("null", None)):
        bare = _qconfig(tmp_path / f"{name}.json", quantizer)
        assert _quantize(model_dir, bare, tmp_path / name, "--hadamard") == 0
        assert "warning" not in capsys.readouterr().err
