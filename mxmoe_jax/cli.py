"""The single command-line entry point: ``mxmoe-jax SUBCOMMAND ...``.

Each subcommand lives in its own module, which defines ``register(subparsers)``; that function
adds the subparser and sets ``func`` to the module's short ``main(args) -> int``.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand modules, in the order ``--help`` lists them (pipeline order)
_COMMANDS = (
    "mxmoe_jax.convert.cli",
    "mxmoe_jax.convert.export_cli",
    "mxmoe_jax.calib.trace_cli",
    "mxmoe_jax.calib.calibrate_cli",
    "mxmoe_jax.perf.cli",
    "mxmoe_jax.alloc.cli",
    "mxmoe_jax.quantize.cli",
    "mxmoe_jax.eval.cli",
    "mxmoe_jax.eval.bench_cli",
    "mxmoe_jax.pipeline",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mxmoe-jax",
        description="Mixed-precision quantization of Mixture-of-Experts LLMs in JAX/Pallas.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="SUBCOMMAND")
    for module in _COMMANDS:
        importlib.import_module(module).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, FileExistsError) as err:
        # Bad input: one clear line, no traceback.
        print(f"mxmoe-jax {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        # Ctrl-C: every writer has already cleaned up after itself (temporary names, partial
        # files kept for resuming); say so in one line, exit 130 as shells do for SIGINT
        print(f"\nmxmoe-jax {args.command}: interrupted; finished work is kept and a rerun "
              "resumes or starts afresh", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
