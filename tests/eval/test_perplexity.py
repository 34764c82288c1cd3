"""Perplexity protocol: NLL bookkeeping, and parity with transformers on the tiny model."""

from __future__ import annotations

import json
import math

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TINY_MODEL, WIKITEXT, require_shared, torch_available

from mxmoe_jax.cli import main as cli_main
from mxmoe_jax.eval.perplexity import perplexity

# WikiText-2 raw test, first 16 windows of 512 tokens, fp32, computed with transformers 5.17 and
# 5.24 on CPU torch (../shared/models/qwen2moe-tiny-books/README.md, "Reference values").
TINY_WIKITEXT_PPL_16x512 = 562.413


def test_uniform_logits_give_the_vocabulary_size():
    vocab = 37
    ids = np.random.default_rng(0).integers(0, vocab, (3, 9)).astype(np.int32)
    r = perplexity(lambda b: jnp.zeros((*b.shape, vocab)), ids, batch_size=2)
    assert r.tokens == 3 * 8 and r.windows == 3
    assert r.ppl == pytest.approx(vocab, rel=1e-6)


def test_nll_counts_only_tokens_two_to_seqlen():
    # A "model" that is certain of token 0 everywhere: windows of all zeros cost nothing (the
    # first token is never predicted), so ppl is exactly 1.
    ids = np.zeros((2, 6), dtype=np.int32)

    def certain(b):
        return jnp.where(jnp.arange(5)[None, None] == 0, 0.0, -50.0) * jnp.ones((*b.shape, 5))

    assert perplexity(certain, ids).ppl == pytest.approx(1.0)
    ids[:, 0] = 3  # the first token is never a target: still 1
    assert perplexity(certain, ids).ppl == pytest.approx(1.0)
    ids[0, 1] = 3  # one target of 10 now has probability ~e^-50: mean NLL is ~50 / 10
    assert perplexity(certain, ids).nll == pytest.approx(5.0, rel=1e-4)


@pytest.mark.slow
def test_tiny_model_wikitext_ppl_matches_transformers(tiny_model_dir, capsys):
    require_shared(WIKITEXT)
    rc = cli_main(["eval", "--model", str(tiny_model_dir), "--text", str(WIKITEXT),
                   "--seqlen", "512", "--max-windows", "16", "--json"])
    assert rc == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["windows"] == 16 and result["tokens"] == 16 * 511
    assert math.isclose(result["ppl"], TINY_WIKITEXT_PPL_16x512, rel_tol=1e-3)
    if torch_available():  # live: transformers on this machine, same protocol
        assert math.isclose(result["ppl"], _transformers_ppl(), rel_tol=1e-3)


def _transformers_ppl() -> float:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    require_shared(TINY_MODEL)
    tok = AutoTokenizer.from_pretrained(TINY_MODEL)
    model = AutoModelForCausalLM.from_pretrained(TINY_MODEL, dtype=torch.float32).eval()
    ids = tok(WIKITEXT.read_text(encoding="utf-8"))["input_ids"]
    ids = torch.tensor(ids[: 16 * 512]).reshape(16, 512)
    with torch.no_grad():
        logits = model(ids).logits.float()
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                            ids[:, 1:].reshape(-1))
    return math.exp(float(nll))
