"""The sliced Wasserstein-2 distance between two sample sets: one implementation, used by the validated
search's data guard (optimize/select.py) and by the evaluation metrics (evaluation/metrics.py).

Samples [N, ...] are flattened to vectors; arithmetic is float64 whatever the inputs' dtype.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .errors import OptimalStepsError


def flat_samples(x: torch.Tensor) -> torch.Tensor:
    """Samples [N, ...] as float64 vectors [N, D] on the CPU (N >= 1)."""
    x = torch.as_tensor(x)
    if x.dim() < 1 or x.shape[0] < 1:
        raise OptimalStepsError(f"metrics need samples [N, ...] with N >= 1, got shape {list(x.shape)}")
    return x.detach().to(torch.float64).cpu().reshape(x.shape[0], -1)


def random_projections(dim: int, count: int, seed: int = 0) -> np.ndarray:
    """`count` directions uniform on the unit sphere of R^dim, as columns [dim, count] (deterministic)."""
    directions = np.random.default_rng(seed).standard_normal((dim, count))
    return directions / np.linalg.norm(directions, axis=0, keepdims=True)


def sliced_wasserstein(x: torch.Tensor, y: torch.Tensor, projections: int = 256, seed: int = 0) -> float:
    """Sliced Wasserstein-2 distance: sqrt of the mean over random directions of the squared 1-D W2 between
    the projected sample sets (POT's `ot.sliced_wasserstein_distance` when installed, else numpy)."""
    x, y = flat_samples(x), flat_samples(y)
    if x.shape[1] != y.shape[1]:
        raise OptimalStepsError(f"sample dimensions differ: {x.shape[1]} vs {y.shape[1]}")
    theta = random_projections(x.shape[1], projections, seed)
    try:
        import ot
    except ImportError:
        return sliced_wasserstein_numpy(x.numpy(), y.numpy(), theta)
    return float(ot.sliced_wasserstein_distance(x.numpy(), y.numpy(), projections=theta, p=2))


def sliced_wasserstein_numpy(x: np.ndarray, y: np.ndarray, theta: np.ndarray) -> float:
    """The same distance without POT: per direction, W2^2 between empirical measures with uniform weights is
    the integral over quantile levels of the squared difference of the two quantile functions."""
    px = np.sort(x @ theta, axis=0)
    py = np.sort(y @ theta, axis=0)
    # merge both sets of quantile breakpoints; on each piece both quantile functions are constant
    levels = np.union1d(np.arange(1, len(px) + 1) / len(px), np.arange(1, len(py) + 1) / len(py))
    widths = np.diff(np.concatenate([[0.0], levels]))
    mid = levels - widths / 2
    qx = px[np.minimum((mid * len(px)).astype(int), len(px) - 1)]
    qy = py[np.minimum((mid * len(py)).astype(int), len(py) - 1)]
    per_direction = (widths[:, None] * (qx - qy) ** 2).sum(0)
    return float(math.sqrt(per_direction.mean()))
