"""``exactgn`` on the command line: one sub-command per module, each registering its own parser."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# Sub-command modules; each defines ``add_parser(subparsers)`` that sets ``func`` on its parser.
COMMAND_MODULES = (
    "exactgn.demo",
    "exactgn.train",
    "exactgn.compare",
    "exactgn.diagnostics",
    "exactgn.report",
    "exactgn.sweep",
    "exactgn.study",
    "exactgn.bench",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="exactgn",
        description="Exact Gauss-Newton optimisation in deep reversible MLPs (RevMLP): exact GN steps, the "
        "experiments of Buffelli et al. (NeurIPS 2024) on MNIST and CIFAR-10, and exact NTK/CKA diagnostics.",
    )
    from . import __version__

    parser.add_argument("--version", action="version", version=f"exactgn {__version__}")
    sub = parser.add_subparsers(title="commands", metavar="COMMAND", dest="command")
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ``exactgn``; returns the exit status. Errors in the user's input print one line and return 2
    (set ``EXACTGN_DEBUG=1`` for the traceback)."""
    from .errors import ExactGNError

    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (ValueError, OSError, ExactGNError) as exc:
        if os.environ.get("EXACTGN_DEBUG"):
            raise
        print(f"exactgn {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
