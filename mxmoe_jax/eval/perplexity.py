"""Perplexity with the original MxMoE protocol (its README §6), on any text file.

Protocol, exactly: tokenize the whole file once with the tokenizer's defaults; cut the ids into
non-overlapping windows of ``seqlen`` (the remainder is dropped); take the first ``max_windows``
(both in ``mxmoe_jax.data``: ``tokenize_texts``, ``whole_windows``); in each window tokens
2..seqlen are predicted from the ones before; ``ppl = exp(mean NLL)`` over all predicted tokens,
computed in float32.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

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
