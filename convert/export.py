"""Flat params / MODEL_DIR -> Hugging Face folder (safetensors + config.json).

The weights are written in the hub layout every family's released checkpoints use (per-expert
``experts.{e}.{gate,up,down}_proj.weight``, Mixtral's ``block_sparse_moe.experts.{e}.w1/w2/w3``,
``[out, in]`` linears), in the dtype they are stored in, so transformers' ``from_pretrained`` (and
our own converter) read them back. ``export_hf`` streams a MODEL_DIR one layer at a time and cuts
shards at ``max_shard_bytes`` (``model-0000i-of-0000N.safetensors`` +
``model.safetensors.index.json``; one ``model.safetensors`` when everything fits in one shard).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from mxmoe_jax.convert import name_map
from safetensors.numpy import save_file

DEFAULT_MAX_SHARD_BYTES = 4 * 2**30


def hf_tensors(cfg, flat: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Our flat params (any subset, e.g. one layer) -> {HF name: array} in the hub layout."""
    shapes = {k: tuple(v.shape) for k, v in flat.items()}
    out = {}
    for src in name_map.sources(cfg.model_type, shapes):
        for hf, arr in zip(src.hf_names, name_map.to_hf(src, flat[src.key]), strict=True):
            out[hf] = arr
    return out


def hf_config_dict(cfg, dtype: str) -> dict:
    """The HF config.json to write: the one the model came from, with the stored dtype."""
    from mxmoe_jax.models.io import dtype_name

    if not cfg.hf_config:
        raise ValueError("cfg.hf_config is empty: build the ModelConfig with ModelConfig.from_hf")
    hf = dict(cfg.hf_config)
    hf.pop("torch_dtype", None)
    hf["dtype"] = dtype_name(dtype)
    return hf


class _ShardWriter:
    """Accumulates HF tensors and writes a shard whenever ``max_bytes`` would be exceeded."""

    def __init__(self, out: Path, max_bytes: int):
        self.out, self.max_bytes = out, max_bytes
        self.pending: dict[str, np.ndarray] = {}
        self.pending_bytes = 0
        self.shards: list[tuple[Path, list[str]]] = []  # (temporary file, tensor names)
        self.total_bytes = 0

    def add(self, tensors: dict[str, np.ndarray]) -> None:
        size = sum(a.nbytes for a in tensors.values())
        if self.pending and self.pending_bytes + size > self.max_bytes:
            self.flush()
        self.pending.update(tensors)
        self.pending_bytes += size
        self.total_bytes += size

    def flush(self) -> None:
        if not self.pending:
            return
        path = self.out / f".shard-{len(self.shards):05d}.safetensors.tmp"
        save_file(self.pending, str(path), metadata={"format": "pt"})
        self.shards.append((path, list(self.pending)))
        self.pending, self.pending_bytes = {}, 0

    def finish(self) -> list[str]:
        """Rename the shards to their final names; write the index when there are several."""
        self.flush()
        n = len(self.shards)
        if n == 1:
            os.replace(self.shards[0][0], self.out / "model.safetensors")
            return ["model.safetensors"]
        weight_map, names = {}, []
        for i, (path, keys) in enumerate(self.shards):
            name = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(path, self.out / name)
            names.append(name)
            weight_map.update(dict.fromkeys(keys, name))
        index = {"metadata": {"total_size": self.total_bytes},
                 "weight_map": dict(sorted(weight_map.items()))}
        _write_text(self.out / "model.safetensors.index.json", json.dumps(index, indent=2) + "\n")
        return names


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _write(cfg, groups: Iterable[dict[str, np.ndarray]], hf_out: Path, dtype: str,
           max_shard_bytes: int) -> list[str]:
    from mxmoe_jax.models.io import np_dtype

    hf_out.mkdir(parents=True, exist_ok=True)
    target = np_dtype(dtype)
    writer = _ShardWriter(hf_out, max_shard_bytes)
    try:
        for flat in groups:
            writer.add({k: v.astype(target, copy=False) for k, v in hf_tensors(cfg, flat).items()})
        names = writer.finish()
    except BaseException:
        for path, _ in writer.shards:
            path.unlink(missing_ok=True)
        raise
    _write_text(hf_out / "config.json", json.dumps(hf_config_dict(cfg, dtype), indent=2) + "\n")
    return names


def write_hf_folder(cfg, flat: dict[str, np.ndarray], hf_out: str | os.PathLike,
                    dtype: str = "float32",
                    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> list[str]:
    """Write in-memory flat params as HF safetensors + config.json into ``hf_out``.

    Writes into the folder as it is (other files, e.g. a tokenizer, stay); each file appears
    under its final name only when complete. Returns the safetensors file names.
    """
    from mxmoe_jax.models import param_shapes
    from mxmoe_jax.models.io import group_of

    want = param_shapes(cfg)
    missing, unexpected = sorted(set(want) - set(flat)), sorted(set(flat) - set(want))
    bad = [f"{k}: {tuple(np.shape(flat[k]))} != {want[k]}" for k in sorted(set(want) & set(flat))
           if tuple(np.shape(flat[k])) != want[k]]
    if missing or unexpected or bad:
        raise ValueError(f"params do not match the config: missing {missing[:8]}, unexpected "
                         f"{unexpected[:8]}, wrong shape {bad[:8]}")
    groups: dict[str, dict[str, np.ndarray]] = {}
    for key, value in flat.items():
        groups.setdefault(group_of(key)[0], {})[key] = np.asarray(value)
    from mxmoe_jax.models.io import _group_order

    ordered = (groups[g] for g in sorted(groups, key=_group_order))
    return _write(cfg, ordered, Path(hf_out), dtype, max_shard_bytes)


def export_hf(model_dir: str | os.PathLike, hf_out: str | os.PathLike, *, force: bool = False,
              dtype: str | None = None, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
              progress: bool = False) -> Path:
    """MODEL_DIR -> HF folder, one layer in memory at a time; atomic (temporary sibling + rename).

    ``dtype`` None keeps the stored dtype. Tokenizer files of MODEL_DIR are copied along.
    """
    from mxmoe_jax.models import io

    manifest = io.read_manifest(model_dir)
    cfg = io.load_config(model_dir)
    dtype = io.dtype_name(dtype or manifest["dtype"])
    groups = (flat for _, flat in io.iter_groups(model_dir))
    if progress:
        from tqdm import tqdm

        groups = tqdm(groups, total=len(manifest["groups"]), desc="export-hf", unit="group")
    with io.AtomicDir(hf_out, force=force) as tmp:
        _write(cfg, groups, tmp, dtype, max_shard_bytes)
        io.copy_tokenizer_files(model_dir, tmp)
    return Path(hf_out)
