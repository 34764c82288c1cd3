"""The embedded default of ``mxmoe-jax run``: a tiny Qwen2-MoE trained on text shipped with Python.

No download anywhere: the text is ``pydoc_data.topics`` (the language reference topics that
CPython installs for ``help()``, ~0.5 MB), the tokenizer is a byte-level BPE trained on it with
``tokenizers``, and the model is our own Flax ``MoECausalLM`` with the ``qwen2_moe`` architecture
(routed experts with a sigmoid-gated shared expert, as Qwen1.5-MoE), trained for ~2 minutes
with optax on the CPU, then exported to a Hugging Face folder so the rest of the pipeline starts
from HF format like any user model. The last tenth of the text is held out for calibration and
evaluation.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class DefaultRecipe:
    vocab_size: int = 2048  # byte-level BPE trained on the text
    hidden_size: int = 128  # residual width
    num_layers: int = 4  # all MoE layers
    num_heads: int = 4  # head_dim 32
    num_experts: int = 8  # routed experts per layer
    top_k: int = 2  # experts per token
    moe_intermediate_size: int = 128  # per routed expert
    shared_intermediate_size: int = 256  # shared expert (sigmoid-gated)
    seqlen: int = 128  # training window
    batch_size: int = 16  # windows per step
    learning_rate: float = 3e-3  # AdamW peak, cosine decay
    max_steps: int = 300  # training steps (the same on every machine)
    seed: int = 0  # init and batch order

    def __post_init__(self):
        for field in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_experts",
                      "top_k", "moe_intermediate_size", "seqlen", "batch_size", "max_steps"):
            if getattr(self, field) <= 0:
                raise ValueError(f"{field}: must be positive")
        if self.top_k > self.num_experts:
            raise ValueError("top_k: larger than num_experts")
        if self.hidden_size % self.num_heads:
            raise ValueError("num_heads: must divide hidden_size")


def corpus_text() -> str:
    """The training text: every pydoc topic, sorted by name, joined by blank lines."""
    from pydoc_data import topics

    return "\n\n".join(topics.topics[k] for k in sorted(topics.topics))


def split_text(text: str) -> tuple[str, str, str]:
    """(train, calibration, evaluation): 90% / 5% / 5% of the text, cut at line ends."""
    def cut(frac: float) -> int:
        i = text.find("\n", int(len(text) * frac))
        return len(text) if i < 0 else i + 1

    a, b = cut(0.90), cut(0.95)
    return text[:a], text[a:b], text[b:]


def train_tokenizer(text: str, vocab_size: int, out_dir: Path) -> None:
    """Byte-level BPE, ``<|endoftext|>`` = id 0; writes tokenizer.json and tokenizer_config.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator([text], trainer=trainer)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"))
    (out_dir / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|endoftext|>",
        "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
        "add_bos_token": False, "model_max_length": 2048}, indent=2))


def hf_config(recipe: DefaultRecipe) -> dict:
    """A transformers ``Qwen2MoeConfig`` dict for the recipe."""
    return {
        "architectures": ["Qwen2MoeForCausalLM"], "model_type": "qwen2_moe",
        "vocab_size": recipe.vocab_size, "hidden_size": recipe.hidden_size,
        "intermediate_size": recipe.shared_intermediate_size,
        "num_hidden_layers": recipe.num_layers, "num_attention_heads": recipe.num_heads,
        "num_key_value_heads": recipe.num_heads, "hidden_act": "silu",
        "max_position_embeddings": 2048, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
        "tie_word_embeddings": True, "use_sliding_window": False, "sliding_window": None,
        "max_window_layers": recipe.num_layers, "attention_dropout": 0.0, "qkv_bias": True,
        "decoder_sparse_step": 1, "moe_intermediate_size": recipe.moe_intermediate_size,
        "shared_expert_intermediate_size": recipe.shared_intermediate_size,
        "num_experts_per_tok": recipe.top_k, "num_experts": recipe.num_experts,
        "norm_topk_prob": False, "output_router_logits": False, "router_aux_loss_coef": 0.001,
        "mlp_only_layers": [], "bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0,
        "initializer_range": 0.02, "use_cache": True, "dtype": "float32",
    }


def lm_loss(model, batch: jax.Array) -> jax.Array:
    """Mean next-token NLL of ``batch [B, T+1]`` (tokens 1..T predicted from those before)."""
    logits = model(batch[:, :-1])
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, batch[:, 1:, None], axis=-1))


def train_step():
    """A jitted ``step(model, optimizer, batch) -> loss`` (one optimizer update of `lm_loss`)."""
    from flax import nnx

    @nnx.jit
    def step(m, opt, batch):
        loss, grads = nnx.value_and_grad(lm_loss)(m, batch)
        opt.update(m, grads)
        return loss

    return step


def train_default_model(hf_out: str | os.PathLike, recipe: DefaultRecipe = DefaultRecipe(), *,
                        progress: bool = True) -> dict:
    """Train the default model and write it as a Hugging Face folder ``hf_out``.

    Also writes ``calib.txt`` and ``eval.txt`` (the held-out text) beside the weights. Returns a
    summary dict (steps, seconds, first and last training loss).
    """
    import optax
    from flax import nnx

    from mxmoe_jax.config import ModelConfig
    from mxmoe_jax.convert.export import write_hf_folder
    from mxmoe_jax.models import MoECausalLM, to_flat_params

    hf_out = Path(hf_out)
    train, calib, evaluation = split_text(corpus_text())
    train_tokenizer(train, recipe.vocab_size, hf_out)
    from tokenizers import Tokenizer

    ids = np.asarray(Tokenizer.from_file(str(hf_out / "tokenizer.json")).encode(train).ids,
                     dtype=np.int32)
    config = hf_config(recipe)
    cfg = ModelConfig.from_hf(config)
    model = MoECausalLM(cfg, dtype=jnp.float32, param_dtype=jnp.float32,
                        rngs=nnx.Rngs(recipe.seed))
    warmup = max(1, min(20, recipe.max_steps // 10))  # decay must outlast the warm-up
    schedule = optax.warmup_cosine_decay_schedule(0.0, recipe.learning_rate, warmup,
                                                  max(recipe.max_steps, warmup + 1),
                                                  recipe.learning_rate / 10)
    tx = optax.chain(optax.clip_by_global_norm(1.0),
                     optax.adamw(schedule, b1=0.9, b2=0.95, weight_decay=0.1))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

    step = train_step()
    rng = np.random.default_rng(recipe.seed)
    span = recipe.seqlen + 1
    losses, start = [], time.perf_counter()
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=recipe.max_steps, desc="train default model", unit="step")
    for _ in range(recipe.max_steps):
        offsets = rng.integers(0, len(ids) - span, recipe.batch_size)
        batch = jnp.asarray(np.stack([ids[o:o + span] for o in offsets]))
        losses.append(float(step(model, optimizer, batch)))
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    if bar is not None:
        bar.close()
    write_hf_folder(cfg, to_flat_params(model), hf_out, dtype="float32")
    (hf_out / "calib.txt").write_text(calib, encoding="utf-8")
    (hf_out / "eval.txt").write_text(evaluation, encoding="utf-8")
    return {"steps": len(losses), "train_seconds": round(time.perf_counter() - start, 1),
            "first_loss": round(losses[0], 4), "last_loss": round(float(np.mean(losses[-10:])), 4)}
