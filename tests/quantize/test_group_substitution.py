"""`quantize --scheme` / `--qconfig` with a group size that does not divide some block's K: the
block is quantized with `QScheme.for_k`'s substitute, which the QMODEL's qconfig.json names."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mxmoe_jax.cli import main as cli_main
from tests.conftest import FIXTURES

HF = FIXTURES / "hf" / "qwen2_moe_norm"  # gate/up K = 64, routed down K = 32, shared down K = 48


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("qwen2-sub") / "model"
    assert cli_main(["convert", "--hf", str(HF), "--out", str(out)]) == 0
    return out


@pytest.mark.parametrize("how", ["scheme", "qconfig"])
def test_quantize_uses_the_substituted_group_size(model_dir, tmp_path, how):
    from mxmoe_jax.ops import dequantize_weight
    from mxmoe_jax.quant.rtn import fake_quant_weight
    from mxmoe_jax.quant.scheme import QScheme
    from mxmoe_jax.quantize.checkpoint import load_qmodel
    from tests.quant.helpers import load_hf_flat

    scheme, sub = "w4a16_g32_asym", "w4a16_g16_asym"
    if how == "scheme":
        given = ["--scheme", scheme]
    else:
        q = tmp_path / "q.json"
        q.write_text(json.dumps({"format": "mxmoe-jax/qconfig/1", "meta": {}, "summary": {},
                                 "layers": {"1": {str(e): {b: scheme for b in ("gate", "up",
                                                                               "down")}
                                                  for e in range(9)}}}))
        given = ["--qconfig", str(q)]
    out = tmp_path / "qmodel"
    assert cli_main(["quantize", "--model", str(model_dir), *given, "--out", str(out)]) == 0
    stored = json.loads((out / "qconfig.json").read_text())["layers"]["1"]
    assert stored["8"]["down"] == sub  # the shared expert (index 8): K = 48
    assert {stored[str(e)][b] for e in range(8) for b in ("gate", "up", "down")} == {scheme}
    assert stored["8"]["gate"] == scheme
    _, qmodel, alloc, _ = load_qmodel(out)
    assert alloc.as_dict()[(1, 8, "down")] == QScheme.parse(sub)
    (grp,) = qmodel.layers[1].mlp.shared.weights().down
    assert grp.scheme == QScheme.parse(sub)
    _, flat = load_hf_flat(HF)
    want = fake_quant_weight(flat["layers/1/mlp/shared/down_proj/kernel"], sub)
    np.testing.assert_array_equal(np.asarray(dequantize_weight(grp.w))[0], np.asarray(want))
