"""MODEL_DIR: our on-disk model (Orbax checkpoints per layer group + config + tokenizer).

Layout::

    MODEL_DIR/
      model.json            {"format": "mxmoe-jax/model/1", "config": ModelConfig.to_dict(),
                             "dtype": "float32"|"bfloat16", "groups": ["globals", "layers/0", ...]}
      config.json           the Hugging Face config.json the model came from (tokenizers and HF
                            tools read it; ModelConfig.from_hf of it equals model.json's config)
      params/globals/       Orbax checkpoint: embed/embedding, final_norm/scale, lm_head/kernel
      params/layers/<i>/    Orbax checkpoint: every parameter of layer i
      tokenizer.json, tokenizer_config.json, ... (copied from the HF folder when present)

Parameters are named by the flat keys of ``mxmoe_jax.models.param_shapes`` (``layers/3/mlp/
experts/gate``); inside a group checkpoint the key below the group is a nested dict. One Orbax
checkpoint per layer lets conversion write, and export read, one layer at a time: peak host memory
is one layer plus the embeddings, however large the model.

Every write goes to a hidden temporary sibling folder renamed into place at the end, so a failure
leaves nothing half-written; an existing non-empty MODEL_DIR is replaced only with ``force``.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from mxmoe_jax.jsonio import MODEL_FORMAT as FORMAT
from mxmoe_jax.jsonio import check_writable, read_json

MANIFEST = "model.json"
HF_CONFIG = "config.json"
PARAMS = "params"
GLOBALS = "globals"
# files copied from an HF folder into MODEL_DIR (and back on export) when present
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json",
                   "chat_template.jinja", "chat_template.json", "generation_config.json")

_DTYPES = {"fp32": "float32", "float32": "float32", "f32": "float32",
           "bf16": "bfloat16", "bfloat16": "bfloat16"}


def dtype_name(dtype: Any) -> str:
    """Canonical name ("float32" | "bfloat16") of a dtype given as a string or a numpy/jnp dtype."""
    if isinstance(dtype, str):
        name = _DTYPES.get(dtype.lower())
    else:
        name = _DTYPES.get(np.dtype(dtype).name)
    if name is None:
        raise ValueError(f"dtype: {dtype!r} is not supported (use bf16 or fp32)")
    return name


def np_dtype(dtype: Any) -> np.dtype:
    """The numpy dtype (ml_dtypes for bf16) of a dtype given as a string or dtype."""
    import ml_dtypes

    return np.dtype(ml_dtypes.bfloat16) if dtype_name(dtype) == "bfloat16" else np.dtype("float32")


def group_of(key: str) -> tuple[str, str]:
    """Flat key -> (group, key inside it): ``layers/3/attn/...`` -> ("layers/3", "attn/...")."""
    parts = key.split("/")
    if parts[0] == "layers" and len(parts) > 2:
        return "/".join(parts[:2]), "/".join(parts[2:])
    return GLOBALS, key


def _nest(flat: dict[str, np.ndarray]) -> dict:
    tree: dict = {}
    for key, value in flat.items():
        node = tree
        *path, leaf = key.split("/")
        for p in path:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree


def _flatten(tree: dict, prefix: str = "") -> dict[str, np.ndarray]:
    out = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "/"))
        else:
            out[key] = np.asarray(v)
    return out


def _checkpointer():
    import orbax.checkpoint as ocp

    return ocp.PyTreeCheckpointer()


@contextlib.contextmanager
def sigint_deferred():
    """Hold Ctrl-C until the block ends, then deliver it. For an Orbax save: it finishes in
    background threads, which a KeyboardInterrupt in the main thread leaves writing into the
    temporary folder `AtomicDir` is removing (it stayed behind) and raising at interpreter exit
    (a traceback after the one-line message). One save is one layer group: a short wait."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list = []
    old = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(frame))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)
    if caught:
        if callable(old):
            old(signal.SIGINT, caught[0])  # Python's default handler raises KeyboardInterrupt
        elif old == signal.SIG_DFL:
            os.kill(os.getpid(), signal.SIGINT)


def check_out_dir(out: str | os.PathLike, force: bool) -> Path:
    """Refuse to replace an existing non-empty folder (or a file) unless ``force``, and an
    ``out`` that cannot be created (under a file, in a folder that is not writable)."""
    out = Path(out)
    check_writable(out)
    if out.exists() and not force:
        if not out.is_dir():
            raise FileExistsError(f"{out} exists and is not a folder; pass --force to replace it")
        if any(out.iterdir()):
            raise FileExistsError(f"{out} exists and is not empty; pass --force to replace it")
    return out


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    return True


