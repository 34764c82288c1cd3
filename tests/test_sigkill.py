"""``kill -9`` (and one Ctrl-C) at random points of ``mxmoe-jax quantize`` (a subprocess, fixed
seed): at every point ``--out`` is absent or complete, and the next run finishes with the same
result as an uninterrupted one and leaves no temporary or old folder behind. The Ctrl-C exits 130
with one line, no traceback, and its temporary folder already removed.

The kills land while the process writes (from the moment its ``.<out>.tmp-<pid>`` folder appears
to a random delay within the reference run's write time), where a half-written folder could be
left; a kill during start-up tests nothing.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import REPO
from tests.test_determinism import VOLATILE, _drop, _stored

SIGNALS = (signal.SIGKILL, signal.SIGINT, signal.SIGKILL)  # one run each, in this order


def _result(folder):
    """What a QMODEL_DIR holds, less the fields that record the run (`test_determinism`)."""
    files, arrays = _stored(folder)
    return _drop(json.loads(files.pop("qmodel.json")), VOLATILE["qmodel"]), files, arrays


def _start(argv, env, log):
    """The CLI in a subprocess; stderr to ``log`` (a pipe nobody reads could fill and block)."""
    with open(log, "w") as err:
        return subprocess.Popen([sys.executable, "-m", "mxmoe_jax", *argv], env=env,
                                stdout=subprocess.DEVNULL, stderr=err)


def _wait_for(pred, proc, timeout: float = 120.0) -> float:
    """Poll until ``pred()`` (returns the time) or the process has exited (returns None)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return time.monotonic()
        if proc.poll() is not None:
            return None
        time.sleep(0.005)
    proc.kill()
    pytest.fail("the subprocess neither wrote nor exited in time")


def test_kill_9_and_ctrl_c_while_quantize_writes_then_rerun(tmp_path):
    from mxmoe_jax.alloc.qconfig import Allocation, make_qconfig
    from mxmoe_jax.models.io import load_config
    from tests.convert.convert_helpers import converted

    model = converted("qwen2_moe_sparse_step")
    cfg = load_config(model)
    layers = Allocation.uniform(cfg, "w4a16_g-1_asym").to_layers()
    for experts in layers.values():
        for i, e in enumerate(sorted(experts, key=int)):
            s = ("w8a8_g-1_sym", "w2a16_g32_asym", "w4a16_g32_sym")[i % 3]
            experts[e].update(gate=s, up=s)
    qconfig = tmp_path / "qconfig.json"
    qconfig.write_text(json.dumps(make_qconfig(layers, summary={},
                                               meta={"model_fingerprint": cfg.fingerprint()})))
    env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")
    runs = tmp_path / "runs"
    runs.mkdir()

    def argv(out):
        return ["quantize", "--model", str(model), "--qconfig", str(qconfig), "--out", str(out)]

    # the uninterrupted reference, and how long it writes
    ref_out = tmp_path / "ref"
    log = tmp_path / "stderr.txt"
    proc = _start(argv(ref_out), env, log)
    began = _wait_for((tmp_path / f".ref.tmp-{proc.pid}").exists, proc)
    ended = _wait_for(ref_out.exists, proc)
    assert proc.wait(timeout=120) == 0, log.read_text()[-2000:]
    assert began is not None and ended is not None
    reference = _result(ref_out)

    out = runs / "q"
    rnd = random.Random(16)
    stopped = {signal.SIGKILL: 0, signal.SIGINT: 0}
    for sig in SIGNALS:
        proc = _start(argv(out), env, log)
        tmp = runs / f".q.tmp-{proc.pid}"
        if _wait_for(tmp.exists, proc) is not None:
            time.sleep(rnd.uniform(0, ended - began))
            proc.send_signal(sig)
        rc = proc.wait(timeout=120)
        if rc == 0:  # it finished before the signal
            assert _result(out) == reference
        elif sig == signal.SIGKILL:
            assert rc == -signal.SIGKILL
            stopped[sig] += 1
        else:
            err = log.read_text()
            assert rc == 130 and "mxmoe-jax quantize: interrupted" in err, err[-2000:]
            assert "Traceback" not in err and not tmp.exists()
            stopped[sig] += 1
        assert not out.exists() or _result(out) == reference  # never half-written
        if out.exists():
            shutil.rmtree(out)  # the next run writes it again, over the dead run's leftovers
    assert all(stopped.values()), f"runs finished before their signal: {stopped}"
    proc = _start(argv(out), env, log)
    assert proc.wait(timeout=300) == 0, log.read_text()[-2000:]
    assert _result(out) == reference
    assert sorted(p.name for p in runs.iterdir()) == ["q"], "temporary folders left behind"


def test_a_dead_writers_old_copy_is_removed_only_once_out_exists(tmp_path):
    """``kill -9`` while deleting the replaced folder leaves ``.<out>.old-<pid>``: removed by
    the next write once ``out`` exists; kept while ``out`` is missing (it may be the only
    complete copy: killed between the two renames)."""
    from mxmoe_jax.models.io import AtomicDir

    dead = 4194999  # above Linux's largest pid (2^22): never alive
    out = tmp_path / "q"
    old = tmp_path / f".q.old-{dead}"
    old.mkdir()
    (old / "params").mkdir()
    with AtomicDir(out) as tmp:
        (tmp / "a").write_text("1")
    assert old.is_dir()  # there was no out when this write began
    with AtomicDir(out, force=True) as tmp:
        (tmp / "a").write_text("2")
    assert not old.exists() and (out / "a").read_text() == "2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q"]
