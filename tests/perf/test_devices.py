"""Device facts are defined once (mxmoe_jax.gpus) and read by the cost model and the kernels."""

from __future__ import annotations

from mxmoe_jax.gpus import GPUS, NUM_SMS_BY_KIND
from mxmoe_jax.perf.devices import DEVICES


def test_every_cost_model_device_takes_the_gpu_facts():
    assert set(DEVICES) == set(GPUS)
    for name, spec in DEVICES.items():
        assert (spec.num_sms, spec.smem_kib) == (GPUS[name].num_sms, GPUS[name].smem_kib)


def test_device_kinds_are_spelled_as_the_kernels_name_devices():
    # kernels/pallas/tuning.device_name(): lower case, spaces and dashes as underscores
    for gpu in GPUS.values():
        for kind in gpu.device_kinds:
            assert kind == kind.lower().replace(" ", "_").replace("-", "_")
    assert NUM_SMS_BY_KIND["nvidia_h200"] == 132 and NUM_SMS_BY_KIND["nvidia_a100_sxm4_80gb"] == 108
