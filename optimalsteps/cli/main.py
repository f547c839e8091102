"""The `optimalsteps` command: a thin shell over the Python API.

Every command is a module in `cli/commands` with `add(sub)` and `run(args)`; bad input raises
OptimalStepsError, which `main` prints as one line and turns into exit status 2.
"""

from __future__ import annotations

import argparse
import sys

from ..core.errors import OptimalStepsError
from .args import Parser
from .commands import compare, demo, models, sample, schedule, search

# the commands in the order `optimalsteps --help` lists them; a new command is one module and one entry here
COMMANDS = (sample, schedule, models, search, compare, demo)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="optimalsteps", description="Optimal few-step schedules for diffusion and flow models.")
    sub = parser.add_subparsers(dest="command", parser_class=Parser)
    for command in COMMANDS:
        command.add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        if not getattr(args, "command", None):
            parser.print_help()
            return 2
        args.func(args)
        return 0
    except OptimalStepsError as exc:
        print(f"optimalsteps: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("optimalsteps: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
