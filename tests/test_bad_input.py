"""Bad input a new user tried, each with a one-line error and exit 2 (or 130 for Ctrl-C)."""

from __future__ import annotations

import json

import pytest

from mxmoe_jax.cli import main as cli
from mxmoe_jax.jsonio import read_json
from tests.conftest import WIKITEXT, require_shared


def _word_tokenizer(path, size: int):
    """A word-level HF tokenizer folder with ``size`` tokens (another model's vocabulary)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[UNK]": 0, **{f"w{i}": i for i in range(1, size)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    path.mkdir()
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "unk_token": "[UNK]"}))
    return path


@pytest.mark.parametrize("size", [50, 9000])  # far fewer, or more, than the 8192 embedding rows
def test_eval_refuses_another_models_tokenizer(tiny_model_dir, tmp_path, capsys, size):
    require_shared(WIKITEXT)
    tok = _word_tokenizer(tmp_path / "tok", size)
    rc = cli(["eval", "--model", str(tiny_model_dir), "--text", str(WIKITEXT), "--tokenizer",
              str(tok), "--seqlen", "64", "--max-windows", "1"])
    err = capsys.readouterr().err
    assert rc == 2 and f"has {size} tokens but the model's embedding has 8192 rows" in err
    assert "Traceback" not in err


def test_eval_refuses_windows_past_the_context(tiny_model_dir, capsys):
    require_shared(WIKITEXT)
    from mxmoe_jax.models.io import load_config

    limit = load_config(tiny_model_dir).max_position_embeddings
    rc = cli(["eval", "--model", str(tiny_model_dir), "--text", str(WIKITEXT), "--seqlen",
              str(limit + 1)])
    assert rc == 2 and f"longer than the model's context (max_position_embeddings = {limit})" \
        in capsys.readouterr().err


def test_eval_names_a_missing_model_folder(tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text("some words")
    rc = cli(["eval", "--model", str(tmp_path / "nowhere"), "--text", str(text)])
    err = capsys.readouterr().err
    assert rc == 2 and "nowhere is not a folder" in err and "--tokenizer" not in err


@pytest.mark.parametrize("body,what", [("[1, 2]", "JSON list"), ('"x"', "JSON str"),
                                       (b"\xff\xfe\x00", "not valid JSON")])
def test_json_artifacts_must_be_objects(tmp_path, body, what):
    path = tmp_path / "loss.json"
    path.write_bytes(body if isinstance(body, bytes) else body.encode())
    with pytest.raises(ValueError, match=what):
        read_json(path, "loss table")


def test_solve_on_a_loss_json_list_is_one_line(tmp_path, capsys):
    for name in ("trace", "loss", "perf"):
        (tmp_path / f"{name}.json").write_text("[]")
    rc = cli(["solve", "--trace", str(tmp_path / "trace.json"), "--loss",
              str(tmp_path / "loss.json"), "--perf", str(tmp_path / "perf.json"), "--wbits", "4",
              "--out", str(tmp_path / "q.json")])
    err = capsys.readouterr().err
    assert rc == 2 and "holds a JSON list" in err and "Traceback" not in err
    assert not (tmp_path / "q.json").exists()


def test_ctrl_c_is_one_line_and_exit_130(tmp_path, capsys, monkeypatch):
    import mxmoe_jax.perf.analytic as analytic

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(analytic, "analytic_table", interrupted)
    out = tmp_path / "perf.json"
    rc = cli(["profile", "--analytic", "H200", "--shapes", "qwen1.5-moe", "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 130 and "profile: interrupted" in err and not out.exists()


def test_run_argument_errors_leave_no_out_folder(tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text("words")
    out = tmp_path / "run"
    base = ["run", "--calib", str(text), "--eval", str(text), "--wbits", "3", "--out", str(out)]
    assert cli([*base, "--model", str(tmp_path / "none")]) == 2
    assert "has no config.json" in capsys.readouterr().err and not out.exists()
    bad = tmp_path / "hf"
    bad.mkdir()
    (bad / "config.json").write_text("{}")  # no model_type: convert refuses it
    assert cli([*base, "--model", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "model_type" in err and "Traceback" not in err
    assert not out.exists() or any(out.iterdir())  # never an empty --out


def test_subcommands_that_do_not_solve_run_without_pulp(tmp_path):
    """The GPU machine has no PuLP: convert, eval, quantize, profile and bench must not import it
    (each call below gets past its imports to its own error or result)."""
    import subprocess
    import sys

    text = tmp_path / "t.txt"
    text.write_text("words")
    nowhere = str(tmp_path / "nowhere")
    prog = f"""
