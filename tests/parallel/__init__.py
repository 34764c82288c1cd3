"""Expert-parallel tests: the multi-device checks run in a subprocess with 8 simulated CPU devices
(the device count is fixed when JAX starts, and the test process has already started it)."""

from __future__ import annotations

import json
import os
import subprocess
import sys


def run_on_8_devices(module: str, *args: str, timeout: int = 600) -> list[dict]:
    """``python -m module *args`` with ``--xla_force_host_platform_device_count=8``: the JSON rows
    (lines starting with ``{``) it prints; fails with its stderr when it fails."""
    from tests.conftest import REPO

    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
               PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
