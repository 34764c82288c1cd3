"""Fuzzed readers: mutated safetensors headers and JSON artifacts either load or raise the error
the CLI turns into one line and exit 2 (ValueError / FileNotFoundError) naming the file.

Deterministic (``derandomize=True``) so CI sees the same examples every run.
"""

from __future__ import annotations

import copy
import json
import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

CLEAN = (ValueError, FileNotFoundError)  # what cli.main reports as one line, exit 2
FUZZ = settings(max_examples=150, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])


def _json_values():
    """Any JSON value (NaN and ±Inf included: Python's json reads and writes them)."""
    leaf = (st.none() | st.booleans() | st.integers(-2**63, 2**63)
            | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12)
            | st.sampled_from(["w4a16_g128_asym", "w16a16", "gate", "0", "1", "-1", ""]))
    return st.recursive(leaf, lambda kids: st.lists(kids, max_size=4)
                        | st.dictionaries(st.text(max_size=6), kids, max_size=4), max_leaves=8)


@st.composite
def _mutated(draw, obj):
    """``obj`` with 1-3 edits at random paths: a key or item removed, a value replaced by any
    JSON value, or a key added."""
    obj = copy.deepcopy(obj)
    for _ in range(draw(st.integers(1, 3))):
        node = obj
        while True:  # walk down a random path; stop at a random depth
            kids = list(node) if isinstance(node, dict) else list(range(len(node)))
            if not kids:
                break
            key = draw(st.sampled_from(kids))
            child = node[key]
            if isinstance(child, dict | list) and child and draw(st.booleans()):
                node = child
                continue
            op = draw(st.sampled_from(["drop", "replace", "replace", "add"]))
            if op == "drop":
                del node[key]
            elif op == "replace":
                node[key] = draw(_json_values())
            elif isinstance(node, dict):
                node[draw(st.text(max_size=6))] = draw(_json_values())
            else:
                node.append(draw(_json_values()))
            break
        if not isinstance(obj, dict | list):
            break
    return obj


def _assert_clean(call, *paths) -> None:
    """``call()`` loads, or raises a CLEAN error whose one-line message names one of ``paths``."""
    try:
        call()
    except CLEAN as err:
        msg = str(err)
        assert "\n" not in msg, msg
        assert any(str(p) in msg for p in paths), f"names no file: {msg}"


def _dump(path, obj) -> None:
    path.write_text(json.dumps(obj))


# --- JSON artifacts --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def artifacts():
    """A valid trace, loss table and perf table of one small synthetic model."""
    from mxmoe_jax.alloc.check_uniform import perf_for_trace
    from mxmoe_jax.alloc.synthetic import synthetic_loss, synthetic_trace

    schemes = ["w16a16", "w4a16_g-1_asym"]
    trace = synthetic_trace(num_layers=2, num_experts=3, top_k=2, moe_inter=64, hidden=128,
                            shared_ratio=1.0, num_tokens=64, seed=0)
    loss = synthetic_loss(trace, schemes, seed=0)
    return trace, loss, perf_for_trace(trace, schemes).table


@pytest.fixture(scope="module")
def qconfig():
    from mxmoe_jax.alloc.qconfig import Allocation, make_qconfig
    from tests.models.test_moe import tiny_cfg

    cfg = tiny_cfg(num_layers=2, shared_intermediate_size=10)
    layers = Allocation.uniform(cfg, "w4a16_g-1_asym").to_layers()
    return cfg, make_qconfig(layers, meta={"model_fingerprint": cfg.fingerprint()}, summary={})


def _solve_inputs(tmp_path, trace, loss, perf):
    from mxmoe_jax.alloc.problem import load_inputs

    paths = [tmp_path / n for n in ("trace.json", "loss.json", "perf.json")]
    for path, obj in zip(paths, (trace, loss, perf), strict=True):
        _dump(path, obj)
    _assert_clean(lambda: load_inputs(*paths, batch=64), *paths)


def test_valid_artifacts_load(artifacts, qconfig, tmp_path):
    """The unmutated files load (so the fuzz tests below start from files that work)."""
    from mxmoe_jax.alloc.problem import load_inputs
    from mxmoe_jax.alloc.qconfig import Allocation, load_qconfig

    paths = [tmp_path / n for n in ("trace.json", "loss.json", "perf.json")]
    for path, obj in zip(paths, artifacts, strict=True):
        _dump(path, obj)
    assert len(load_inputs(*paths, batch=64).layers) == 2
    cfg, q = qconfig
    _dump(tmp_path / "q.json", q)
    assert len(Allocation.from_qconfig(cfg, load_qconfig(tmp_path / "q.json"))) > 0


@FUZZ
@given(data=st.data())
def test_fuzzed_trace(artifacts, tmp_path, data):
    trace, loss, perf = artifacts
    _solve_inputs(tmp_path, data.draw(_mutated(trace)), loss, perf)


@FUZZ
@given(data=st.data())
def test_fuzzed_loss(artifacts, tmp_path, data):
    trace, loss, perf = artifacts
    _solve_inputs(tmp_path, trace, data.draw(_mutated(loss)), perf)


@FUZZ
@given(data=st.data())
def test_fuzzed_perf(artifacts, tmp_path, data):
    trace, loss, perf = artifacts
    small = dict(perf, points=perf["points"][:6])  # mutations land in a point more often
    _solve_inputs(tmp_path, trace, loss, data.draw(_mutated(small)))


@FUZZ
@given(data=st.data())
def test_fuzzed_qconfig(qconfig, tmp_path, data):
    from mxmoe_jax.alloc.qconfig import Allocation, load_qconfig

    cfg, q = qconfig
    path = tmp_path / "qconfig.json"
    _dump(path, data.draw(_mutated(q)))
    _assert_clean(lambda: Allocation.from_qconfig(cfg, load_qconfig(path), str(path)), path)


