"""`fxcompress` command line: one module per command in fxcompress/commands.

Exit codes: 0 ok, 1 run failure, 2 bad input. Errors the user can act on
print one line to stderr, never a traceback (set FXC_DEBUG=1 to see one).
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import List, Optional, Sequence

from . import __version__
from .errors import FxcError
from .passes import resolve_passes

COMMANDS = ["transform", "validate", "inspect", "train", "evaluate", "sparse_export"]


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's own exit code is already 2
        self.print_usage(sys.stderr)
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fxcompress", description="A torch.fx compiler for compression-aware training.")
    parser.add_argument("--version", action="version", version=f"fxcompress {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name in COMMANDS:
        try:
            mod = importlib.import_module(f".commands.{name}", __package__)
        except ModuleNotFoundError as e:
            if e.name == f"{__package__}.commands.{name}":
                continue  # a command whose module is not part of this build
            raise
        p = mod.add_parser(sub)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv: Optional[List[str]] = None, passes: Optional[Sequence[type]] = None) -> int:
    """Run one command. `passes`: the pass list every command compiles with
    (default fxcompress.passes.DEFAULT_PASSES), resolved here once and handed
    to the command as `args.passes`."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    try:
        args.passes = resolve_passes(passes)
        return int(args._run(args) or 0)
    except FxcError as e:
        if os.environ.get("FXC_DEBUG"):
            raise
        print(f"fxcompress {args.command}: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
