"""The `optimalsteps` command: a thin shell over the Python API.

Every command is a module in `cli/commands` with `add(sub)` and `run(args)`; bad input raises
OptimalStepsError, which `main` prints as one line and turns into exit status 2; so does any other
failure (cli/guard.py), with the traceback only under --debug or OPTIMALSTEPS_DEBUG=1.
"""

from __future__ import annotations

import argparse
import sys

from .args import Parser
from .guard import given_options, report, split_debug
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
    argv, debug = split_debug(sys.argv[1:] if argv is None else list(argv))
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        if not getattr(args, "command", None):
            parser.print_help()
            return 2
        args.given = given_options(build_parser, argv)
    except SystemExit as exc:  # --help and --version end here
        return int(exc.code or 0) if isinstance(exc.code, int) or exc.code is None else 2
    except BaseException as exc:
        return report(exc, debug)
    try:
        args.func(args)
        return 0
    except BaseException as exc:  # the last resort: one line (a traceback only with --debug), exit 2
        return report(exc, debug)


if __name__ == "__main__":
    raise SystemExit(main())
