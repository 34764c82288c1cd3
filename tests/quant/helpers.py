"""Test helpers: an HF folder straight to (ModelConfig, flat params) through convert's name map."""

from __future__ import annotations

from pathlib import Path

import numpy as np

FIXTURE_NAMES = ("qwen2_moe_norm", "qwen2_moe_sparse_step", "qwen3_moe", "mixtral",
                 "mixtral_sliding", "olmoe", "deepseek_v2_qlora", "deepseek_v2_lite")


def load_hf_flat(hf_dir: Path, dtype=np.float32):
    """(cfg, {flat key: array}) of an HF folder, without writing a MODEL_DIR."""
    from mxmoe_jax.convert import hf_to_flax, name_map
    from mxmoe_jax.convert.safetensors_io import SafetensorsReader

    from mxmoe_jax.config import ModelConfig

    cfg = ModelConfig.from_hf(hf_to_flax.read_hf_config(hf_dir))
    flat = {}
    with SafetensorsReader(hf_dir) as reader:
        for src in hf_to_flax.plan(cfg, reader):
            arr = name_map.to_ours(src, [reader.get(n) for n in src.hf_names])
            flat[src.key] = np.asarray(arr, np.float32).astype(dtype)
    return cfg, flat
