"""Argument pieces the commands share: the parser class, value types, and groups of flags."""

from __future__ import annotations

import argparse
from typing import Any

from ..core.errors import OptimalStepsError
from ..optimize.memory import STORAGE_DTYPES, STORAGES
from ..optimize.objectives import OBJECTIVES
from ..optimize.refine import METHODS

DEFAULT_MODEL = "gmm:dim=64,components=8,seed=0,process=flow"


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, no usage dump
        raise OptimalStepsError(f"{self.prog}: {message}")


# ---------------------------------------------------------------------------------- value types

def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a number >= 1, got {value}")
    return value


def int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated whole numbers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one number")
    return values


def name_list(text: str) -> list[str]:
    values = [v.strip() for v in text.split(",") if v.strip()]
    if not values:
        raise argparse.ArgumentTypeError("expected at least one name")
    return values


def byte_size(text: str) -> int:
    """A size such as 8GiB, 512MiB or 2G (binary units for single letters)."""
    units = {"": 1, "b": 1, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "kb": 10**3, "mb": 10**6,
             "gb": 10**9, "tb": 10**12, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}
    number = text.strip().lower().rstrip("bitkmg")
    unit = text.strip().lower()[len(number):]
    try:
        value = float(number) * units[unit]
    except (ValueError, KeyError):
        raise argparse.ArgumentTypeError(f"expected a size such as 8GiB or 512MiB, got {text!r}") from None
    return int(value)


def option_value(text: str) -> Any:
    """A --option value: a number, true/false, none, or the text itself."""
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    return None if lowered in ("none", "null") else text


def parse_options(pairs: list[str], flag: str = "--option") -> dict[str, Any]:
    """KEY=VALUE pairs into keyword options (dashes in keys become underscores)."""
    options = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise OptimalStepsError(f"{flag} {pair!r} is not KEY=VALUE")
        options[key.strip().replace("-", "_")] = option_value(value.strip())
    return options


# ---------------------------------------------------------------------------------- flag groups

def add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help=f"model spec (default {DEFAULT_MODEL}; `optimalsteps models` lists them)")
    parser.add_argument("--label", type=int, default=None,
                        help="class label for a class-conditional model (default: labels cycle over classes)")
    parser.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale")


def add_noise_args(parser: argparse.ArgumentParser, samples_default: int) -> None:
    parser.add_argument("--samples", type=positive_int, default=samples_default, help="number of noise samples")
    parser.add_argument("--seed", type=int, default=0, help="seed of the noise")
    parser.add_argument("--noise", default=None, help="a .npy array [B, ...] of standard normal noise to use")
    parser.add_argument("--allow-huge", action="store_true",
                        help="run requests beyond the sanity bounds (over 10000 steps or 10^6 samples) that fit in memory")


def add_diffusers_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("diffusers pipelines",
                                      "--model diffusers:PATH_OR_ID[,dtype=bfloat16][,device=cuda]")
    group.add_argument("--prompt", action="append", default=None,
                       help="a prompt (repeatable; DiT: a class id or label); --samples latents are spread over them")
    group.add_argument("--prompts-file", default=None, help="a text file with one prompt per line")
    group.add_argument("--negative-prompt", default=None, help="the negative prompt of classifier-free guidance")
    group.add_argument("--height", type=positive_int, default=None, help="image height (default: the pipeline's)")
    group.add_argument("--width", type=positive_int, default=None, help="image width (default: the pipeline's)")
    group.add_argument("--num-frames", type=positive_int, default=None,
                       help="video pipelines: the number of frames (default: the pipeline's)")
    group.add_argument("--image", default=None, metavar="PATH",
                       help="the input image (PNG/JPG) of an img2img / edit / image-to-video pipeline")
    group.add_argument("--strength", type=float, default=None,
                       help="img2img: how much of the schedule runs from the noised --image (the pipeline's strength)")
    group.add_argument("--mask", default=None, metavar="PATH",
                       help="inpainting: the mask image (white is repainted), as the pipeline's mask_image / mask")


def add_expert_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--high-steps", type=positive_int, default=None,
                        help="two-expert pipelines (Wan 2.2): steps the high-noise expert runs in the searched "
                             "schedule, down to the boundary (default: the pipeline's own share)")


def add_scale_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("scale (docs/scale.md)")
    group.add_argument("--storage", default="memory", choices=STORAGES,
                       help="where the teacher trajectory lives: the compute device, host memory, or a file")
    group.add_argument("--storage-dir", default=None, help="directory of the memory-mapped trajectory (--storage disk)")
    group.add_argument("--storage-dtype", default=None, choices=sorted(STORAGE_DTYPES),
                       help="precision of the stored trajectory (costs are computed in float32 or better)")
    group.add_argument("--target-chunk", type=positive_int, default=None,
                       help="targets per cost chunk (bounds per-layer temporaries)")
    group.add_argument("--memory-limit", type=byte_size, default=None,
                       help="refuse a search estimated to need more than this (default: what is free)")
    group.add_argument("--checkpoint", default=None, help="directory of checkpoints after the teacher and each layer")
    group.add_argument("--resume", action="store_true", help="continue the search in --checkpoint "
                       "(without it, a --checkpoint directory holding a checkpoint is refused unless --force)")


def add_refine_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("refinement and coarse-to-fine search (docs/refine.md)")
    g.add_argument("--refine", action="store_true",
                   help="then optimise the times off the grid for the final error on the search samples")
    g.add_argument("--refine-budget", type=positive_int, default=None,
                   help="most model calls the refinement may spend (default: until converged, 40 per time)")
    g.add_argument("--refine-samples", type=positive_int, default=None,
                   help="measure the final error on this many samples (extra ones get their own teacher run)")
    g.add_argument("--refine-method", default="nelder-mead", choices=METHODS)
    g.add_argument("--refine-objective", default=None, choices=OBJECTIVES,
                   help="what the refinement minimises on its samples (default mse; log: the mean per-sample PSNR)")
    g.add_argument("--coarse-to-fine", action="store_true",
                   help="DP on a coarse sub-grid, then on bands around its choices: far fewer model calls")
    g.add_argument("--coarse-steps", type=positive_int, default=None,
                   help="steps of the coarse grid (default: max(2 M, N / 16))")
