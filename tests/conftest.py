"""Shared fixtures: the ``interpret`` switch for Pallas kernels and paths to ../shared."""

from __future__ import annotations

import gc
import types
from pathlib import Path

import jax
import pytest

jax.config.update("jax_enable_x64", False)

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"
TINY_MODEL = SHARED / "models" / "qwen2moe-tiny-books"
WIKITEXT = SHARED / "data" / "wikitext2" / "wiki.test.raw.txt"
BOOKS_CALIB = SHARED / "data" / "books-calib.txt"
BOOKS_EVAL = SHARED / "data" / "books-eval.txt"
FIXTURES = Path(__file__).resolve().parent / "fixtures"

ON_GPU = any(d.platform == "gpu" for d in jax.devices())


def require_shared(path: Path) -> Path:
    """Skip (with the reason) when ../shared is absent, as in a user's fresh clone."""
    if not path.exists():
        pytest.skip(f"{path} is absent (../shared is only beside the project's own checkouts)")
    return path


@pytest.fixture(params=[True] if not ON_GPU else [False, True], ids=lambda v: f"interpret={v}")
def interpret(request):
    """Pallas kernels run in interpret mode on the CPU; on a GPU both ways."""
    return request.param


@pytest.fixture(autouse=True, scope="module")
def _free_compiled_code():
    """Drop every compiled executable after each test module.

    XLA keeps each executable's code in its own memory maps (about 3 on the CPU), and a Linux
    process may hold ``vm.max_map_count`` maps (65530 by default): the whole suite in one process
    compiled past that and segfaulted inside XLA's compiler (CI, 2026-12-01: maps grew ~1000 per
    20 s). ``jax.clear_caches`` releases them; a later module recompiles what it uses.
    """
    yield
    jax.clear_caches()
    gc.collect()


def pytest_collection_modifyitems(config, items):
    if ON_GPU:
        return
    skip_gpu = pytest.mark.skip(reason="needs an NVIDIA GPU (this machine has none)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """../shared's tiny trained Qwen2-MoE converted once per test session (fp32 MODEL_DIR)."""
    require_shared(TINY_MODEL)
    from mxmoe_jax.convert.hf_to_flax import convert_hf

    out = tmp_path_factory.mktemp("tiny-books") / "model"
    convert_hf(TINY_MODEL, out, "fp32")
    return out


def torch_available() -> bool:
    """True where torch + transformers import (the GPU machine; the fixture generator's venv)."""
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.fixture
def triton_ir(monkeypatch):
    """``triton_ir(fn, *avals) -> [IR text per Pallas kernel]``: lowered for CUDA sm_90, not run.

    The GPU query is stubbed, ``jax.export`` lowers ``fn``; export then refuses the Triton custom
    call, after the IR Pallas hands to XLA has been captured.
    """
    reg = pytest.importorskip("jax._src.pallas.triton.pallas_call_registration")
    captured: list[str] = []
    orig = reg.lowering.lower_jaxpr_to_triton_module

    def capture(*args, **kwargs):
        result = orig(*args, **kwargs)
        captured.append(result.module.operation.get_asm())
        return result

    monkeypatch.setattr(reg.gpu_info_lib, "get_gpu_info",
                        lambda *a, **k: types.SimpleNamespace(compute_capability=90))
    monkeypatch.setattr(reg.lowering, "lower_jaxpr_to_triton_module", capture)

    def lower(fn, *avals) -> list[str]:
        captured.clear()
        try:
            jax.export.export(jax.jit(fn), platforms=["cuda"])(*avals)
        except ValueError:
            pass  # export refuses the Triton custom call after lowering
        assert captured, "the Triton lowering did not run"
        return list(captured)

    return lower
