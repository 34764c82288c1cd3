"""`mxmoe-jax quantize` and QMODEL_DIR: round trip, bytes, the kernel path, bad input."""

from __future__ import annotations

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mxmoe_jax.cli import main as cli_main
from tests.conftest import FIXTURES

HF = FIXTURES / "hf" / "qwen2_moe_norm"  # 2 MoE layers, 8 experts + a gated shared expert
SCHEMES = ["w16a16", "w8a8_g-1_sym", "w4a16_g-1_asym", "w2a16_g-1_asym", "w4a4_g-1_sym",
           "w8a8_g-1_fp8"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("qwen2") / "model"
    assert cli_main(["convert", "--hf", str(HF), "--out", str(out)]) == 0
    return out


def _qconfig(path, layers, experts, scheme_of):
    path.write_text(json.dumps({"format": "mxmoe-jax/qconfig/1", "meta": {}, "summary": {},
                                "layers": {str(i): {str(e): {b: scheme_of(i, e, b)
                                                             for b in ("gate", "up", "down")}
                                                    for e in range(experts)} for i in layers}}))
    return path


def _mixed(i, e, b):
    """Every scheme across experts; gate and up share one; down another."""
    return SCHEMES[(e + i + (b == "down")) % len(SCHEMES)]


def _same_bits(a, b) -> bool:
    a, b = np.asarray(a), np.asarray(b)
    return a.shape == b.shape and a.dtype == b.dtype and a.tobytes() == b.tobytes()


def test_quantize_round_trip_is_bit_identical(model_dir, tmp_path, capsys):
    from mxmoe_jax.models import forward
    from mxmoe_jax.models.io import load_model_dir
    from mxmoe_jax.models.moe import QuantizedExperts
    from mxmoe_jax.quantize.checkpoint import load_qmodel, packed_leaves
    from mxmoe_jax.quantize.pipeline import QuantizeConfig, quantize_in_memory, resolve_allocation

    q = _qconfig(tmp_path / "q.json", range(2), 9, _mixed)
    out = tmp_path / "qmodel"
    assert cli_main(["quantize", "--model", str(model_dir), "--qconfig", str(q), "--hadamard",
                     "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "stored arrays" in printed and "on disk" in printed
    cfg, qmodel, alloc, rot = load_qmodel(out)
    assert rot is not None and rot.online_down and len(alloc) == 2 * 9 * 3
    stacks = [s for layer in qmodel.layers for s in (layer.mlp.experts, layer.mlp.shared)]
    assert all(isinstance(s, QuantizedExperts) for s in stacks)
    # the same quantization done in memory gives the same bits and the same logits
    _, fp = load_model_dir(model_dir, dtype=jnp.float32)
    again, _, _ = quantize_in_memory(fp, resolve_allocation(cfg, qconfig=str(q)),
                                     QuantizeConfig(hadamard=True))
    a, b = packed_leaves(qmodel), packed_leaves(again)
    assert len(a) == len(b) > 0 and all(_same_bits(x, y) for x, y in zip(a, b, strict=True))
    ids = jnp.asarray(np.load(HF / "inputs.npz")["input_ids"])
    np.testing.assert_array_equal(np.asarray(forward(qmodel, ids)),
                                  np.asarray(forward(again, ids)))
    # the bytes the allocation's bits predict are the bytes of the stored expert arrays
    manifest = json.loads((out / "qmodel.json").read_text())
    sizes = manifest["bytes"]
    assert sizes["experts_stored"] >= sizes["experts_predicted"]
    # sub-byte codes pad K to 128 (K = 64 gate/up, 32/48 down here): a bounded overhead
    assert sizes["experts_stored"] <= 4 * sizes["experts_predicted"]


def test_trace_reads_a_qmodel_dir(model_dir, tmp_path):
    """trace on a QMODEL_DIR: the quantized model's own routing, every routed slot counted."""
    from mxmoe_jax.calib.trace import trace_counts
    from mxmoe_jax.quantize.checkpoint import load_any

    out = tmp_path / "qmodel"
    assert cli_main(["quantize", "--model", str(model_dir), "--scheme", "w4a16_g-1_asym",
                     "--out", str(out)]) == 0
    cfg, qmodel = load_any(out)
    ids = np.asarray(np.load(HF / "inputs.npz")["input_ids"])
    counts, _ = trace_counts(qmodel, ids)
    total = ids.size * cfg.num_experts_per_tok
    per_layer = np.asarray(counts).sum(axis=(1, 2))  # [L_moe]
    assert len(per_layer) == len(cfg.moe_layers) and np.all(per_layer == total), per_layer


def test_stored_bytes_equal_the_predicted_bits(model_dir, tmp_path):
    """No padding (8-bit codes and bf16): stored expert bytes are exactly the allocation's, and
    on disk they are not compressed away."""
    q = _qconfig(tmp_path / "q.json", range(2), 9,
                 lambda i, e, b: "w8a8_g-1_sym" if (e + i) % 2 else "w16a16")
    out = tmp_path / "qmodel"
    assert cli_main(["quantize", "--model", str(model_dir), "--qconfig", str(q),
                     "--out", str(out)]) == 0
    sizes = json.loads((out / "qmodel.json").read_text())["bytes"]
    assert sizes["experts_stored"] == sizes["experts_predicted"]
    # stored uncompressed: on disk the arrays plus Orbax's metadata (a few KiB per stack)
    assert sizes["experts_stored"] <= sizes["experts_on_disk"] < sizes["experts_stored"] + 32 * 1024


def test_kernel_path_in_interpret_mode_matches_the_reference(model_dir, tmp_path):
    """bf16 QMODEL: each MoE block on the one-launch mixed-precision kernel (interpret mode: one
    launch per projection for all scheme groups and the shared expert, SwiGLU in gate_up's
    epilogue) vs the reference, on the same block inputs.

    Compared block by block, not on the logits: in this random tiny model a one-bf16-ulp
    difference of an output element (the kernel and the f32 reference sum in another order)
    moves 4-bit activation codes and expert choices in the next layer; on the H200 that grew to
    a 9% logit difference while every block agreed to rounding.
    """
    from mxmoe_jax.models import forward_hidden
    from mxmoe_jax.ops import kernel_mode
    from mxmoe_jax.quantize.checkpoint import load_qmodel

    q = _qconfig(tmp_path / "q.json", range(2), 9, _mixed)
    out = tmp_path / "qmodel"
    assert cli_main(["quantize", "--model", str(model_dir), "--qconfig", str(q),
                     "--out", str(out)]) == 0
    cfg, qmodel, _, _ = load_qmodel(out, dtype=jnp.bfloat16)
    ids = jnp.asarray(np.load(HF / "inputs.npz")["input_ids"])[:1]
    with kernel_mode("reference"):
        _, inputs = forward_hidden(qmodel, ids, with_logits=False)
    for i in cfg.moe_layers:
        mlp = qmodel.layers[i].mlp
        x = inputs[i]
        with kernel_mode("reference"):
            ref = np.asarray(jax.jit(lambda v, mlp=mlp: mlp(v))(x), np.float64)
        with kernel_mode("interpret"):
            fn = jax.jit(lambda v, mlp=mlp: mlp(v))
            jaxpr = str(jax.make_jaxpr(fn)(x))
            assert "pallas_call" in jaxpr, "the kernel path was not taken"
            # gate_up and down: one mixed launch each (shared expert included), no other GEMM
            gemms = re.findall(r"name=mixed_gmm_(?!tables)", jaxpr)
            assert len(gemms) == 2, "not one launch per projection"
            assert len(re.findall(r"name=mixed_gmm_tables", jaxpr)) == 2  # each launch's tables
            assert not re.findall(r"name=gmm_w", jaxpr)
            got = np.asarray(fn(x), np.float64)
        rel = np.linalg.norm(got - ref) / np.linalg.norm(ref)
        assert rel < 2e-2, (i, rel)  # bf16 activations and outputs: rounding differences only


@pytest.mark.parametrize("case,match", [
    ("layer", "layer 7 is not a layer"),
    ("expert", "no expert 9 (experts 0..8)"),
    ("scheme", "w5a16"),
    ("gate_up", "gate and up must share a scheme"),
])
def test_bad_qconfig_is_one_line_exit_2_and_nothing_written(model_dir, tmp_path, capsys, case,
                                                            match):
    bad = {
        "layer": lambda i, e, b: "w4a16_g-1_asym",
        "expert": lambda i, e, b: "w4a16_g-1_asym",
        "scheme": lambda i, e, b: "w5a16_g-1_asym",
        "gate_up": lambda i, e, b: "w4a16_g-1_asym" if b == "gate" else "w8a16_g-1_asym",
    }[case]
    layers = [7] if case == "layer" else [0]
    experts = 13 if case == "expert" else 2
    q = _qconfig(tmp_path / "q.json", layers, experts, bad)
    out = tmp_path / "qmodel"
    rc = cli_main(["quantize", "--model", str(model_dir), "--qconfig", str(q), "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and match in err, err
    assert not out.exists()
    assert not list(tmp_path.glob(".qmodel*"))  # no temporary folder left either


def test_gptq_without_calibration_and_existing_out(model_dir, tmp_path, capsys):
    out = tmp_path / "qmodel"
    rc = cli_main(["quantize", "--model", str(model_dir), "--scheme", "w4a16_g-1_asym",
                   "--method", "gptq", "--out", str(out)])
    assert rc == 2 and "--calib" in capsys.readouterr().err and not out.exists()
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    rc = cli_main(["quantize", "--model", str(model_dir), "--scheme", "w4a16_g-1_asym",
                   "--out", str(out)])
    assert rc == 2 and "--force" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    rc = cli_main(["quantize", "--model", str(model_dir), "--scheme", "w4a16_g-1_asym",
                   "--method", "gptq", "--calib", str(tmp_path / "missing.txt"), "--out",
                   str(tmp_path / "other")])
    assert rc == 2 and "missing.txt" in capsys.readouterr().err
