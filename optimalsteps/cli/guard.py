"""The command's last line of defence: every failure becomes one line on stderr and exit status 2.

`--debug` (anywhere on the command line) or OPTIMALSTEPS_DEBUG=1 adds the traceback. The options a
user gave explicitly (not left at their defaults) are known to the commands as `args.given`, so options
that do not apply can be refused instead of silently ignored.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from typing import Any

from ..core.errors import OptimalStepsError

DEBUG_FLAG = "--debug"
DEBUG_ENV = "OPTIMALSTEPS_DEBUG"


def split_debug(argv: list[str]) -> tuple[list[str], bool]:
    """argv without --debug, and whether a traceback is wanted."""
    debug = DEBUG_FLAG in argv or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    return [a for a in argv if a != DEBUG_FLAG], debug


def _suppress_defaults(parser: argparse.ArgumentParser) -> None:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                _suppress_defaults(sub)
        elif action.dest != "help":
            action.default = argparse.SUPPRESS


def given_options(build_parser: Any, argv: list[str]) -> set[str]:
    """The destinations of the options given on the command line (a parser whose defaults are suppressed
    keeps only those)."""
    parser = build_parser()
    _suppress_defaults(parser)
    try:
        return set(vars(parser.parse_args(argv)))
    except (OptimalStepsError, SystemExit):
        return set()


def failure_line(exc: BaseException) -> str:
    """One line for an error that escaped the commands' own checks."""
    if isinstance(exc, OptimalStepsError):
        return str(exc)
    if isinstance(exc, SystemExit):
        return f"the model called sys.exit({exc.code!r}) during the run; nothing was written"
    if isinstance(exc, MemoryError):
        return "out of memory; use fewer --samples, fewer steps, or a smaller model"
    if isinstance(exc, OSError):
        where = f" {exc.filename}" if exc.filename else ""
        return f"{exc.strerror or exc}{':' if where else ''}{where}"
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"unexpected {type(exc).__name__}{': ' + text if text else ''} (rerun with --debug for the traceback)"


def report(exc: BaseException, debug: bool) -> int:
    """Print the failure (and the traceback when debugging); the exit status."""
    if debug and not isinstance(exc, OptimalStepsError):
        traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stderr)
    if isinstance(exc, KeyboardInterrupt):
        print("optimalsteps: interrupted", file=sys.stderr)
        return 130
    print(f"optimalsteps: error: {' '.join(failure_line(exc).split())}", file=sys.stderr)
    return 2
