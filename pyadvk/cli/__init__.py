"""The ``pyadvk`` command line: one module per subcommand, each with ``add_parser(subparsers)``
that registers its arguments and sets ``run(args) -> int`` as the handler.

User errors (bad paths, bad values, a model that does not fit the data) are printed as one line
with exit code 2 and no traceback (``PYADVK_DEBUG=1`` shows it). Every file a command writes is
written atomically: an interruption or an error leaves no half-written file.
"""

from __future__ import annotations

import argparse
import os
import sys

from pyadvk import distributed
from pyadvk._io import CorruptFileError
from pyadvk.cli import ara, bench, demo, eval, explain, info, stats, train
from pyadvk.cli.common import UserError

COMMANDS = (info, demo, train, ara, eval, explain, stats, bench)


def build_parser() -> argparse.ArgumentParser:
    """The ``pyadvk`` parser with every subcommand of COMMANDS."""
    parser = argparse.ArgumentParser(
        prog="pyadvk", description="Fused kernels for adversarial robustness and interpretability."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in COMMANDS:
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Runs ``pyadvk ARGV`` (default ``sys.argv[1:]``) and returns the exit code: 0, 2 for a user
    error (one line on stderr), 130 when interrupted."""
    args = build_parser().parse_args(argv)
    started_here = not distributed.group_is_up()
    try:
        distributed.init_from_env()
        return int(args.run(args) or 0)
    except (UserError, ValueError, TypeError, FileNotFoundError, RuntimeError) as exc:
        if os.environ.get("PYADVK_DEBUG") == "1":
            raise
        print(f"pyadvk {args.command}: error: {exc}", file=sys.stderr)
        if not isinstance(exc, (UserError, FileNotFoundError, CorruptFileError)):
            print("(set PYADVK_DEBUG=1 to see the traceback)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"pyadvk {args.command}: interrupted", file=sys.stderr)
        return 130
    finally:
        if started_here:  # a group this call started ends with it (not one its caller set up)
            distributed.shutdown()