class AtomicDir:
    """A folder written under a temporary sibling name and renamed into place on success.

    ``with AtomicDir(out, force=...) as tmp: ...write into tmp...``; on an exception the temporary
    folder is removed and ``out`` is untouched.
    """

    def __init__(self, out: str | os.PathLike, *, force: bool = False):
        self.out = check_out_dir(out, force).absolute()
        self.force = force
        self.tmp = self.out.parent / f".{self.out.name}.tmp-{os.getpid()}"

    def __enter__(self) -> Path:
        try:
            self.out.parent.mkdir(parents=True, exist_ok=True)
            self._remove_stale()
            if self.tmp.exists():
                shutil.rmtree(self.tmp)
            self.tmp.mkdir()
        except OSError as err:
            raise ValueError(f"{self.out}: cannot be written ({err.strerror or err}); choose "
                             "another --out") from None
        return self.tmp

    def _remove_stale(self) -> None:
        """Remove temporary folders of ``out`` left by processes that no longer run (a
        ``kill -9`` mid-write), and their ``.old-`` copies once ``out`` exists (killed while
        deleting the replaced folder); those of live processes (another writer) are left alone.
        An ``.old-`` folder without ``out`` (killed between the two renames) is kept: it may be
        the one complete copy."""
        kinds = ("tmp", "old") if self.out.exists() else ("tmp",)
        for kind in kinds:
            for stale in self.out.parent.glob(f".{glob.escape(self.out.name)}.{kind}-*"):
                pid = stale.name.rsplit("-", 1)[1]
                if pid.isdigit() and not _alive(int(pid)) and stale.is_dir():
                    shutil.rmtree(stale, ignore_errors=True)

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        old = None
        if self.out.exists() or self.out.is_symlink():
            # rename the old one aside first so that a crash never leaves neither
            old = self.out.parent / f".{self.out.name}.old-{os.getpid()}"
            os.replace(self.out, old)
        os.replace(self.tmp, self.out)
        if old is not None:
            if old.is_dir() and not old.is_symlink():
                shutil.rmtree(old)
            else:
                old.unlink()


class ModelDirWriter:
    """Writes a MODEL_DIR one group (layer) at a time. Use via `open_model_dir`."""

    def __init__(self, root: Path):
        self.root = root
        self.groups: list[str] = []
        self.dtypes: set[str] = set()
        self._ckpt = _checkpointer()

    def write_group(self, group: str, flat: dict[str, np.ndarray]) -> None:
        """Write one group's parameters (keys relative to the group) as an Orbax checkpoint."""
        if group in self.groups:
            raise ValueError(f"group {group} written twice")
        for key, arr in flat.items():
            self.dtypes.add(dtype_name(arr.dtype))
            if not np.all(np.isfinite(arr.astype(np.float32))):
                raise ValueError(f"parameter {group}/{key} has non-finite values")
        with sigint_deferred():
            self._ckpt.save(self.root / PARAMS / group, _nest(flat))
        self.groups.append(group)

    def finish(self, cfg, *, hf_config: dict | None = None,
               tokenizer_dir: str | os.PathLike | None = None) -> None:
        """Write model.json, config.json and copy the tokenizer files."""
        if len(self.dtypes) > 1:
            raise ValueError(f"parameters have mixed dtypes {sorted(self.dtypes)}")
        dtype = next(iter(self.dtypes)) if self.dtypes else "float32"
        manifest = {"format": FORMAT, "dtype": dtype, "groups": self.groups,
                    "config": cfg.to_dict()}
        (self.root / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
        hf = dict(hf_config if hf_config is not None else cfg.hf_config)
        hf["dtype"] = dtype
        hf.pop("torch_dtype", None)
        (self.root / HF_CONFIG).write_text(json.dumps(hf, indent=2) + "\n")
        if tokenizer_dir is not None:
            copy_tokenizer_files(tokenizer_dir, self.root)


def copy_tokenizer_files(src: str | os.PathLike, dst: str | os.PathLike) -> list[str]:
    """Copy the tokenizer / generation files that exist in ``src`` into ``dst``."""
    src, dst = Path(src), Path(dst)
    copied = []
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)
            copied.append(name)
    return copied


