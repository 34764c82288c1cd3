"""Text -> token windows for tracing and calibration (no download: any local text files).

Two ways to cut windows, both over the files joined by ``"\\n\\n"`` and tokenized once with the
model's tokenizer:

* ``sample``: the original MxMoE's sampling: ``nsamples`` windows of ``seqlen`` tokens starting at
  uniform random offsets (seeded; the original used Python's ``random`` with seed 42).
* ``whole``: consecutive non-overlapping windows from the start (remainder dropped), as ``eval``.
"""

from __future__ import annotations

import os
import random
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from mxmoe_jax.eval.perplexity import windows as whole_windows


def read_texts(files: Sequence[str | os.PathLike]) -> str:
    if not files:
        raise ValueError("text: give at least one text file")
    parts = []
    for f in files:
        path = Path(f)
        if not path.is_file():
            raise FileNotFoundError(f"text file {path} does not exist")
        parts.append(path.read_text(encoding="utf-8"))
    return "\n\n".join(parts)


def tokenize_texts(tokenizer, files: Sequence[str | os.PathLike]) -> np.ndarray:
    return np.asarray(tokenizer(read_texts(files), verbose=False)["input_ids"], dtype=np.int32)


def sample_windows(ids: np.ndarray, seqlen: int, nsamples: int, seed: int = 42) -> np.ndarray:
    """``nsamples`` windows [nsamples, seqlen] at seeded random offsets (the original's sampler)."""
    if seqlen < 1 or nsamples < 1:
        raise ValueError("seqlen and nsamples must be positive")
    if len(ids) <= seqlen:
        raise ValueError(f"the text has {len(ids)} tokens, not more than seqlen={seqlen}")
    rnd = random.Random(seed)
    starts = [rnd.randint(0, len(ids) - seqlen - 1) for _ in range(nsamples)]
    return np.stack([ids[s : s + seqlen] for s in starts])


def token_windows(ids: np.ndarray, *, seqlen: int, nsamples: int, sampling: str = "sample",
                  seed: int = 42) -> np.ndarray:
    """Windows by ``sampling`` = ``sample`` (random offsets) or ``whole`` (first N consecutive)."""
    if sampling == "sample":
        return sample_windows(ids, seqlen, nsamples, seed)
    if sampling == "whole":
        return whole_windows(ids, seqlen, nsamples)
    raise ValueError(f"sampling: {sampling!r} is not 'sample' or 'whole'")
