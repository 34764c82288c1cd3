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


# --- tampered checkpoints, outputs that cannot be written, short texts, malformed artifacts --

def _only_error_line(err: str, command: str) -> str:
    """The one error line of a CLI run: it starts its own line (a progress bar before it was
    closed), and there is no traceback."""
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if "error:" in ln]
    assert len(lines) == 1, err
    assert lines[0].startswith(f"mxmoe-jax {command}: error: "), repr(lines[0])
    return lines[0]


def _hf_copy(tmp_path, name: str = "deepseek_v2_qlora"):
    import shutil

    from tests.convert.convert_helpers import HF_FIXTURES

    dst = tmp_path / "hf"
    shutil.copytree(HF_FIXTURES / name, dst)
    return dst


def _tamper_header(path, edit) -> None:
    """Rewrite a safetensors file's JSON header through ``edit(header)``; the data stays."""
    import struct

    blob = path.read_bytes()
    n = struct.unpack("<Q", blob[:8])[0]
    header = json.loads(blob[8:8 + n])
    edit(header, sorted(k for k in header if k != "__metadata__"))
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + blob[8 + n:])


def _set(header, name, field, value):
    header[name][field] = value


@pytest.mark.parametrize("edit,needle", [
    (lambda h, ks: h[ks[0]]["data_offsets"].__setitem__(1, 10**15), "invalid"),  # huge size
    (lambda h, ks: _set(h, ks[1], "data_offsets", list(h[ks[0]]["data_offsets"])),
     "invalid offset"),  # two tensors on the same bytes
    (lambda h, ks: _set(h, ks[0], "dtype", "F33"), "unknown variant `F33`"),
    (lambda h, ks: _set(h, ks[0], "dtype", "I64"), "invalid"),  # twice the bytes F32 has
    (lambda h, ks: _set(h, ks[0], "shape", [2**62, 2**62]), "overflow"),
], ids=["huge-size", "overlapping-offsets", "unknown-dtype", "wrong-dtype", "overflowing-shape"])
def test_convert_refuses_a_tampered_safetensors_header(tmp_path, capsys, edit, needle):
    hf = _hf_copy(tmp_path)
    _tamper_header(hf / "model.safetensors", edit)
    out = tmp_path / "model"
    assert cli(["convert", "--hf", str(hf), "--out", str(out)]) == 2
    line = _only_error_line(capsys.readouterr().err, "convert")
    assert f"{hf / 'model.safetensors'}: not a readable safetensors file" in line and needle in line
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["hf"]


