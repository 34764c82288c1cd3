"""The same inputs and seed give byte-identical artifacts on two runs: trace.json, loss.json,
qconfig.json (+ its Pareto CSV and original-schema export) and a QMODEL_DIR's packed weights.

Compared are the files users keep, not numbers recomputed here: each artifact against the same
artifact of a second run, byte for byte. The fields that record the run rather than its result
are dropped before comparing their JSON: qconfig's ``created`` and ``seconds`` (wall-clock date
and solver time) and qmodel.json's ``total`` and ``*_on_disk`` (the folders' sizes on disk; the
arrays' own sizes are compared). Orbax checkpoints hold random file names and timestamps, so a
QMODEL_DIR is compared by every array it stores (name, dtype, shape, bytes) plus every other
file. trace, calibrate and quantize run twice in one process; solve in two processes with
different string-hash seeds.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys

import numpy as np
import pytest

from mxmoe_jax.cli import main as cli
from tests.conftest import REPO

# what a run records about itself, not about its result
VOLATILE = {"qconfig": {"created", "seconds"},
            "qmodel": {"total", "experts_on_disk", "rest_on_disk"}}  # bytes on disk


def _drop(obj, keys: set[str]):
    """``obj`` without the ``keys`` at any depth; raises if none of them was there (a mask that
    drops nothing hides nothing, so the key names are checked to be current)."""
    found = []

    def walk(o):
        if isinstance(o, dict):
            found.extend(k for k in o if k in keys)
            return {k: walk(v) for k, v in o.items() if k not in keys}
        if isinstance(o, list):
            return [walk(v) for v in o]
        return o

    out = walk(obj)
    assert set(found) == keys, f"volatile fields {keys - set(found)} are gone: update VOLATILE"
    return out


def _tokenized_text(tmp_path, vocab: int = 128):
    """A word-level tokenizer of ``vocab`` tokens and a seeded text of its words."""
    from tests.test_bad_input import _word_tokenizer

    tok = _word_tokenizer(tmp_path / "tok", vocab)
    rnd = random.Random(0)
    text = tmp_path / "text.txt"
    text.write_text(" ".join(f"w{rnd.randrange(1, vocab)}" for _ in range(600)))
    return tok, text


@pytest.fixture(scope="module")
def model():
    from tests.convert.convert_helpers import converted

    return converted("qwen2_moe_sparse_step")  # 4 layers, 8 experts + shared, vocabulary 128


def test_trace_and_calibrate_twice_give_the_same_bytes(model, tmp_path):
    tok, text = _tokenized_text(tmp_path)
    common = ["--model", str(model), "--tokenizer", str(tok), "--text", str(text),
              "--seqlen", "64", "--nsamples", "4"]
    for run in ("a", "b"):
        assert cli(["trace", *common, "--out", str(tmp_path / f"trace-{run}.json")]) == 0
        assert cli(["calibrate", *common, "--schemes", "w4a16_g-1_asym", "w2a16_g32_asym",
                    "--out", str(tmp_path / f"loss-{run}.json")]) == 0
    for name in ("trace", "loss"):
        a = (tmp_path / f"{name}-a.json").read_bytes()
        assert a == (tmp_path / f"{name}-b.json").read_bytes(), name
    loss = json.loads((tmp_path / "loss-a.json").read_text())
    assert set(loss["losses"]) == {"w4a16_g-1_asym", "w2a16_g32_asym"}
    assert not [p.name for p in tmp_path.iterdir() if "partial" in p.name or ".tmp" in p.name]


def test_solve_gives_the_same_bytes_in_two_processes(tmp_path):
    """Two processes with different string-hash seeds (set and dict orders built from sets)."""
    from mxmoe_jax.alloc.check_uniform import perf_for_trace
    from mxmoe_jax.alloc.synthetic import synthetic_loss, synthetic_trace

    schemes = ["w16a16", "w8a8_g-1_sym", "w4a16_g128_asym", "w4a16_g-1_asym", "w2a16_g128_asym"]
    trace = synthetic_trace(num_layers=3, num_experts=6, top_k=2, moe_inter=128, hidden=256,
                            shared_ratio=2.0, num_tokens=512, seed=5)
    files = {"trace": trace, "loss": synthetic_loss(trace, schemes, seed=5),
             "perf": perf_for_trace(trace, schemes).table}
    for name, obj in files.items():
        (tmp_path / f"{name}.json").write_text(json.dumps(obj))
    for run, seed in (("a", "0"), ("b", "4242")):
        argv = ["solve", "--wbits", "4.5", "--mode", "model", "--no-plots",
                "--out", str(tmp_path / f"q-{run}.json"),
                "--export-original", str(tmp_path / f"orig-{run}.json"),
                *(a for n in files for a in (f"--{n}", str(tmp_path / f"{n}.json")))]
        env = dict(os.environ, PYTHONHASHSEED=seed, PYTHONPATH=str(REPO))
        res = subprocess.run([sys.executable, "-m", "mxmoe_jax", *argv], capture_output=True,
                             text=True, env=env, cwd=tmp_path, timeout=300)
        assert res.returncode == 0, res.stderr[-2000:]
    for name in ("q-{}.pareto.csv", "orig-{}.json"):
        a = (tmp_path / name.format("a")).read_bytes()
        assert a == (tmp_path / name.format("b")).read_bytes(), name
    qa, qb = (json.loads((tmp_path / f"q-{r}.json").read_text()) for r in "ab")
    assert _drop(qa, VOLATILE["qconfig"]) == _drop(qb, VOLATILE["qconfig"])
    assert len({s for e in qa["layers"].values() for b in e.values()
                for s in b.values()}) > 1  # a mixed assignment, not one scheme everywhere


def _stored(folder) -> tuple[dict, dict]:
    """({relative path: bytes} of every file outside Orbax checkpoints,
    {checkpoint/array key: (dtype, shape, bytes)} of every array in them)."""
    import orbax.checkpoint as ocp

    from mxmoe_jax.models.io import _flatten

    ckpts = sorted(p.parent for p in folder.rglob("_CHECKPOINT_METADATA"))
    files = {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
             if p.is_file() and not any(c in p.parents for c in ckpts)}
    arrays = {}
    reader = ocp.PyTreeCheckpointer()
    for c in ckpts:
        for key, arr in _flatten(reader.restore(c.absolute())).items():
            arr = np.asarray(arr)
            arrays[f"{c.relative_to(folder)}:{key}"] = (arr.dtype.str, arr.shape, arr.tobytes())
    return files, arrays


def test_quantize_twice_gives_the_same_packed_weights(model, tmp_path):
    from mxmoe_jax.alloc.qconfig import Allocation, make_qconfig
    from mxmoe_jax.models.io import load_config

    cfg = load_config(model)
    layers = Allocation.uniform(cfg, "w4a16_g-1_asym").to_layers()
    mixed = ["w8a8_g-1_sym", "w2a16_g32_asym", "w16a16", "w4a16_g32_sym"]
    for experts in layers.values():
        for i, e in enumerate(sorted(experts, key=int)):
            s = mixed[i % len(mixed)]
            experts[e].update(gate=s, up=s, down=mixed[(i + 1) % len(mixed)])
    q = tmp_path / "qconfig.json"
    q.write_text(json.dumps(make_qconfig(layers, meta={"model_fingerprint": cfg.fingerprint()},
                                         summary={})))
    for run in ("a", "b"):
        assert cli(["quantize", "--model", str(model), "--qconfig", str(q), "--out",
                    str(tmp_path / run)]) == 0
    files_a, arrays_a = _stored(tmp_path / "a")
    files_b, arrays_b = _stored(tmp_path / "b")
    assert {"qmodel.json", "qconfig.json", "model.json"} <= files_a.keys()
    assert any(k.startswith("quantized/") for k in arrays_a)
    qa, qb = (json.loads(f.pop("qmodel.json")) for f in (files_a, files_b))
    assert _drop(qa, VOLATILE["qmodel"]) == _drop(qb, VOLATILE["qmodel"])
    assert files_a == files_b
    assert arrays_a.keys() == arrays_b.keys()
    different = [k for k in arrays_a if arrays_a[k] != arrays_b[k]]
    assert not different, different
