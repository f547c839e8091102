"""The model-spec registry: `load_model(spec)` turns the CLI's --model text into a model.

Specs: `gmm:...` (exact Gaussian mixtures), `empirical:...` (exact denoisers of finite datasets),
`python:FILE.py:NAME` (a user's own model), and the built-in trained networks (`BUILTIN_MODELS` of
`testbeds.nets`). The diffusers pipelines (`diffusers:...`) are loaded by the CLI, above this floor.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any, Callable

from ..core.errors import OptimalStepsError, unknown
from ..core.models import model_process
from .empirical import load_empirical
from .mixture import GaussianMixture
from .nets import BUILTIN_MODELS

# the specs with a prefix, as `optimalsteps models` and the unknown-model error list them
SPEC_KINDS = ("gmm:...", "empirical:...", "python:FILE.py:NAME", "diffusers:ID (CLI)")


def builtin_models() -> dict[str, tuple[str, Callable[..., Any]]]:
    """Built-in model name -> (one-line description, loader taking keyword options)."""
    return dict(BUILTIN_MODELS)


def _parse_options(text: str) -> dict[str, str]:
    options = {}
    for part in filter(None, text.split(",")):
        if "=" not in part:
            raise OptimalStepsError(f"model option {part!r} is not key=value")
        key, value = part.split("=", 1)
        options[key.strip()] = value.strip()
    return options


def load_model(spec: str) -> Any:
    """A model from a spec string (the CLI's --model).

    - `gmm:FILE.json` or `gmm:dim=64,components=8,seed=0,process=flow`: exact Gaussian mixture
    - `empirical:DATASET[,process=flow]`: the exact denoiser of a finite dataset (digits, mnist)
    - `python:FILE.py:NAME`: NAME() from a user file returns a model
    - a built-in name (`optimalsteps models` lists them)
    """
    if not isinstance(spec, str) or not spec:
        raise OptimalStepsError("empty model spec")
    kind, _, rest = spec.partition(":")
    if kind == "gmm":
        if rest.endswith(".json") or Path(rest).is_file():
            model = GaussianMixture.from_json(rest)
        else:
            options = _parse_options(rest)
            allowed = {"dim", "components", "seed", "process", "spread", "std"}
            extra = set(options) - allowed
            if extra:
                raise OptimalStepsError(f"unknown gmm option(s) {sorted(extra)}; known: {sorted(allowed)}")
            try:
                model = GaussianMixture.random(
                    dim=int(options.get("dim", 64)),
                    components=int(options.get("components", 8)),
                    seed=int(options.get("seed", 0)),
                    process=options.get("process", "flow"),
                    spread=float(options.get("spread", 1.0)),
                    std=float(options.get("std", 0.3)),
                )
            except ValueError as exc:
                if isinstance(exc, OptimalStepsError):
                    raise
                raise OptimalStepsError(f"bad gmm option in {spec!r}: {exc}") from None
    elif kind == "python":
        model = _load_python_model(rest)
    elif kind == "empirical":
        name, _, opts = rest.partition(",")
        model = load_empirical(name, **_parse_options(opts))
    else:
        builtins = builtin_models()
        name, _, opts = spec.partition(":")
        if name not in builtins:
            known = list(SPEC_KINDS) + sorted(builtins)
            raise unknown("model", spec, known)
        model = builtins[name][1](**_parse_options(opts))
    model_process(model)
    try:
        model.spec = spec
    except AttributeError:
        pass
    return model


def _load_python_model(rest: str) -> Any:
    path, sep, name = rest.rpartition(":")
    if not sep or not path or not name:
        raise OptimalStepsError(f"python model spec must be python:FILE.py:NAME, got python:{rest}")
    file = Path(path)
    if not file.is_file():
        raise OptimalStepsError(f"python model file not found: {path}")
    module_spec = importlib.util.spec_from_file_location(f"optimalsteps_user_{file.stem}", file)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except Exception as exc:  # the user's file: report, do not crash
        raise OptimalStepsError(f"could not import {path}: {type(exc).__name__}: {exc}") from None
    factory = getattr(module, name, None)
    if not callable(factory):
        raise OptimalStepsError(f"{path} has no callable {name!r}")
    return factory()
