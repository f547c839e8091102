"""The one exception type users see: a bad input, named in one line."""

from __future__ import annotations

from typing import Iterable


class OptimalStepsError(ValueError):
    """A problem with what the user asked for; the CLI prints it as one line and exits non-zero."""


def unknown(what: str, name: object, known: Iterable[object]) -> OptimalStepsError:
    """The error for a name that is not one of `known`: "unknown WHAT 'name'; known: a, b, c"."""
    return OptimalStepsError(f"unknown {what} {name!r}; known: {', '.join(str(k) for k in known)}")
