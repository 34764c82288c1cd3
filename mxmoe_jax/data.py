"""Text -> token ids -> windows, for tracing, calibration and perplexity (no download).

Any local UTF-8 text files, joined by ``"\\n\\n"`` and tokenized once with the model's tokenizer
(its defaults: the original MxMoE's protocol). Two ways to cut the ids into windows:

* ``whole``: consecutive non-overlapping windows from the start, the remainder dropped (the
  perplexity protocol, README §6 of the original MxMoE).
* ``sample``: the original MxMoE's calibration sampler: ``nsamples`` windows of ``seqlen`` tokens
  at uniform random offsets (seeded; the original used Python's ``random`` with seed 42).

The layer below ``calib`` and ``eval``: this module imports neither.
"""

from __future__ import annotations

import os
import random
from collections.abc import Sequence
from pathlib import Path

import numpy as np


def load_tokenizer(path: str | os.PathLike):
    """The HF tokenizer saved in ``path`` (a MODEL_DIR or HF folder); never downloads."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # no "PyTorch was not found" notice
    from transformers import AutoTokenizer

    path = Path(path)
    if not (path / "tokenizer.json").is_file() and not (path / "tokenizer_config.json").is_file():
        raise FileNotFoundError(
            f"no tokenizer in {path} (tokenizer.json / tokenizer_config.json); "
            "pass --tokenizer DIR")
    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


# a tokenizer with fewer tokens than this share of the embedding rows is not the model's (real
# checkpoints pad the embedding by < 3%: Qwen 151646 of 151936, DeepSeek-V2 100015 of 102400)
MIN_VOCAB_SHARE = 0.9


def check_tokenizer(tokenizer, cfg, source: str | os.PathLike) -> None:
    """Refuse a tokenizer that does not belong to the model: more tokens than the embedding has
    rows (ids past it would be garbage or NaN) or far fewer (another model's vocabulary)."""
    have, rows = len(tokenizer), int(cfg.vocab_size)
    if have > rows or have < MIN_VOCAB_SHARE * rows:
        raise ValueError(
            f"tokenizer {source} has {have} tokens but the model's embedding has {rows} rows: it "
            "is not this model's tokenizer (pass the model's own with --tokenizer DIR)")


def check_seqlen(cfg, seqlen: int) -> None:
    """Refuse windows longer than the model's context (``max_position_embeddings``)."""
    if seqlen < 1:
        raise ValueError(f"--seqlen: must be >= 1, got {seqlen}")
    if seqlen > cfg.max_position_embeddings:
        raise ValueError(f"--seqlen: {seqlen} is longer than the model's context "
                         f"(max_position_embeddings = {cfg.max_position_embeddings})")


def model_windows(cfg, tokenizer_dir: str | os.PathLike, files, *, seqlen: int, nsamples: int,
                  sampling: str = "sample", seed: int = 42) -> np.ndarray:
    """``token_windows`` of ``files`` tokenized with the model's tokenizer, after checking that
    the tokenizer is the model's (`check_tokenizer`) and ``seqlen`` fits its context."""
    check_seqlen(cfg, seqlen)
    tokenizer = load_tokenizer(tokenizer_dir)
    check_tokenizer(tokenizer, cfg, tokenizer_dir)
    ids = tokenize_texts(tokenizer, files)
    check_text_length(ids, files, seqlen, sampling)
    return token_windows(ids, seqlen=seqlen, nsamples=nsamples, sampling=sampling, seed=seed)


def check_text_length(ids: np.ndarray, files, seqlen: int, sampling: str = "whole") -> None:
    """A text too short for one window of ``seqlen`` tokens (``sample``: one more, the offset
    range) is an error naming the files and --seqlen."""
    need = seqlen + 1 if sampling == "sample" else seqlen
    if len(ids) < need:
        names = ", ".join(str(f) for f in files)
        raise ValueError(f"{names}: {len(ids)} tokens, too few for one window of --seqlen "
                         f"{seqlen} (needs {need}); give a longer text or a smaller --seqlen")


def read_texts(files: Sequence[str | os.PathLike]) -> str:
    """The files' UTF-8 text joined by blank lines (one file: its text unchanged)."""
    if isinstance(files, str | os.PathLike):
        raise TypeError("text: give a list of files, not one path")
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
    """The files' joined text tokenized once with the tokenizer's defaults: [n] int32."""
    ids = tokenizer(read_texts(files), verbose=False)["input_ids"]  # no model_max_length warning
    return np.asarray(ids, dtype=np.int32)


def whole_windows(ids: np.ndarray, seqlen: int, max_windows: int | None = None) -> np.ndarray:
    """Non-overlapping windows [n, seqlen] from the start (remainder dropped), the first
    ``max_windows``."""
    if seqlen < 2:
        raise ValueError(f"seqlen: {seqlen} must be at least 2")
    n = len(ids) // seqlen
    if max_windows is not None:
        if max_windows < 1:
            raise ValueError(f"max_windows: {max_windows} must be positive")
        n = min(n, max_windows)
    if n == 0:
        raise ValueError(
            f"the text has {len(ids)} tokens, fewer than one window of seqlen={seqlen}")
    return ids[: n * seqlen].reshape(n, seqlen)


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
