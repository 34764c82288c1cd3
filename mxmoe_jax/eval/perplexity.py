"""Perplexity with the original MxMoE protocol (its README §6), on any text file.

Protocol, exactly: tokenize the whole file once with the tokenizer's defaults; cut the ids into
non-overlapping windows of ``seqlen`` (the remainder is dropped); take the first ``max_windows``;
in each window tokens 2..seqlen are predicted from the ones before; ``ppl = exp(mean NLL)`` over all
predicted tokens, computed in float32.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

# logits_fn(ids [B, T] int32) -> logits [B, T, V]
LogitsFn = Callable[[jax.Array], jax.Array]


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class PerplexityResult:
    ppl: float  # exp(mean NLL)
    nll: float  # mean next-token negative log-likelihood (nats)
    tokens: int  # predicted tokens: windows * (seqlen - 1)
    windows: int  # windows evaluated

    def to_dict(self) -> dict:
        return {"ppl": self.ppl, "tokens": self.tokens, "windows": self.windows}


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


def tokenize_file(tokenizer, text_file: str | os.PathLike) -> np.ndarray:
    """The whole file tokenized once with the tokenizer's defaults: [n] int32."""
    text = Path(text_file).read_text(encoding="utf-8")
    ids = tokenizer(text, verbose=False)["input_ids"]  # whole file: no model_max_length warning
    return np.asarray(ids, dtype=np.int32)


def windows(ids: np.ndarray, seqlen: int, max_windows: int | None = None) -> np.ndarray:
    """Non-overlapping windows of ``seqlen`` ids (remainder dropped), the first ``max_windows``."""
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


@jax.jit
def _window_nll_sum(logits: jax.Array, ids: jax.Array) -> jax.Array:
    """Sum over the batch of the NLL of tokens 2..T given the ones before, in f32."""
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    target = ids[:, 1:]
    picked = jnp.take_along_axis(logp, target[..., None], axis=-1)[..., 0]
    return -jnp.sum(picked)


def perplexity(logits_fn: LogitsFn, ids_windows: np.ndarray, *, batch_size: int = 1,
               progress: bool = False) -> PerplexityResult:
    """Perplexity of ``logits_fn`` over ``ids_windows`` [n, seqlen]."""
    if batch_size < 1:
        raise ValueError(f"batch_size: {batch_size} must be positive")
    n, seqlen = ids_windows.shape
    total = 0.0
    starts = range(0, n, batch_size)
    if progress:
        from tqdm import tqdm

        starts = tqdm(starts, desc="eval", unit="batch")
    for s in starts:
        batch = jnp.asarray(ids_windows[s : s + batch_size])
        total += float(_window_nll_sum(logits_fn(batch), batch))
    tokens = n * (seqlen - 1)
    nll = total / tokens
    return PerplexityResult(ppl=math.exp(nll), nll=nll, tokens=tokens, windows=n)
