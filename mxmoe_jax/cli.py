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
    parser.add_argument("--debug", action="store_true",
                        help="on bad input, show the traceback instead of one line")
    sub = parser.add_subparsers(dest="command", required=True, metavar="SUBCOMMAND")
    for module in _COMMANDS:
        importlib.import_module(module).register(sub)
    return parser


_PATH_HINTS = {
    NotADirectoryError: "a folder on that path is a file: choose another path",
    IsADirectoryError: "it is a folder where a file is meant: name a file",
    PermissionError: "choose a path you may read or write",
}


def _close_progress_bars() -> None:
    """Close the progress bars an error interrupted, so the message starts its own line (a bar
    left open has no newline after it)."""
    tqdm = sys.modules.get("tqdm")
    if tqdm is not None:
        for bar in list(getattr(tqdm.tqdm, "_instances", ())):
            bar.close()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, FileExistsError) as err:
        # Bad input: one clear line, no traceback, on a line of its own.
        _close_progress_bars()
        if args.debug:
            raise
        print(f"mxmoe-jax {args.command}: error: {err}", file=sys.stderr)
        return 2
    except (NotADirectoryError, IsADirectoryError, PermissionError) as err:
        # a path that cannot be used as given (those not checked up front): one line too
        _close_progress_bars()
        if args.debug:
            raise
        print(f"mxmoe-jax {args.command}: error: {err.filename}: {err.strerror}; "
              f"{_PATH_HINTS[type(err)]}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        _close_progress_bars()
        # Ctrl-C: every writer has already cleaned up after itself (temporary names, partial
        # files kept for resuming); say so in one line, exit 130 as shells do for SIGINT
        print(f"\nmxmoe-jax {args.command}: interrupted; finished work is kept and a rerun "
              "resumes or starts afresh", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
