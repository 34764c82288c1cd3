"""mxmoe-jax: mixed-precision quantization of Mixture-of-Experts LLMs in JAX/Pallas.

A reimplementation of MxMoE (arXiv 2505.05799). Subpackages: ``models`` (Flax NNX MoE models),
``quant`` (schemes, quantizers, packing), ``calib`` (trace, per-block loss), ``alloc`` (the MILP),
``perf`` (kernel cost tables), ``eval`` (perplexity), ``kernels`` (Pallas grouped GEMMs, source in
the repository's ``kernels/``) and ``convert`` (HF <-> Flax, source in ``convert/``); modules
``data`` (tokenizer, text -> token windows) and ``gpus`` (SM counts and shared memory per GPU).
"""

import importlib.util as _ilu
import sys as _sys
from pathlib import Path as _Path

__version__ = "0.1.0"


def _map_checkout_folders() -> None:
    """Expose a source checkout's top-level ``kernels/`` and ``convert/`` as subpackages.

    Installed wheels map them with setuptools' ``package-dir``; running from a checkout with
    ``PYTHONPATH=.`` (the GPU machine, CI) needs the same names without installing anything.
    """
    here = _Path(__file__).resolve().parent
    root = here.parent
    for name in ("kernels", "convert"):
        full = f"{__name__}.{name}"
        if full in _sys.modules or (here / name).exists():
            continue
        init = root / name / "__init__.py"
        if not init.is_file():
            continue
        spec = _ilu.spec_from_file_location(full, init,
                                            submodule_search_locations=[str(init.parent)])
        module = _ilu.module_from_spec(spec)
        _sys.modules[full] = module
        spec.loader.exec_module(module)
        globals()[name] = module


_map_checkout_folders()
