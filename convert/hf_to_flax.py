"""Hugging Face folder -> MODEL_DIR, streamed layer by layer.

``convert_hf(hf_dir, out_dir, dtype, force)``:

1. reads ``config.json`` -> ``ModelConfig`` (unknown ``model_type``: an error listing the
   supported ones);
2. indexes the safetensors headers (`SafetensorsReader`): missing shards and truncated or
   corrupted files fail here, before anything is written;
3. plans every parameter from the name map (`convert.name_map`) against
   ``mxmoe_jax.models.param_shapes(cfg)`` and checks, from the headers alone, that every HF tensor
   needed exists with the right shape and that no HF tensor is left over (all problems reported
   by name in one error);
4. reads, transforms, casts and writes one group at a time (the globals, then layer 0, 1, ...)
   through ``mxmoe_jax.models.io.open_model_dir``, so peak host memory is about the largest of
   (embeddings + lm_head) and one layer, and a failure leaves nothing at ``out_dir``;
5. copies the tokenizer files and writes the configs.
"""

from __future__ import annotations

import json
import os
import resource
import time
from dataclasses import dataclass
from pathlib import Path

from mxmoe_jax.convert import name_map
from mxmoe_jax.convert.safetensors_io import SafetensorsReader

_LIST_MAX = 12  # names shown per problem kind in an error message


@dataclass(frozen=True, slots=True, kw_only=True)
class ConvertReport:
    """What `convert_hf` did and what it cost."""

    out: Path  # the MODEL_DIR written
    model_type: str  # HF model_type
    dtype: str  # "float32" | "bfloat16" as written
    num_params: int  # parameters written (tied embeddings counted once)
    num_groups: int  # Orbax checkpoints written (globals + one per layer)
    max_group_bytes: int  # largest group held in memory at once (as written)
    peak_rss_bytes: int  # the process's peak resident memory at the end (ru_maxrss)
    start_rss_bytes: int  # resident memory when the conversion started
    seconds: float  # wall time


def _rss_now() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def read_hf_config(hf_dir: str | os.PathLike) -> dict:
    """``config.json`` of an HF folder, with clear errors for a missing or broken file."""
    hf_dir = Path(hf_dir)
    if not hf_dir.is_dir():
        raise FileNotFoundError(f"{hf_dir}: no such directory")
    path = hf_dir / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{hf_dir}: no config.json (not a Hugging Face model folder)")
    try:
        hf = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(hf, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return hf


def hf_model_config(hf_dir: str | os.PathLike):
    """(config.json dict, ModelConfig) of an HF folder; whatever is wrong with config.json is a
    ValueError naming it."""
    from mxmoe_jax.config import ModelConfig

    hf = read_hf_config(hf_dir)  # no file, not JSON, not an object: its own error
    try:
        name_map.family(hf.get("model_type"))  # the supported-list error, before anything else
        return hf, ModelConfig.from_hf(hf)
    except (KeyError, TypeError, ValueError, ArithmeticError, AttributeError) as err:
        # a damaged or unusual config.json: whatever the check, name the file
        raise ValueError(f"{Path(hf_dir) / 'config.json'}: {err}") from None


def _short(names: list[str]) -> str:
    more = f" ... and {len(names) - _LIST_MAX} more" if len(names) > _LIST_MAX else ""
    return ", ".join(names[:_LIST_MAX]) + more


def plan(cfg, reader: SafetensorsReader) -> list[name_map.Source]:
    """Every parameter's HF source, checked against the headers; one error lists all problems."""
    from mxmoe_jax.models import param_shapes

    shapes = param_shapes(cfg)
    srcs = name_map.sources(cfg.model_type, shapes, name_map.fused_expert_layers(reader.keys()))
    missing, bad_shape, used = [], [], set()
    for src in srcs:
        for hf, want in zip(src.hf_names, src.hf_shapes(), strict=True):
            used.add(hf)
            if hf not in reader:
                missing.append(hf)
            elif reader.shape(hf) != tuple(want):
                bad_shape.append(f"{hf}: expected shape {tuple(want)} (for {src.key} "
                                 f"{src.shape}), got {reader.shape(hf)}")
    ignored = {k for k in reader.keys() if k.endswith(name_map.IGNORED_SUFFIXES)}
    if cfg.tie_word_embeddings:
        ignored.add("lm_head.weight")  # some tied checkpoints store the copy anyway
    unexpected = sorted(set(reader.keys()) - used - ignored)
    problems = []
    if bad_shape:
        problems.append(f"{len(bad_shape)} tensor(s) with the wrong shape: {_short(bad_shape)}")
    if missing:
        problems.append(f"{len(missing)} tensor(s) missing: {_short(sorted(missing))}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected tensor(s) (not in a {cfg.model_type} "
                        f"model of this config): {_short(unexpected)}")
    if problems:
        raise ValueError(f"{reader.dir}: " + "; ".join(problems))
    return srcs


def convert_hf(hf_dir: str | os.PathLike, out_dir: str | os.PathLike, dtype: str = "fp32",
               force: bool = False, progress: bool = False) -> ConvertReport:
    """Convert an HF folder to a MODEL_DIR (see the module docstring). ``dtype``: bf16 | fp32."""
    from mxmoe_jax.models import io

    start, start_rss = time.perf_counter(), _rss_now()
    target = io.np_dtype(dtype)
    io.check_out_dir(out_dir, force)  # fail before reading anything large
    hf, cfg = hf_model_config(hf_dir)
    with SafetensorsReader(hf_dir) as reader:
        srcs = plan(cfg, reader)
        groups: dict[str, list[name_map.Source]] = {}
        for src in srcs:
            groups.setdefault(io.group_of(src.key)[0], []).append(src)
        order = sorted(groups, key=io._group_order)
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(order, desc=f"convert {cfg.model_type}", unit="group")
        num_params = max_group = 0
        with io.open_model_dir(out_dir, force=force) as writer:
            for group in order:
                flat = {}
                for src in groups[group]:
                    arr = name_map.to_ours(src, [reader.get(n) for n in src.hf_names])
                    flat[io.group_of(src.key)[1]] = arr.astype(target, copy=False)
                    num_params += arr.size
                max_group = max(max_group, sum(a.nbytes for a in flat.values()))
                writer.write_group(group, flat)
                del flat
                reader.release()  # drop the mapped pages of the shards read so far
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(rss=f"{_rss_now() / 2**20:.0f}MiB")
            writer.finish(cfg, hf_config=hf, tokenizer_dir=hf_dir)
        if bar is not None:
            bar.close()
    return ConvertReport(out=Path(out_dir), model_type=cfg.model_type,
                         dtype=io.dtype_name(dtype), num_params=int(num_params),
                         num_groups=len(order), max_group_bytes=int(max_group),
                         peak_rss_bytes=_peak_rss(), start_rss_bytes=start_rss,
                         seconds=time.perf_counter() - start)