class open_model_dir:  # noqa: N801 (used like a function: ``with open_model_dir(...) as w``)
    """``with open_model_dir(out, force=...) as writer:`` write groups, then ``writer.finish(cfg)``.

    Nothing appears at ``out`` unless the block ends without an exception and ``finish`` ran.
    """

    def __init__(self, out: str | os.PathLike, *, force: bool = False):
        self._atomic = AtomicDir(out, force=force)
        self.writer: ModelDirWriter | None = None

    def __enter__(self) -> ModelDirWriter:
        self.writer = ModelDirWriter(self._atomic.__enter__())
        return self.writer

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None and not (self.writer.root / MANIFEST).is_file():
            exc_type = RuntimeError  # finish() was never called: do not publish a partial dir
            self._atomic.__exit__(exc_type, None, None)
            raise RuntimeError("open_model_dir: finish(cfg) was not called; nothing written")
        self._atomic.__exit__(exc_type, exc, tb)


def save_model_dir(cfg, params, model_dir: str | os.PathLike, *, force: bool = False,
                   tokenizer_dir: str | os.PathLike | None = None) -> Path:
    """Save a model (an ``MoECausalLM`` or its flat params) with its config to ``model_dir``."""
    if not isinstance(params, dict):
        from mxmoe_jax.models import to_flat_params

        params = to_flat_params(params)
    groups: dict[str, dict[str, np.ndarray]] = {}
    for key, value in params.items():
        group, sub = group_of(key)
        groups.setdefault(group, {})[sub] = np.asarray(value)
    with open_model_dir(model_dir, force=force) as writer:
        for group in sorted(groups, key=_group_order):
            writer.write_group(group, groups[group])
        writer.finish(cfg, tokenizer_dir=tokenizer_dir)
    return Path(model_dir)


def _group_order(group: str) -> tuple[int, int]:
    return (-1, 0) if group == GLOBALS else (0, int(group.split("/")[1]))


def read_manifest(model_dir: str | os.PathLike) -> dict:
    """model.json of a MODEL_DIR, with a clear error when it is not one."""
    model_dir = Path(model_dir)
    path = model_dir / MANIFEST
    if not path.is_file():
        hint = (" (it looks like a Hugging Face folder: convert it first with "
                "`mxmoe-jax convert --hf DIR --out MODEL_DIR`)"
                if (model_dir / HF_CONFIG).is_file() else "")
        raise FileNotFoundError(f"{model_dir} is not a MODEL_DIR: no {MANIFEST}{hint}")
    manifest = read_json(path, "MODEL_DIR manifest")
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{path}: format {manifest.get('format')!r}, expected {FORMAT!r}")
    return manifest


def load_config(model_dir: str | os.PathLike):
    """The ModelConfig of a MODEL_DIR (no parameters read)."""
    from mxmoe_jax.config import ModelConfig

    manifest = read_manifest(model_dir)
    try:
        return ModelConfig.from_dict(manifest["config"])
    except (KeyError, TypeError, ValueError, ArithmeticError, AttributeError) as err:
        # a hand-edited or damaged model.json: whatever the check, name the file
        raise ValueError(f"{Path(model_dir) / MANIFEST}: config: {err}") from None


def iter_groups(model_dir: str | os.PathLike, dtype: Any = None
                ) -> Iterator[tuple[str, dict[str, np.ndarray]]]:
    """Yield (group, {flat key: array}) one group at a time (streaming reads)."""
    model_dir = Path(model_dir)
    manifest = read_manifest(model_dir)
    ckpt = _checkpointer()
    cast = None if dtype is None else np_dtype(dtype)
    for group in manifest["groups"]:
        path = model_dir / PARAMS / group
        if not path.is_dir():
            raise FileNotFoundError(f"{model_dir}: checkpoint {PARAMS}/{group} is missing")
        prefix = "" if group == GLOBALS else group + "/"
        flat = {prefix + k: v for k, v in _flatten(ckpt.restore(path.absolute())).items()}
        if cast is not None:
            flat = {k: v.astype(cast) for k, v in flat.items()}
        yield group, flat


def load_flat_params(model_dir: str | os.PathLike, dtype: Any = None):
    """(cfg, {flat key: np.ndarray}) of a MODEL_DIR; ``dtype`` None keeps the stored dtype."""
    cfg = load_config(model_dir)
    flat: dict[str, np.ndarray] = {}
    for _, group in iter_groups(model_dir, dtype):
        flat.update(group)
    return cfg, flat


def load_model_dir(model_dir: str | os.PathLike, dtype: Any = None):
    """(cfg, MoECausalLM) of a MODEL_DIR; params as stored, or cast to ``dtype`` (bf16|fp32)."""
    from mxmoe_jax.models import from_flat_params

    cfg, flat = load_flat_params(model_dir, dtype)
    stored = read_manifest(model_dir)["dtype"]
    import jax.numpy as jnp

    jdtype = jnp.bfloat16 if dtype_name(dtype or stored) == "bfloat16" else jnp.float32
    return cfg, from_flat_params(cfg, flat, jdtype)
