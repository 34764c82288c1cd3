"""Helpers for the conversion tests: the HF fixtures, one conversion per fixture per session, and
transformers' logits computed live (in-process when torch imports, else through the Python named
by MXMOE_TORCH_PYTHON, e.g. /work/torchenv/bin/python; otherwise the live tests skip).

Not a conftest.py (tests/test_packaging.py imports ``conftest`` by its bare name); plain
functions with a per-session cache instead of fixtures.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pytest

HF_FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "hf"
FIXTURE_NAMES = sorted(p.parent.name for p in HF_FIXTURES.glob("*/config.json"))
TOL = 1e-4  # max |logit difference| in fp32 (issue 2)

_LIVE_SCRIPT = r"""
import os, sys, json
import numpy as np, torch
from transformers import AutoModelForCausalLM
jobs = json.loads(sys.argv[1])
for hf_dir, ids_path, out_path in jobs:
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32,
                                                 attn_implementation="eager").eval()
    ids = torch.from_numpy(np.load(ids_path)).long()
    with torch.no_grad():
        np.save(out_path, model(ids).logits.float().numpy())
"""


def fixture_inputs(name: str) -> tuple[np.ndarray, np.ndarray]:
    """(input_ids [B, T] int32, transformers' fp32 logits [B, T, V]) stored with a fixture."""
    z = np.load(HF_FIXTURES / name / "inputs.npz")
    return z["input_ids"], z["logits"]


def _torch_in_process() -> bool:
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError:
        return False
    return True


def live_mode() -> str | None:
    """"inprocess", "subprocess" or None (no way to run transformers here)."""
    if _torch_in_process():
        return "inprocess"
    py = os.environ.get("MXMOE_TORCH_PYTHON")
    if py and Path(py).exists():
        return "subprocess"
    return None


def hf_live_logits(hf_dirs: list[Path], ids: np.ndarray, tmp: Path) -> list[np.ndarray]:
    """transformers' fp32 logits on ``ids`` for each HF folder, computed now (eager attention)."""
    mode = live_mode()
    if mode is None:
        pytest.skip("transformers live: torch is not importable here (set MXMOE_TORCH_PYTHON to "
                    "a Python with torch + transformers, e.g. /work/torchenv/bin/python)")
    if mode == "inprocess":
        import torch
        from transformers import AutoModelForCausalLM

        out = []
        for d in hf_dirs:
            model = AutoModelForCausalLM.from_pretrained(
                str(d), dtype=torch.float32, attn_implementation="eager").eval()
            with torch.no_grad():
                out.append(model(torch.from_numpy(ids).long()).logits.float().numpy())
        return out
    ids_path = tmp / "live_ids.npy"
    np.save(ids_path, ids)
    jobs = [(str(d), str(ids_path), str(tmp / f"live_logits_{i}.npy"))
            for i, d in enumerate(hf_dirs)]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc = subprocess.run([os.environ["MXMOE_TORCH_PYTHON"], "-c", _LIVE_SCRIPT, json.dumps(jobs)],
                          capture_output=True, text=True, env=env, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"live transformers run failed:\n{proc.stderr[-3000:]}")
    return [np.load(j[2]) for j in jobs]


_ROOT: Path | None = None
_CONVERTED: dict[tuple[str, str], Path] = {}


def converted(name: str, dtype: str = "fp32") -> Path:
    """MODEL_DIR of a fixture, converted once per test session (a temporary folder)."""
    global _ROOT
    from mxmoe_jax.convert.hf_to_flax import convert_hf

    if (name, dtype) not in _CONVERTED:
        if _ROOT is None:
            _ROOT = Path(tempfile.mkdtemp(prefix="mxmoe-convert-tests-"))
            atexit.register(shutil.rmtree, _ROOT, True)
        out = _ROOT / f"{name}-{dtype}"
        convert_hf(HF_FIXTURES / name, out, dtype)
        _CONVERTED[name, dtype] = out
    return _CONVERTED[name, dtype]


def our_logits(model_dir: Path, ids: np.ndarray) -> np.ndarray:
    """Logits [B, T, V] of a MODEL_DIR's model in fp32."""
    import jax.numpy as jnp

    from mxmoe_jax.models import forward
    from mxmoe_jax.models.io import load_model_dir

    _, model = load_model_dir(model_dir, dtype="fp32")
    return np.asarray(forward(model, jnp.asarray(ids, jnp.int32)))


def assert_logits_close(got: np.ndarray, want: np.ndarray, what: str, tol: float = TOL) -> None:
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    diff = float(np.max(np.abs(got.astype(np.float64) - want.astype(np.float64))))
    assert diff <= tol, f"{what}: max |logit diff| {diff:.3e} > {tol:.0e}"
