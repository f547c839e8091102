"""`optimalsteps models`: list the model specs."""

from __future__ import annotations

import argparse
from typing import Any

from ...testbeds.registry import builtin_models

SPECS = (
    ("gmm:dim=64,components=8,seed=0,process=flow", "exact Gaussian mixture (random, any dim/process)"),
    ("gmm:FILE.json", "exact Gaussian mixture from a file"),
    ("empirical:digits|mnist[,process=flow]", "exact denoiser of a finite dataset"),
    ("python:FILE.py:NAME", "NAME() in a user file returns a model"),
    ("diffusers:PATH_OR_ID", "a diffusers pipeline (search / compare)"),
)


def add(sub: Any) -> None:
    p = sub.add_parser("models", help="list the model specs")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    for spec, description in SPECS:
        print(f"{spec:<46}{description}")
    for name, (description, _) in sorted(builtin_models().items()):
        print(f"{name:<46}{description}")
