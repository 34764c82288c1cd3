"""Quantizing a model in memory or from a MODEL_DIR into a QMODEL_DIR (what ``quantize``, ``eval``
and ``run`` call)."""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path

import jax.numpy as jnp

from mxmoe_jax.alloc.qconfig import Allocation, load_qconfig, quantizer_mismatch

METHODS = ("rtn", "gptq")


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class QuantizeConfig:
    """How to quantize the weights of an allocation."""

    method: str = "rtn"  # weight quantizer: "rtn" | "gptq"
    hadamard: bool = False  # rotate first (QuaRot), with the online down_proj rotation
    seed: int = 42  # rotation signs and calibration window sampling
    calib: tuple[str, ...] = ()  # GPTQ calibration text files
    calib_windows: int = 16  # GPTQ calibration windows
    seqlen: int = 512  # calibration window length

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method: {self.method!r} is not one of {METHODS}")
        if self.method == "gptq" and not self.calib:
            raise ValueError("--method gptq needs --calib FILE (calibration text)")
        for f in self.calib:
            if not Path(f).is_file():
                raise FileNotFoundError(f"calibration text {f} does not exist")
        if self.calib_windows < 1 or self.seqlen < 2:
            raise ValueError("calib_windows must be >= 1 and seqlen >= 2")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self) | {"calib": list(self.calib)}


def read_qconfig(qconfig) -> tuple[dict, str]:
    """``(qconfig dict, name for messages)`` of a qconfig.json path or an already read dict."""
    if isinstance(qconfig, str | os.PathLike):
        return load_qconfig(qconfig), str(qconfig)
    return qconfig, "qconfig"


def check_quantizer(qconfig, config: QuantizeConfig, *, allow_mismatch: bool = False) -> dict:
    """Refuse to quantize ``qconfig`` with another quantizer than its losses were measured with.

    Raises ValueError (one line: the CLIs exit 2) when the method or the rotation differs from
    the qconfig's ``meta.quantizer``, unless ``allow_mismatch``; prints that, and differing GPTQ
    calibration settings, as warnings on stderr. Returns the qconfig dict.
    """
    q, where = read_qconfig(qconfig)
    error, warnings = quantizer_mismatch(
        q, method=config.method, hadamard=config.hadamard, calib=list(config.calib),
        calib_windows=config.calib_windows, seqlen=config.seqlen, seed=config.seed,
        allowed=allow_mismatch, where=where)
    if error:
        raise ValueError(error)
    for w in warnings:
        print(f"warning: {w}", file=sys.stderr, flush=True)
    return q


def resolve_allocation(cfg, *, qconfig=None, scheme=None) -> Allocation:
    if (qconfig is None) == (scheme is None):
        raise ValueError("give exactly one of qconfig and scheme")
    if qconfig is not None:
        q, where = read_qconfig(qconfig)
        return Allocation.from_qconfig(cfg, q, where=where)
    return Allocation.uniform(cfg, scheme)


def quantize_in_memory(model, allocation: Allocation, config: QuantizeConfig, *,
                       tokenizer_dir=None, progress: bool = False):
    """``(quantized model, rotation | None)`` of an FP model (fp32 recommended)."""
    from mxmoe_jax.quantize.apply import quantize_model
    from mxmoe_jax.quantize.rotation import rotate_model

    rotation = None
    if config.hadamard:
        model, rotation = rotate_model(model, seed=config.seed, online_down=True)
    quantized = None
    if config.method == "gptq":
        from mxmoe_jax.data import (
            check_seqlen,
            check_tokenizer,
            load_tokenizer,
            sample_windows,
            tokenize_texts,
        )
        from mxmoe_jax.quantize.gptq import gptq_weights

        if tokenizer_dir is None:
            raise ValueError("tokenizer_dir: GPTQ needs the tokenizer of the calibration text")
        check_seqlen(model.cfg, config.seqlen)
        tok = load_tokenizer(tokenizer_dir)
        check_tokenizer(tok, model.cfg, tokenizer_dir)
        ids = sample_windows(tokenize_texts(tok, list(config.calib)), config.seqlen,
                             config.calib_windows, seed=config.seed)
        quantized = gptq_weights(model, ids, allocation, progress=progress)
    return quantize_model(model, allocation, quantized), rotation, model


def quantize_dir(model_dir, out, *, qconfig=None, scheme=None, config: QuantizeConfig,
                 force: bool = False, progress: bool = False,
                 allow_quantizer_mismatch: bool = False) -> dict:
    """MODEL_DIR -> QMODEL_DIR; returns the QMODEL manifest. Everything is checked before
    anything is written; nothing appears at ``out`` unless it is complete. A qconfig whose
    recorded quantizer is not ``config``'s is refused (`check_quantizer`)."""
    from mxmoe_jax.models.io import check_out_dir, load_model_dir, read_manifest
    from mxmoe_jax.quantize.checkpoint import save_qmodel

    check_out_dir(out, force)
    if qconfig is not None:  # before the (slow) model load
        check_quantizer(qconfig, config, allow_mismatch=allow_quantizer_mismatch)
    stored = read_manifest(model_dir)["dtype"]
    cfg, model = load_model_dir(model_dir, dtype=jnp.float32)
    allocation = resolve_allocation(cfg, qconfig=qconfig, scheme=scheme)
    qmodel, rotation, fp = quantize_in_memory(model, allocation, config,
                                              tokenizer_dir=model_dir, progress=progress)
    # the unquantized rest keeps the dtype it came in
    return save_qmodel(qmodel, allocation, out, quantizer=config.to_dict(), rotation=rotation,
                       tokenizer_dir=model_dir, force=force, fp_model=fp, rest_dtype=stored)
