"""The `optimalsteps` command line (entry point `optimalsteps.cli:main`): `main.py` builds the parser from
the command modules in `commands/`, `args.py` holds the shared flags and value types, `inputs.py` turns
arguments into models, noise and conditions."""

from .main import build_parser, main

__all__ = ["build_parser", "main"]
