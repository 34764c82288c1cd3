"""The pipeline's JSON artifacts (trace, loss, sensitivity, perf, qconfig): atomic writes,
checked reads."""

from __future__ import annotations

import json
import os
from pathlib import Path

# The artifact format tags, defined once (each artifact's module documents its schema).
MODEL_FORMAT = "mxmoe-jax/model/1"
QMODEL_FORMAT = "mxmoe-jax/qmodel/1"
TRACE_FORMAT = "mxmoe-jax/trace/1"
LOSS_FORMAT = "mxmoe-jax/loss/1"
PERF_FORMAT = "mxmoe-jax/perf/1"
QCONFIG_FORMAT = "mxmoe-jax/qconfig/1"
SENSITIVITY_FORMAT = "mxmoe-jax/sensitivity/1"


def check_writable(path: str | os.PathLike) -> Path:
    """Refuse an output path that cannot be created, before any work: a file where a folder must
    be, or a first existing folder that is not writable. A ValueError names both."""
    path = Path(path).absolute()
    parent = path.parent
    while not parent.exists():  # the nearest existing ancestor decides
        parent = parent.parent
    if not parent.is_dir():
        raise ValueError(f"{path}: cannot be written: {parent} is a file, not a folder; choose "
                         "an --out inside a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"{path}: cannot be written: {parent} is not writable; choose an "
                         "--out in a folder you can write to")
    return path


def write_json_atomic(path: str | os.PathLike, obj, *, force: bool = True) -> Path:
    """Write ``obj`` as JSON to a temporary name beside ``path``, then rename it into place, so a
    reader never sees a half-written file. ``force=False`` refuses to replace an existing file.
    Any failure to write (no such folder can be made, no permission, a full disk) is a
    ValueError naming ``path``, and the temporary file is gone."""
    path = Path(path)
    if path.exists() and not force:
        raise FileExistsError(f"{path} exists; pass --force to overwrite")
    if path.is_dir():
        raise ValueError(f"{path} is a folder; name the JSON file to write")
    check_writable(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(obj, indent=1) + "\n")
        os.replace(tmp, path)
    except OSError as err:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        raise ValueError(f"{path}: cannot be written ({err.strerror or err}); choose another "
                         "--out") from None
    return path


def read_json(path: str | os.PathLike, what: str, fmt: str | None = None) -> dict:
    """Read a JSON artifact; a missing file, invalid JSON or UTF-8, anything but a JSON object,
    or (with ``fmt``) another ``format`` tag is an error naming the file and ``what`` it should
    have been."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: {what} not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a {what} is a JSON object, this file holds a JSON "
                         f"{type(data).__name__}")
    if fmt is not None and (not isinstance(data, dict) or data.get("format") != fmt):
        got = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise ValueError(f"{path}: format {got!r} is not {fmt!r} (expected a {what})")
    return data
