"""The fixture QMODEL's MoE blocks on the kernel paths vs the fake-quant reference, per scheme.

For each allocation (the tests' 6-scheme mix, each scheme alone, each with down at w16a16),
quantize the tests' tiny Qwen2-MoE fixture, run every MoE block on the same inputs with
``kernel_mode("interpret")`` (and ``"kernel"`` on a GPU), and print the relative L2 difference
from ``kernel_mode("reference")``. It found why the H200 differed by 2%: the reference's bf16
intermediates stayed f32 inside GPU fusions (`fpexact.widen` / `narrow` fixed it;
`bench/results/block_paths-2026-12-01-h200.log`).

    PYTHONPATH=. python -m bench.block_paths
"""

from __future__ import annotations

import pathlib
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

from mxmoe_jax.cli import main as cli_main
from mxmoe_jax.models import forward_hidden
from mxmoe_jax.ops import kernel_mode
from mxmoe_jax.quantize.checkpoint import load_qmodel
from tests.quantize.test_checkpoint import HF, SCHEMES, _mixed, _qconfig


def _block_diffs(qdir: pathlib.Path, modes) -> list[str]:
    cfg, qmodel, _, _ = load_qmodel(qdir, dtype=jnp.bfloat16)
    ids = jnp.asarray(np.load(HF / "inputs.npz")["input_ids"])[:1]
    with kernel_mode("reference"):
        _, inputs = forward_hidden(qmodel, ids, with_logits=False)
    row = []
    for i in cfg.moe_layers:
        mlp = qmodel.layers[i].mlp
        runs = {}
        for mode in ("reference", *modes):
            with kernel_mode(mode):
                runs[mode] = np.asarray(jax.jit(lambda v, mlp=mlp: mlp(v))(inputs[i]), np.float64)
        ref = runs["reference"]
        row += [f"L{i} {m} {np.linalg.norm(runs[m] - ref) / np.linalg.norm(ref):.2e}"
                for m in modes]
    return row


def main() -> None:
    tmp = pathlib.Path(tempfile.mkdtemp())
    model_dir = tmp / "model"
    assert cli_main(["convert", "--hf", str(HF), "--out", str(model_dir)]) == 0
    modes = ["interpret"] + (["kernel"] if jax.default_backend() == "gpu" else [])
    cases = [("mixed", _mixed)] + [(s, lambda i, e, b, s=s: s) for s in SCHEMES]
    cases += [(f"{s}+down16", lambda i, e, b, s=s: "w16a16" if b == "down" else s)
              for s in SCHEMES[1:]]
    for name, scheme_of in cases:
        q = _qconfig(tmp / f"{name}.json", range(2), 9, scheme_of)
        out = tmp / f"q-{name}"
        assert cli_main(["quantize", "--model", str(model_dir), "--qconfig", str(q),
                         "--out", str(out)]) == 0
        print(f"{name:28s}", " | ".join(_block_diffs(out, modes)), flush=True)


if __name__ == "__main__":
    main()
