"""Bad input gets a clear error naming the problem, and nothing half-written appears at --out."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from convert_helpers import HF_FIXTURES, converted
from mxmoe_jax.convert.export import export_hf
from mxmoe_jax.convert.hf_to_flax import convert_hf
from safetensors.numpy import load_file, save_file

from mxmoe_jax.cli import main as cli_main
from mxmoe_jax.models import io

SINGLE = "deepseek_v2_qlora"  # one model.safetensors
SHARDED = "qwen2_moe_sparse_step"  # model.safetensors.index.json + 9 shards


def _copy(name: str, tmp_path: Path) -> Path:
    dst = tmp_path / "hf"
    shutil.copytree(HF_FIXTURES / name, dst)
    return dst


def _assert_nothing_written(tmp_path: Path, out: Path) -> None:
    assert not out.exists(), f"{out} was created"
    leftovers = [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]
    assert not leftovers, f"temporary folders left behind: {leftovers}"


def _convert_fails(hf: Path, tmp_path: Path, err_type, *needles: str) -> str:
    out = tmp_path / "model"
    with pytest.raises(err_type) as info:
        convert_hf(hf, out, "fp32")
    msg = str(info.value)
    for needle in needles:
        assert needle in msg, f"{needle!r} not in error: {msg}"
    _assert_nothing_written(tmp_path, out)
    return msg


def test_missing_config(tmp_path):
    hf = _copy(SINGLE, tmp_path)
    (hf / "config.json").unlink()
    _convert_fails(hf, tmp_path, FileNotFoundError, "no config.json")


def test_broken_config_json(tmp_path):
    hf = _copy(SINGLE, tmp_path)
    (hf / "config.json").write_text("{not json")
    _convert_fails(hf, tmp_path, ValueError, "config.json", "not valid JSON")


def test_unknown_model_type(tmp_path):
    hf = _copy(SINGLE, tmp_path)
    cfg = json.loads((hf / "config.json").read_text())
    cfg["model_type"] = "llama"
    (hf / "config.json").write_text(json.dumps(cfg))
    msg = _convert_fails(hf, tmp_path, ValueError, "'llama'", "supported")
    for family in ("qwen2_moe", "qwen3_moe", "mixtral", "olmoe", "deepseek_v2"):
        assert family in msg


def test_missing_shard(tmp_path):
    hf = _copy(SHARDED, tmp_path)
    (hf / "model-00003-of-00009.safetensors").unlink()
    _convert_fails(hf, tmp_path, FileNotFoundError, "model-00003-of-00009.safetensors", "missing")


def test_no_safetensors_at_all(tmp_path):
    hf = _copy(SINGLE, tmp_path)
    (hf / "model.safetensors").unlink()
    _convert_fails(hf, tmp_path, FileNotFoundError, "no model.safetensors")


@pytest.mark.parametrize("name", [SINGLE, SHARDED])
def test_truncated_safetensors(name, tmp_path):
    hf = _copy(name, tmp_path)
    victim = sorted(hf.glob("*.safetensors"))[-1]
    os.truncate(victim, victim.stat().st_size - 64)
    _convert_fails(hf, tmp_path, ValueError, victim.name, "truncated or corrupted")


def test_corrupted_safetensors_header(tmp_path):
    hf = _copy(SINGLE, tmp_path)
    path = hf / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[8:24] = b"#" * 16  # the JSON header starts at byte 8
    path.write_bytes(bytes(data))
    _convert_fails(hf, tmp_path, ValueError, "model.safetensors", "truncated or corrupted")


def test_corrupted_file_that_is_not_safetensors(tmp_path):
    hf = _copy(SINGLE, tmp_path)
    (hf / "model.safetensors").write_bytes(b"\x00" * 7)
    _convert_fails(hf, tmp_path, ValueError, "model.safetensors")


def _rewrite(hf: Path, edit) -> None:
    path = hf / "model.safetensors"
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


def test_wrong_shape_tensor(tmp_path):
    hf = _copy(SINGLE, tmp_path)
    key = "model.layers.1.self_attn.q_b_proj.weight"
    _rewrite(hf, lambda t: t.__setitem__(key, np.ascontiguousarray(t[key][:-1])))
    msg = _convert_fails(hf, tmp_path, ValueError, key, "wrong shape")
    q_b = json.loads((hf / "config.json").read_text())
    n = q_b["num_attention_heads"] * (q_b["qk_nope_head_dim"] + q_b["qk_rope_head_dim"])
    assert f"expected shape ({n}, {q_b['q_lora_rank']})" in msg
    assert f"got ({n - 1}, {q_b['q_lora_rank']})" in msg


def test_wrong_shape_expert(tmp_path):
    hf = _copy(SINGLE, tmp_path)
    key = "model.layers.2.mlp.experts.5.down_proj.weight"
    _rewrite(hf, lambda t: t.__setitem__(key, np.ascontiguousarray(t[key].T)))
    _convert_fails(hf, tmp_path, ValueError, key, "expected shape (64, 32)", "got (32, 64)")


def test_missing_and_unexpected_tensors_are_named(tmp_path):
    hf = _copy(SINGLE, tmp_path)
    gone = "model.layers.2.mlp.experts.7.up_proj.weight"
    extra = "model.layers.2.mlp.experts.8.up_proj.weight"

    def edit(t):
        t[extra] = t.pop(gone)

    _rewrite(hf, edit)
    _convert_fails(hf, tmp_path, ValueError, f"missing: {gone}", "unexpected", extra)


def test_shard_index_disagrees_with_shards(tmp_path):
    hf = _copy(SHARDED, tmp_path)
    index = json.loads((hf / "model.safetensors.index.json").read_text())
    key = "model.embed_tokens.weight"
    index["weight_map"][key] = next(v for v in index["weight_map"].values()
                                    if v != index["weight_map"][key])
    (hf / "model.safetensors.index.json").write_text(json.dumps(index))
    _convert_fails(hf, tmp_path, ValueError, key)


def test_non_empty_out_needs_force(tmp_path):
    hf = HF_FIXTURES / SINGLE
    out = tmp_path / "model"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(FileExistsError, match="not empty; pass --force"):
        convert_hf(hf, out, "fp32")
    assert (out / "keep.txt").read_text() == "precious"
    convert_hf(hf, out, "fp32", force=True)
    assert not (out / "keep.txt").exists() and (out / io.MANIFEST).is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_empty_out_is_fine(tmp_path):
    out = tmp_path / "model"
    out.mkdir()
    convert_hf(HF_FIXTURES / SINGLE, out, "fp32")
    assert (out / io.MANIFEST).is_file()


def test_failed_forced_conversion_keeps_the_old_out(tmp_path):
    hf = _copy(SINGLE, tmp_path)
    out = tmp_path / "model"
    convert_hf(hf, out, "fp32")
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    os.truncate(hf / "model.safetensors", 1000)
    with pytest.raises(ValueError):
        convert_hf(hf, out, "fp32", force=True)
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before


def test_failure_mid_stream_leaves_nothing(tmp_path, monkeypatch):
    """A failure after some layers were written (here: the 3rd group) removes the partial dir."""
    calls = []
    real = io.ModelDirWriter.write_group

    def flaky(self, group, flat):
        calls.append(group)
        if len(calls) == 3:
            raise OSError("disk full (simulated)")
        real(self, group, flat)

    monkeypatch.setattr(io.ModelDirWriter, "write_group", flaky)
    out = tmp_path / "model"
    with pytest.raises(OSError, match="disk full"):
        convert_hf(HF_FIXTURES / SINGLE, out, "fp32")
    assert len(calls) == 3
    _assert_nothing_written(tmp_path, out)


def test_bad_dtype(tmp_path):
    with pytest.raises(ValueError, match="dtype"):
        convert_hf(HF_FIXTURES / SINGLE, tmp_path / "model", "int8")


def test_cli_reports_one_line_and_exit_code_2(tmp_path, capsys):
    hf = _copy(SINGLE, tmp_path)
    (hf / "config.json").unlink()
    rc = cli_main(["convert", "--hf", str(hf), "--out", str(tmp_path / "model")])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert err.startswith("mxmoe-jax convert: error:") and "no config.json" in err
    assert "\n" not in err
    _assert_nothing_written(tmp_path, tmp_path / "model")


def test_cli_convert_and_export(tmp_path, capsys):
    out, hf_out = tmp_path / "model", tmp_path / "hf"
    assert cli_main(["convert", "--hf", str(HF_FIXTURES / SINGLE), "--out", str(out),
                     "--dtype", "bf16"]) == 0
    text = capsys.readouterr().out
    assert "peak host memory" in text and "190,008 params" in text
    assert cli_main(["export-hf", "--model", str(out), "--out", str(hf_out)]) == 0
    assert json.loads((hf_out / "config.json").read_text())["dtype"] == "bfloat16"
    assert cli_main(["export-hf", "--model", str(out), "--out", str(hf_out)]) == 2
    assert "--force" in capsys.readouterr().err


def test_export_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a MODEL_DIR"):
        export_hf(HF_FIXTURES / SINGLE, tmp_path / "hf")
    out = tmp_path / "hf"
    out.mkdir()
    (out / "x").write_text("x")
    with pytest.raises(FileExistsError, match="--force"):
        export_hf(converted(SINGLE), out)
    model_dir = tmp_path / "broken"
    shutil.copytree(converted(SINGLE), model_dir)
    shutil.rmtree(model_dir / io.PARAMS / "layers" / "2")
    with pytest.raises(FileNotFoundError, match="layers/2"):
        export_hf(model_dir, tmp_path / "hf2")
    _assert_nothing_written(tmp_path, tmp_path / "hf2")


def test_a_killed_writers_temporary_folder_is_removed_by_the_next_run(tmp_path):
    """``kill -9`` mid-write leaves ``.<out>.tmp-<pid>``; the next write of that ``--out`` removes
    it when that process is gone, and leaves a live process's (another writer's) alone."""
    dead = tmp_path / ".model.tmp-4194999"  # above Linux's largest pid (2^22): never alive
    live = tmp_path / f".model.tmp-{os.getppid()}"
    for d in (dead, live):
        d.mkdir()
        (d / "params.bin").write_bytes(b"half")
    convert_hf(HF_FIXTURES / SINGLE, tmp_path / "model", "fp32")
    assert not dead.exists() and live.exists() and (tmp_path / "model" / "model.json").is_file()