def test_convert_refuses_a_huge_declared_header_length(tmp_path, capsys):
    import struct

    hf = _hf_copy(tmp_path)
    path = hf / "model.safetensors"
    path.write_bytes(struct.pack("<Q", 2**62) + path.read_bytes()[8:])
    assert cli(["convert", "--hf", str(hf), "--out", str(tmp_path / "model")]) == 2
    line = _only_error_line(capsys.readouterr().err, "convert")
    assert str(path) in line and "header too large" in line


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_convert_names_a_non_finite_weight_after_closing_its_bar(tmp_path, capsys, value):
    """A NaN/Inf weight in the last shard read: the error names the file and the tensor, on its
    own line after the progress bar (which had drawn several groups by then)."""
    from safetensors.numpy import load_file, save_file

    hf = _hf_copy(tmp_path)
    tensors = load_file(hf / "model.safetensors")
    name = "model.layers.2.self_attn.q_a_proj.weight"
    tensors[name] = tensors[name].copy()
    tensors[name].flat[5] = value
    save_file(tensors, hf / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "model"
    assert cli(["convert", "--hf", str(hf), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    line = _only_error_line(err, "convert")
    assert f"{hf / 'model.safetensors'}: tensor {name} has 1 NaN or Inf value(s)" in line
    assert "convert deepseek_v2:" in err.split(line)[0]  # the bar ran, and was closed first
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["hf"]


def _tiny_model():
    from tests.convert.convert_helpers import converted

    return converted("qwen2_moe_sparse_step")


def _out_argv(command: str, out: str, tmp_path) -> list[str]:
    """A run of ``command`` that is fine but for its --out."""
    text = tmp_path / "t.txt"
    text.write_text("words " * 50)
    model = str(_tiny_model())
    return {
        "convert": ["convert", "--hf", str(_hf_copy(tmp_path)), "--out", out],
        "export-hf": ["export-hf", "--model", model, "--out", out],
        "trace": ["trace", "--model", model, "--text", str(text), "--out", out],
        "calibrate": ["calibrate", "--model", model, "--text", str(text), "--schemes",
                      "w4a16_g-1_asym", "--out", out],
        "profile": ["profile", "--analytic", "H200", "--shapes", "qwen1.5-moe", "--out", out],
        "quantize": ["quantize", "--model", model, "--scheme", "w4a16_g-1_asym", "--out", out],
    }[command]


@pytest.mark.parametrize("command", ["convert", "export-hf", "trace", "calibrate", "profile",
                                     "quantize"])
def test_an_out_under_a_file_names_the_file(tmp_path, capsys, command):
    blocker = tmp_path / "afile"
    blocker.write_text("not a folder")
    out = blocker / "sub" / "result"
    assert cli(_out_argv(command, str(out), tmp_path)) == 2
    line = _only_error_line(capsys.readouterr().err, command)
    assert f"{out}: cannot be written: {blocker} is a file, not a folder" in line
    assert "Errno" not in line and blocker.read_text() == "not a folder"


def test_run_out_under_a_file_is_one_line(tmp_path, capsys):
    """run finds it when it creates --out (not up front): still one line, exit 2. (bench too,
    but only after measuring: 20 s, not tested here.)"""
    from tests.convert.convert_helpers import HF_FIXTURES

    blocker = tmp_path / "afile"
    blocker.write_text("not a folder")
    out = blocker / "result"
    text = tmp_path / "t.txt"
    text.write_text("words " * 50)
    assert cli(["run", "--model", str(HF_FIXTURES / "qwen2_moe_sparse_step"), "--calib",
                str(text), "--eval", str(text), "--wbits", "4", "--out", str(out)]) == 2
    line = _only_error_line(capsys.readouterr().err, "run")
    assert f"{out}: Not a directory; a folder on that path is a file" in line
    assert blocker.read_text() == "not a folder"


@pytest.mark.parametrize("command", ["convert", "profile"])
def test_an_out_in_a_folder_that_is_not_writable(tmp_path, capsys, command):
    import os

    if os.geteuid() == 0:  # root writes anywhere but where the kernel refuses: /sys
        if not os.path.isdir("/sys") or os.access("/sys", os.W_OK) and _mkdir_works("/sys"):
            pytest.skip("running as root and /sys accepts new folders")
        parent = "/sys"
    else:
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o555)
        parent = str(locked)
    out = os.path.join(parent, "mxmoe-out")
    assert cli(_out_argv(command, out, tmp_path)) == 2
    line = _only_error_line(capsys.readouterr().err, command)
    assert f"{out}: cannot be written" in line and "choose" in line
    assert not os.path.exists(out)


def _mkdir_works(parent: str) -> bool:
    import os

    probe = os.path.join(parent, f".mxmoe-probe-{os.getpid()}")
    try:
        os.mkdir(probe)
    except OSError:
        return False
    os.rmdir(probe)
    return True


def test_a_json_out_that_is_a_folder(tmp_path, capsys):
    out = tmp_path / "perf.json"
    out.mkdir()
    assert cli(_out_argv("profile", str(out), tmp_path) + ["--force"]) == 2
    line = _only_error_line(capsys.readouterr().err, "profile")
    assert f"{out} is a folder" in line and not any(out.iterdir())


@pytest.mark.parametrize("command", ["trace", "calibrate", "eval"])
@pytest.mark.parametrize("body", ["", "two words"])
def test_a_text_too_short_for_one_window_names_the_file(tiny_model_dir, tmp_path, capsys,
                                                        command, body):
    text = tmp_path / "short.txt"
    text.write_text(body)
    out = tmp_path / "out.json"
    argv = {"trace": ["trace", "--out", str(out)],
            "calibrate": ["calibrate", "--schemes", "w4a16_g-1_asym", "--out", str(out)],
            "eval": ["eval"]}[command]
    rc = cli([*argv, "--model", str(tiny_model_dir), "--text", str(text), "--seqlen", "64"])
    line = _only_error_line(capsys.readouterr().err, command)
    assert rc == 2 and f"{text}: " in line and "too few for one window of --seqlen 64" in line
    assert not out.exists()


@pytest.fixture(scope="module")
def solve_files():
    from mxmoe_jax.alloc.check_uniform import perf_for_trace
    from mxmoe_jax.alloc.synthetic import synthetic_loss, synthetic_trace

    schemes = ["w16a16", "w4a16_g-1_asym"]
    trace = synthetic_trace(num_layers=2, num_experts=4, top_k=2, moe_inter=64, hidden=128,
                            shared_ratio=0, num_tokens=128, seed=2)
    return {"trace": trace, "loss": synthetic_loss(trace, schemes, seed=2),
            "perf": perf_for_trace(trace, schemes).table}


def _first(d: dict):
    return d[next(iter(d))]


@pytest.mark.parametrize("which,edit,needle", [
    ("trace", lambda t: t.__setitem__("NK", "64x128"), "NK must be"),
    ("trace", lambda t: t["layer-0"].__setitem__("access_freq", ["many"] * 4),
     "layer-0.access_freq must be"),
    ("trace", lambda t: t.__setitem__("num_tokens", None), "num_tokens must be"),
    ("loss", lambda lo: lo["losses"].__setitem__("w5a16_gx", lo["losses"]["w16a16"]),
     "losses: scheme 'w5a16_gx'"),
    ("loss", lambda lo: _first(lo["losses"]["w16a16"]).__setitem__("0", "small"),
     "losses.w16a16.0.0 must be"),
    ("loss", lambda lo: lo.__setitem__("meta", ["rtn"]), "meta must be an object"),
    ("perf", lambda p: p["points"][0].pop("time_us"), "points[0] is malformed"),
    ("perf", lambda p: p["points"][0].__setitem__("time_us", float("inf")), "points[0] has"),
    ("perf", lambda p: p["points"][0].__setitem__("scheme", "w4a16_gbig"), "points[0] is"),
    ("perf", lambda p: p.__setitem__("launch_us", "fast"), "launch_us must be a number"),
], ids=["trace-NK-str", "trace-freq-str", "trace-tokens-null", "loss-unknown-scheme",
        "loss-row-str", "loss-meta-list", "perf-missing-time", "perf-inf-time",
        "perf-unknown-scheme", "perf-launch-str"])
def test_solve_names_the_file_and_field_of_a_malformed_artifact(solve_files, tmp_path, capsys,
                                                                which, edit, needle):
    import copy

    files = copy.deepcopy(solve_files)
    edit(files[which])
    for name, obj in files.items():
        (tmp_path / f"{name}.json").write_text(json.dumps(obj))
    out = tmp_path / "q.json"
    argv = ["solve", "--wbits", "5", "--out", str(out), "--no-plots",
            *(a for n in files for a in (f"--{n}", str(tmp_path / f"{n}.json")))]
    assert cli(argv) == 2
    line = _only_error_line(capsys.readouterr().err, "solve")
    assert f"{tmp_path / which}.json" in line and needle in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["loss.json", "perf.json",
                                                          "trace.json"]


def test_solve_on_the_unedited_artifacts_works(solve_files, tmp_path):
    """The control of the test above: the same files, unedited, solve."""
    for name, obj in solve_files.items():
        (tmp_path / f"{name}.json").write_text(json.dumps(obj))
    argv = ["solve", "--wbits", "5", "--out", str(tmp_path / "q.json"), "--no-plots",
            *(a for n in solve_files for a in (f"--{n}", str(tmp_path / f"{n}.json")))]
    assert cli(argv) == 0 and (tmp_path / "q.json").is_file()


def _fixture_qconfig():
    from mxmoe_jax.alloc.qconfig import Allocation, make_qconfig
    from mxmoe_jax.models.io import load_config

    cfg = load_config(_tiny_model())
    layers = Allocation.uniform(cfg, "w4a16_g-1_asym").to_layers()
    return make_qconfig(layers, meta={"model_fingerprint": cfg.fingerprint()}, summary={})


def _expert(q, layer="1", expert="0"):  # layer 1 is the fixture's one MoE layer
    return q["layers"][layer][expert]


@pytest.mark.parametrize("edit,needle", [
    (lambda q: _expert(q).__setitem__("down", "w5a16_gx"), "layer 1 expert 0 down: scheme"),
    (lambda q: _expert(q).update(gate="w4a16_g100_asym", up="w4a16_g100_asym"),
     "layer 1 expert 0 gate: scheme 'w4a16_g100_asym': group_size: 100"),
    (lambda q: q["layers"]["1"].__setitem__("9", dict(_expert(q))), "layer 1 has no expert 9"),
    (lambda q: q["layers"].__setitem__("7", q["layers"]["1"]), "layer 7 is not a layer"),
    (lambda q: _expert(q).pop("down"), "layer 1 expert 0 needs exactly"),
    (lambda q: q["layers"].__setitem__("1", ["w4a16_g-1_asym"]), "layers.1 must be"),
    (lambda q: q.pop("layers"), "'layers' must be a non-empty object"),
], ids=["unknown-scheme", "bad-group-size", "expert-count", "layer-count", "missing-block",
        "wrong-type", "missing-key"])
@pytest.mark.parametrize("command", ["quantize", "eval"])
def test_quantize_and_eval_name_the_file_and_field_of_a_bad_qconfig(tmp_path, capsys, edit,
                                                                    needle, command):
    q = _fixture_qconfig()
    edit(q)
    path = tmp_path / "qconfig.json"
    path.write_text(json.dumps(q))
    argv = {"quantize": ["--out", str(tmp_path / "qmodel")],
            "eval": _fixture_eval_args(tmp_path)}[command]
    rc = cli([command, "--model", str(_tiny_model()), "--qconfig", str(path), *argv])
    line = _only_error_line(capsys.readouterr().err, command)
    assert rc == 2 and f"{path}: " in line and needle in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) in (["qconfig.json"],
                                                          ["qconfig.json", "t.txt", "tok"])


def _fixture_eval_args(tmp_path) -> list[str]:
    """eval's --tokenizer and --text for the fixture model (vocabulary 128, no tokenizer)."""
    tok = _word_tokenizer(tmp_path / "tok", 128)
    text = tmp_path / "t.txt"
    text.write_text(" ".join(f"w{i % 127 + 1}" for i in range(200)))
    return ["--tokenizer", str(tok), "--text", str(text), "--seqlen", "16", "--max-windows", "1"]


@pytest.mark.parametrize("command", ["quantize", "eval"])
def test_quantize_and_eval_with_the_unedited_qconfig_work(tmp_path, command):
    """The control of the test above."""
    path = tmp_path / "qconfig.json"
    path.write_text(json.dumps(_fixture_qconfig()))
    argv = {"quantize": ["--out", str(tmp_path / "qmodel")],
            "eval": _fixture_eval_args(tmp_path)}[command]
    assert cli([command, "--model", str(_tiny_model()), "--qconfig", str(path), *argv]) == 0


def test_debug_shows_the_traceback(tmp_path):
    for name in ("trace", "loss", "perf"):
        (tmp_path / f"{name}.json").write_text("[]")
    argv = ["solve", "--trace", str(tmp_path / "trace.json"), "--loss",
            str(tmp_path / "loss.json"), "--perf", str(tmp_path / "perf.json"), "--wbits", "4",
            "--out", str(tmp_path / "q.json")]
    assert cli(argv) == 2
    with pytest.raises(ValueError, match="holds a JSON list"):
        cli(["--debug", *argv])
