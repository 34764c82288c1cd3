"""Streaming safetensors access for a Hugging Face checkpoint folder.

`SafetensorsReader` indexes a folder (one ``model.safetensors``, a ``model.safetensors.index.json``
with its shards, or a set of ``*.safetensors`` files) from the file headers only: names, shapes and
dtypes are known before a single tensor is read, so a conversion can validate the whole checkpoint
up front and then read tensor by tensor (``safetensors.safe_open``, numpy framework; bf16 arrives as
``ml_dtypes.bfloat16``). Peak memory is the tensors the caller holds, nothing more.

Every failure is a ``ValueError`` / ``FileNotFoundError`` that names the file and what is wrong:
missing shard, a header that does not parse, a file shorter than its header says (truncated), a
tensor whose bytes cannot be read, a floating-point tensor holding NaN or Inf.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors import safe_open

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


@dataclass(frozen=True, slots=True, kw_only=True)
class TensorInfo:
    """What a safetensors header says about one tensor."""

    file: Path  # the shard that holds it
    shape: tuple[int, ...]  # as stored (HF linears are [out, in])
    dtype: str  # safetensors dtype name: "F32", "BF16", "F16", ...


def _header_infos(path: Path) -> dict[str, TensorInfo]:
    """Read one file's header; a clear error for a truncated or corrupted file."""
    try:
        with safe_open(str(path), framework="numpy") as f:
            out = {}
            for key in f.keys():
                sl = f.get_slice(key)
                out[key] = TensorInfo(file=path, shape=tuple(int(d) for d in sl.get_shape()),
                                      dtype=str(sl.get_dtype()))
            return out
    except FileNotFoundError:
        raise
    except Exception as err:  # safetensors raises its own SafetensorError (an Exception)
        size = path.stat().st_size if path.exists() else 0
        raise ValueError(f"{path}: not a readable safetensors file ({size} bytes; truncated or "
                         f"corrupted?): {err}") from None


class SafetensorsReader:
    """Name -> tensor access over every safetensors file of an HF folder, read lazily."""

    def __init__(self, hf_dir: str | os.PathLike):
        self.dir = Path(hf_dir)
        if not self.dir.is_dir():
            raise FileNotFoundError(f"{self.dir}: no such directory")
        index = self.dir / INDEX_FILE
        if index.is_file():
            files = self._files_from_index(index)
        elif (self.dir / SINGLE_FILE).is_file():
            files = [self.dir / SINGLE_FILE]
        else:
            files = sorted(self.dir.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(
                f"{self.dir}: no {SINGLE_FILE}, {INDEX_FILE} or *.safetensors file")
        self.infos: dict[str, TensorInfo] = {}
        for path in files:
            for key, info in _header_infos(path).items():
                if key in self.infos:
                    raise ValueError(f"tensor {key} appears in both {self.infos[key].file.name} "
                                     f"and {path.name}")
                self.infos[key] = info
        if index.is_file():
            self._check_index(index)
        self._open: dict[Path, object] = {}

    def release(self) -> None:
        """Close the open files: their mapped pages stop counting in this process's memory."""
        for handle in self._open.values():
            handle.__exit__(None, None, None)
        self._open.clear()

    def __enter__(self) -> SafetensorsReader:
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def _files_from_index(self, index: Path) -> list[Path]:
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise ValueError(f"{index}: not a safetensors index ({err})") from None
        self._weight_map = dict(weight_map)
        names = sorted(set(weight_map.values()))
        missing = [n for n in names if not (self.dir / n).is_file()]
        if missing:
            raise FileNotFoundError(f"{self.dir}: shard(s) listed in {INDEX_FILE} are missing: "
                                    f"{', '.join(missing)}")
        return [self.dir / n for n in names]

    def _check_index(self, index: Path) -> None:
        """The index and the shard headers must agree, tensor by tensor."""
        for key, shard in self._weight_map.items():
            info = self.infos.get(key)
            if info is None or info.file.name != shard:
                raise ValueError(f"{index.name} says tensor {key} is in {shard}, but that shard "
                                 f"does not hold it")

    def keys(self) -> Iterable[str]:
        return self.infos.keys()

    def __contains__(self, key: str) -> bool:
        return key in self.infos

    def shape(self, key: str) -> tuple[int, ...]:
        return self.infos[key].shape

    def get(self, key: str) -> np.ndarray:
        """Read one tensor (a fresh numpy array; bf16 as ml_dtypes.bfloat16)."""
        info = self.infos[key]
        try:
            handle = self._open.get(info.file)
            if handle is None:
                handle = safe_open(str(info.file), framework="numpy").__enter__()
                self._open[info.file] = handle
            arr = handle.get_tensor(key)
        except Exception as err:
            raise ValueError(f"{info.file}: cannot read tensor {key} ({err})") from None
        if tuple(arr.shape) != info.shape:
            raise ValueError(f"{info.file}: tensor {key} read as {arr.shape}, header says "
                             f"{info.shape}")
        arr = np.array(arr, copy=True)  # own the memory: the mapping closes at release()
        if arr.dtype.kind == "f" or arr.dtype.name == "bfloat16":
            bad = int(arr.size - np.count_nonzero(np.isfinite(arr.astype(np.float32))))
            if bad:
                raise ValueError(f"{info.file}: tensor {key} has {bad} NaN or Inf value(s); the "
                                 "checkpoint is damaged (download or export it again)")
        return arr
