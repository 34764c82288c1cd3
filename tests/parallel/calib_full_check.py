"""Run in a subprocess with 8 simulated CPU devices (see ``ep_check.py``): ``calibrate`` on a
converted HF fixture (qwen2_moe: 8 routed experts + a gated shared expert, 2 MoE layers) with
``CalibConfig(devices=N)`` for each N given; prints ``{"devices": N, "losses": ...}`` per line.
"""

from __future__ import annotations

import json
import sys

import numpy as np

from mxmoe_jax.calib.calibrate import CalibConfig, calibrate
from mxmoe_jax.models import from_flat_params
from tests.conftest import FIXTURES
from tests.quant.helpers import load_hf_flat

SCHEMES = ("w4a16_g-1_asym", "w8a8_g-1_sym", "w4a16_g16_asym")


def main(device_counts: list[int]) -> None:
    cfg, flat = load_hf_flat(FIXTURES / "hf" / "qwen2_moe_norm")
    model = from_flat_params(cfg, flat)
    windows = np.random.default_rng(0).integers(0, cfg.vocab_size, size=(3, 24))
    for n in device_counts:
        res = calibrate(model, windows, CalibConfig(schemes=SCHEMES, batch_tokens=32, devices=n),
                        meta={})
        print(json.dumps({"devices": n, "losses": res["losses"]}), flush=True)


if __name__ == "__main__":
    main([int(a) for a in sys.argv[1:]] or [1, 8])
