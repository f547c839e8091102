"""The exact empirical denoiser: the optimal x0-prediction when the data are a finite set of points.

If x0 is uniform over training points x_1..x_N and x_t = alpha x0 + sigma eps, then

    E[x0 | x_t] = sum_i w_i x_i,   w_i = softmax_i( -|x_t - alpha x_i|^2 / (2 sigma^2) ).

This is what a perfectly trained network would output on that set (its samples are training images),
so it is a real-image model with no training error and no weights. The softmax runs over chunks of
training points with a running maximum, in float64; at sigma -> 0 the weights sharpen into the
nearest point without overflow.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from .data import DATASETS, draw_images, load_dataset
from ..core.errors import OptimalStepsError
from ..core.io import load_npy
from ..core.processes import ProcessLike, get_process

# 1 / (2 sigma^2) is capped here: large enough that any two distinct points separate completely, small
# enough that (largest squared distance) x cap stays far from float64 overflow, also at sigma = 0.
_MAX_PRECISION = 1e250


class EmpiricalDenoiser:
    """An exact x0-predicting model over `points` [N, ...] (any array of training data)."""

    prediction = "x0"

    def __init__(self, points: Any, process: ProcessLike = "flow", chunk: int = 2048, name: str = "array"):
        points = torch.as_tensor(np.asarray(points) if not isinstance(points, torch.Tensor) else points)
        if not points.is_floating_point():
            points = points.to(torch.float64)
        if points.dim() < 2 or points.shape[0] < 1:
            raise OptimalStepsError(f"empirical data must be an array [N, ...] with N >= 1, got shape {list(points.shape)}")
        if not torch.isfinite(points).all():
            raise OptimalStepsError("empirical data contains NaN or inf")
        if int(chunk) < 1:
            raise OptimalStepsError(f"chunk must be at least 1, got {chunk}")
        self.points = points.detach().to(torch.float64).cpu()
        self.process = get_process(process)
        self.sample_shape = tuple(points.shape[1:])
        self.chunk = int(chunk)
        self.name = name
        self._flat = self.points.reshape(self.points.shape[0], -1)
        self._half_norms = 0.5 * (self._flat * self._flat).sum(dim=1)

    def __len__(self) -> int:
        return self.points.shape[0]

    def log_weights(self, x: torch.Tensor, t: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """Unnormalised log-weights [B, stop-start] of training points start..stop-1 (float64).

        -|x - a x_i|^2 / (2 s^2) = (a x.x_i - a^2 |x_i|^2 / 2) / s^2 + a term constant in i, dropped.
        """
        alpha = self.process.alpha(t)[:, None]
        precision = torch.clamp(1.0 / (self.process.sigma(t) ** 2), max=_MAX_PRECISION)[:, None]
        flat = self._flat[start:stop].to(x.device)
        dots = x @ flat.T
        return (alpha * dots - alpha * alpha * self._half_norms[start:stop].to(x.device)[None]) * precision

    def posterior_mean(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """E[x0 | x_t] for states x [B, ...] at times t [B], float64, one running softmax over chunks."""
        batch = x.shape[0]
        flat_x = x.reshape(batch, -1).to(torch.float64)
        t = torch.as_tensor(t, dtype=torch.float64, device=x.device).reshape(-1).expand(batch)
        running_max = torch.full((batch, 1), -torch.inf, dtype=torch.float64, device=x.device)
        total = torch.zeros((batch, 1), dtype=torch.float64, device=x.device)
        weighted = torch.zeros_like(flat_x)
        for start in range(0, len(self), self.chunk):
            stop = min(start + self.chunk, len(self))
            logits = self.log_weights(flat_x, t, start, stop)
            new_max = torch.maximum(running_max, logits.max(dim=1, keepdim=True).values)
            rescale = torch.exp(running_max - new_max)  # exp(-inf) = 0 on the first chunk
            w = torch.exp(logits - new_max)
            total = total * rescale + w.sum(dim=1, keepdim=True)
            weighted = weighted * rescale + w @ self._flat[start:stop].to(x.device)
            running_max = new_max
        return (weighted / total).reshape(x.shape)

    def __call__(self, x: torch.Tensor, t: torch.Tensor, **cond: Any) -> torch.Tensor:
        if cond:
            raise OptimalStepsError(f"the empirical model of {self.name} is unconditional; got {sorted(cond)}")
        if tuple(x.shape[1:]) != self.sample_shape:
            raise OptimalStepsError(f"empirical model of {self.name} takes samples of shape "
                                    f"{list(self.sample_shape)}, got {list(x.shape[1:])}")
        return self.posterior_mean(x, t).to(x.dtype)

    def data_samples(self, count: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Draws from the model's own distribution: the training points themselves."""
        return draw_images(self.points, count, generator)


def _int_option(options: dict[str, Any], key: str, default: int) -> int:
    value = options.pop(key, default)
    try:
        return int(value)
    except (TypeError, ValueError):
        raise OptimalStepsError(f"empirical option {key} must be a whole number, got {value!r}") from None


def load_empirical(name: str, process: ProcessLike = "flow", **options: Any) -> EmpiricalDenoiser:
    """The exact denoiser of a named dataset's training images (`digits`, `mnist`) or of a .npy array [N, ...].

    Options: `split` (train | test | all, default train), `points` (use only the first N), `chunk`
    (training points per softmax chunk).
    """
    split = options.pop("split", "train")
    limit = _int_option(options, "points", 0)
    chunk = _int_option(options, "chunk", 2048)
    if options:
        raise OptimalStepsError(f"unknown empirical option(s) {sorted(options)}; known: points, split, chunk, process")
    if name in DATASETS:
        data = load_dataset(name, split).images
    elif name.endswith(".npy") or Path(name).is_file():
        data = _load_array(name)
    else:
        raise OptimalStepsError(f"unknown empirical dataset {name!r}; known: {', '.join(DATASETS)}, or FILE.npy")
    if limit < 0:
        raise OptimalStepsError(f"empirical option points must be positive, got {limit}")
    if limit:
        data = data[:limit]
    return EmpiricalDenoiser(data, process, chunk=chunk, name=name)


def _load_array(path: str) -> torch.Tensor:
    array = load_npy(path, "empirical data file")
    if not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)):
        raise OptimalStepsError(f"empirical data file {path} must hold numbers, got {array.dtype}")
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float64))
