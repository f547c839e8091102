"""How per-sample errors against the teacher become one number to minimise.

Every objective takes per-sample errors (mean squared error over a sample's elements, float64) with the
samples in the last dimension, and returns one score per leading index. All are monotone in each sample's
error, so a DP whose states carry one trajectory per sample stays valid for any of them.

- `mse`: the mean of the per-sample errors (the released code's joint cost). Dominated by the few samples
  that end in another mode: it rewards schedules that blur between modes.
- `log`: the mean of log per-sample error, i.e. maximising the mean per-sample PSNR; the typical sample
  counts, one mode-switching sample cannot outweigh the rest.
- `tail`: the log of the mean of the worst tenth of the errors (CVaR at 90 %): the broken samples alone.
"""

from __future__ import annotations

import math

import torch

from ..core.errors import OptimalStepsError

OBJECTIVES = ("mse", "log", "tail")
ERROR_FLOOR = 1e-30  # an exact match counts as this error, so a log stays finite
TAIL_FRACTION = 0.1


def check_objective(name: str) -> str:
    if name not in OBJECTIVES:
        raise OptimalStepsError(f"unknown objective {name!r}; known: {', '.join(OBJECTIVES)}")
    return name


def per_sample_error(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Mean squared difference per sample, float64: x [..., B, *S] against ref [B, *S] -> [..., B]."""
    diff = x.to(torch.float64) - ref.to(x.device, torch.float64)
    inner = ref.dim() - 1
    return diff.pow(2).flatten(start_dim=diff.dim() - inner).mean(-1) if inner else diff.pow(2)


def aggregate(errors: torch.Tensor, objective: str) -> torch.Tensor:
    """The objective of per-sample errors [..., B] -> [...] float64 (lower is better); inf stays inf."""
    errors = errors.to(torch.float64)
    if objective == "mse":
        return errors.mean(-1)
    if objective == "log":
        return torch.log(errors.clamp(min=ERROR_FLOOR)).mean(-1)
    if objective == "tail":
        count = max(1, math.ceil(TAIL_FRACTION * errors.shape[-1]))
        worst = torch.topk(errors, count, dim=-1).values
        return torch.log(worst.mean(-1).clamp(min=ERROR_FLOOR))
    raise OptimalStepsError(f"unknown objective {objective!r}; known: {', '.join(OBJECTIVES)}")
