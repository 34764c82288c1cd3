"""Old home of the text -> windows code, now ``mxmoe_jax.data``.

Only re-exports for calib/calibrate.py and eval/cli.py, until they import ``mxmoe_jax.data``:
delete this module then.
"""

from mxmoe_jax.data import sample_windows, token_windows, tokenize_texts  # noqa: F401