import sys
sys.modules["pulp"] = None  # any `import pulp` now raises ImportError
from mxmoe_jax.cli import main
codes = [
    main(["convert", "--hf", {nowhere!r}, "--out", {str(tmp_path / "m")!r}]),
    main(["eval", "--model", {nowhere!r}, "--text", {str(text)!r}]),
    main(["quantize", "--model", {nowhere!r}, "--scheme", "w4a16_g128_asym", "--out",
          {str(tmp_path / "q")!r}]),
    main(["bench", "--model", {nowhere!r}, "--out", {str(tmp_path / "b")!r}]),
    main(["profile", "--analytic", "H200", "--shapes", "qwen1.5-moe", "--out",
          {str(tmp_path / "p.json")!r}]),
]
print("codes", codes)
"""
    res = subprocess.run([sys.executable, "-c", prog], capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "codes [2, 2, 2, 2, 0]" in res.stdout, res.stdout + res.stderr[-2000:]
    assert "pulp" not in res.stderr.lower()


def test_solve_refuses_a_loss_table_of_another_model(tmp_path):
    """A 4-layer 8-expert trace with a 6-layer 16-expert loss table (or a different
    fingerprint) is refused, not solved into a 4-layer qconfig."""
    from mxmoe_jax.alloc.check_uniform import perf_for_trace
    from mxmoe_jax.alloc.problem import build_inputs
    from mxmoe_jax.alloc.synthetic import synthetic_loss, synthetic_trace

    schemes = ["w16a16", "w4a16_g-1_asym"]
    small = synthetic_trace(num_layers=4, num_experts=8, top_k=2, moe_inter=64, hidden=128,
                            shared_ratio=0, num_tokens=256, seed=1)
    big = synthetic_trace(num_layers=6, num_experts=16, top_k=2, moe_inter=64, hidden=128,
                          shared_ratio=0, num_tokens=256, seed=1)
    perf = perf_for_trace(small, schemes)
    with pytest.raises(ValueError, match="not of the same model"):
        build_inputs(small, synthetic_loss(big, schemes, seed=1), perf, batch=64)
    fewer_layers_more_experts = synthetic_loss(big, schemes, seed=1)
    for table in fewer_layers_more_experts["losses"].values():
        for layer in ("4", "5"):
            table.pop(layer, None)
    with pytest.raises(ValueError, match="has 16 experts, trace 8"):
        build_inputs(small, fewer_layers_more_experts, perf, batch=64)
    loss = synthetic_loss(small, schemes, seed=1)
    build_inputs(small, loss, perf, batch=64)  # the same model: fine
    other = dict(small, model_fingerprint="qwen2_moe-aaaaaaaaaaaa")
    loss["meta"] = dict(loss.get("meta", {}), model_fingerprint="qwen2_moe-bbbbbbbbbbbb")
    with pytest.raises(ValueError, match="different models"):
        build_inputs(other, loss, perf, batch=64)


def test_qconfig_of_another_model_is_refused_by_its_fingerprint():
    from mxmoe_jax.alloc.qconfig import Allocation, make_qconfig
    from mxmoe_jax.config import ModelConfig
    from tests.models.test_moe import tiny_cfg

    cfg = tiny_cfg()
    layers = Allocation.uniform(cfg, "w4a16_g-1_asym").to_layers()
    q = make_qconfig(layers, meta={"model_fingerprint": cfg.fingerprint()}, summary={})
    Allocation.from_qconfig(cfg, q)  # its own model: fine
    wider = ModelConfig.from_dict(dict(cfg.to_dict(), vocab_size=cfg.vocab_size + 64))
    assert wider.fingerprint() != cfg.fingerprint()
    with pytest.raises(ValueError, match="made for model"):
        Allocation.from_qconfig(wider, q)