@FUZZ
@given(data=st.data())
def test_fuzzed_sensitivity(tmp_path, data):
    from mxmoe_jax.alloc.problem import layer_weights, load_sensitivity

    sens = {"format": "mxmoe-jax/sensitivity/1", "meta": {"scheme": "w2a16_g-1_asym"},
            "layers": {"0": {"alpha": 3.0, "dnll": 0.1}, "1": {"alpha": 1.0, "dnll": 0.02}}}
    path = tmp_path / "sensitivity.json"
    _dump(path, data.draw(_mutated(sens)))
    try:
        layer_weights(load_sensitivity(path), ["0", "1"])
    except CLEAN as err:  # the file, or the flag naming it
        assert "\n" not in str(err) and (str(path) in str(err) or "--sensitivity" in str(err))


@FUZZ
@given(raw=st.binary(max_size=64) | st.sampled_from([b"", b"{", b"NaN", b"[]", b'{"a": 1}']))
def test_random_bytes_as_json(tmp_path, raw):
    from mxmoe_jax.alloc.qconfig import load_qconfig
    from mxmoe_jax.jsonio import read_json
    from mxmoe_jax.perf.model import PerfModel

    path = tmp_path / "artifact.json"
    path.write_bytes(raw)
    from mxmoe_jax.alloc.problem import load_sensitivity

    for read in (lambda: read_json(path, "trace"), lambda: load_qconfig(path),
                 lambda: PerfModel.load(path), lambda: load_sensitivity(path)):
        _assert_clean(read, path)


# --- model configs: an HF config.json (convert) and a MODEL_DIR's model.json (every reader) ----

@FUZZ
@given(data=st.data())
def test_fuzzed_hf_config(tmp_path, data):
    from mxmoe_jax.convert.hf_to_flax import hf_model_config

    from tests.convert.convert_helpers import HF_FIXTURES

    hf = json.loads((HF_FIXTURES / "qwen2_moe_sparse_step" / "config.json").read_text())
    _dump(tmp_path / "config.json", data.draw(_mutated(hf)))
    _assert_clean(lambda: hf_model_config(tmp_path), tmp_path / "config.json")


@FUZZ
@given(data=st.data())
def test_fuzzed_model_manifest(tmp_path, data):
    from mxmoe_jax.models.io import load_config
    from tests.convert.convert_helpers import converted

    manifest = json.loads((converted("qwen2_moe_sparse_step") / "model.json").read_text())
    _dump(tmp_path / "model.json", data.draw(_mutated(manifest)))
    _assert_clean(lambda: load_config(tmp_path), tmp_path / "model.json")


# --- safetensors headers ---------------------------------------------------------------------

def _safetensors(header: dict, data: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


@pytest.fixture(scope="module")
def st_file():
    """(header, data) of a valid two-tensor safetensors file."""
    from safetensors.numpy import save

    blob = save({"a": np.arange(6, dtype=np.float32).reshape(2, 3),
                 "b": np.ones((4,), np.int8)}, metadata={"format": "pt"})
    n = struct.unpack("<Q", blob[:8])[0]
    return json.loads(blob[8:8 + n]), blob[8 + n:]


def _read_all(folder) -> None:
    from mxmoe_jax.convert.safetensors_io import SafetensorsReader

    with SafetensorsReader(folder) as reader:
        for key in list(reader.keys()):
            reader.get(key)


def _header_values():
    """Values a tampered header field may take: huge sizes, negative or swapped offsets,
    unknown dtypes, shapes that overflow."""
    big = st.sampled_from([2**31, 2**32 + 1, 2**62, 2**64 - 1, 10**30, -1])
    return (_json_values() | big | st.lists(st.integers(-4, 2**40) | big, max_size=4)
            | st.sampled_from(["F33", "f32", "BF16", "I64", "F8_E4M3", "U1", "BOOL"]))


@FUZZ
@given(data=st.data())
def test_fuzzed_safetensors_header(st_file, tmp_path, data):
    header, body = st_file
    header = copy.deepcopy(header)
    for _ in range(data.draw(st.integers(1, 3))):
        name = data.draw(st.sampled_from(sorted(header)))
        entry = header[name]
        field = data.draw(st.sampled_from(sorted(entry) + ["extra"]))
        entry[field] = data.draw(_header_values())
    cut = data.draw(st.sampled_from([len(body), len(body) // 2, 0]))
    (tmp_path / "model.safetensors").write_bytes(_safetensors(header, body[:cut]))
    _assert_clean(lambda: _read_all(tmp_path), tmp_path / "model.safetensors")


@FUZZ
@given(data=st.data())
def test_fuzzed_safetensors_bytes(st_file, tmp_path, data):
    """Random byte flips anywhere (length prefix, header text, tensor data), or a cut."""
    blob = bytearray(_safetensors(*st_file))
    for _ in range(data.draw(st.integers(1, 4))):
        blob[data.draw(st.integers(0, len(blob) - 1))] = data.draw(st.integers(0, 255))
    blob = blob[:data.draw(st.integers(0, len(blob)))]
    (tmp_path / "model.safetensors").write_bytes(bytes(blob))
    _assert_clean(lambda: _read_all(tmp_path), tmp_path / "model.safetensors")


def test_safetensors_fuzz_starting_point_loads(st_file, tmp_path):
    from mxmoe_jax.convert.safetensors_io import SafetensorsReader

    (tmp_path / "model.safetensors").write_bytes(_safetensors(*st_file))
    with SafetensorsReader(tmp_path) as reader:
        assert reader.get("a").tolist() == [[0, 1, 2], [3, 4, 5]]
        assert reader.shape("b") == (4,)
