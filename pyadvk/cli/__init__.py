"""The ``pyadvk`` command line: one module per subcommand, each with ``add_parser(subparsers)``
that registers its arguments and sets ``run(args) -> int`` as the handler.

User errors (bad paths, bad values) are raised as :class:`UserError` or ValueError/TypeError and
printed as one line with a non-zero exit code, without a traceback.
"""

from __future__ import annotations

import argparse
import sys

from pyadvk.cli import demo, info

COMMANDS = (info, demo)


class UserError(Exception):
    """An error in what the user asked for: printed without a traceback, exit code 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pyadvk", description="Fused kernels for adversarial robustness and interpretability."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in COMMANDS:
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except (UserError, ValueError, TypeError, FileNotFoundError) as exc:
        print(f"pyadvk {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"pyadvk {args.command}: interrupted", file=sys.stderr)
        return 130
