"""Evaluation metrics, all in one place: sample-wise errors against a reference and distribution distances.

Every function takes tensors [N, ...] (samples are flattened to vectors) and returns a Python float;
arithmetic is float64 whatever the inputs' dtype.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from scipy.linalg import sqrtm

# the sliced W2 lives in the core, where the validated search's data guard uses it too; re-exported here
from ..core.distances import (flat_samples, random_projections, sliced_wasserstein,  # noqa: F401
                              sliced_wasserstein_numpy)
from ..core.errors import OptimalStepsError
from ..optimize.objectives import per_sample_error


def _pair(x: torch.Tensor, ref: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x, ref = flat_samples(x), flat_samples(ref)
    if x.shape != ref.shape:
        raise OptimalStepsError(f"samples {list(x.shape)} and reference {list(ref.shape)} differ in shape")
    return x, ref


# ---------------------------------------------------------------------------------- sample-wise


def mse_per_sample(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Mean squared error of each sample against its reference (same noise): [N] float64, on the CPU, after
    checking that both are [N, ...] of one shape (the search's `per_sample_error` does the arithmetic)."""
    return per_sample_error(*_pair(x, ref))


def mse(x: torch.Tensor, ref: torch.Tensor) -> float:
    """Mean squared error over all samples and elements."""
    return float(mse_per_sample(x, ref).mean())


def psnr(x: torch.Tensor, ref: torch.Tensor, data_range: float) -> float:
    """Mean over samples of 10 log10(data_range^2 / MSE_i), in dB (images in [-1, 1] have data_range 2).

    A sample identical to its reference counts as 300 dB rather than infinity, so the mean stays finite."""
    if not (data_range > 0 and math.isfinite(data_range)):
        raise OptimalStepsError(f"PSNR needs a positive data range, got {data_range}")
    per = mse_per_sample(x, ref).clamp(min=data_range ** 2 * 1e-30)
    return float((10.0 * torch.log10(data_range ** 2 / per)).mean())


def error_quantiles(x: torch.Tensor, ref: torch.Tensor, levels=(0.5, 0.9, 0.99)) -> list[float]:
    """Quantiles of the per-sample mean squared error: the typical sample (median) and the tails."""
    per = mse_per_sample(x, ref)
    return [float(v) for v in torch.quantile(per, torch.tensor(levels, dtype=torch.float64))]


def mode_labels(model: Any, x: torch.Tensor) -> torch.Tensor | None:
    """Which mode each sample [N, ...] belongs to, as integer labels [N]: the most likely component of a
    Gaussian mixture (its exact density), the classifier's label for a digits model; None if neither."""
    if hasattr(model, "means") and hasattr(model, "stds") and hasattr(model, "weights"):
        flat = flat_samples(x)
        means, stds = model.means.to(torch.float64), model.stds.to(torch.float64)  # [K, D]
        z = (flat[:, None, :] - means[None]) / stds[None]
        log_comp = -0.5 * z.pow(2).sum(-1) - torch.log(stds).sum(-1)[None] + torch.log(model.weights)[None]
        return log_comp.argmax(1)
    if isinstance(getattr(model, "dataset", None), str) and callable(getattr(model, "features", None)):
        from ..testbeds.nets import classify

        if getattr(model, "_classify", None) is None:
            model._classify = classify(model.dataset)
        return model._classify(x).argmax(1)
    return None


def mode_change_rate(model: Any, x: torch.Tensor, ref: torch.Tensor) -> float | None:
    """The fraction of samples whose mode (`mode_labels`) differs from their reference's (same noise)."""
    labels, ref_labels = mode_labels(model, x), mode_labels(model, ref)
    if labels is None or ref_labels is None:
        return None
    return float((labels != ref_labels).to(torch.float64).mean())


# ---------------------------------------------------------------------------------- distributions


def median_bandwidth(y: torch.Tensor) -> float:
    """The median distance between distinct pairs of samples: the usual RBF bandwidth heuristic."""
    y = flat_samples(y)
    d = torch.cdist(y, y)
    upper = d[torch.triu(torch.ones_like(d, dtype=torch.bool), diagonal=1)]
    return float(upper.median()) if upper.numel() else 1.0


def mmd(x: torch.Tensor, y: torch.Tensor, bandwidth: float | None = None) -> float:
    """Unbiased squared maximum mean discrepancy with the RBF kernel exp(-|a-b|^2 / (2 h^2)).

    h defaults to the median pairwise distance of `y`, the reference set, so that comparing several sample
    sets against one reference uses one kernel. Can be slightly negative (unbiased) when x and y agree."""
    x, y = flat_samples(x), flat_samples(y)
    if x.shape[0] < 2 or y.shape[0] < 2:
        raise OptimalStepsError("MMD needs at least 2 samples in each set")
    h = median_bandwidth(y) if bandwidth is None else float(bandwidth)
    if not (h > 0 and math.isfinite(h)):
        raise OptimalStepsError(f"MMD bandwidth must be positive, got {h}")

    def mean_kernel(a: torch.Tensor, b: torch.Tensor, same: bool) -> float:
        k = torch.exp(-torch.cdist(a, b).pow(2) / (2 * h * h))
        if same:  # drop the diagonal (i = j) terms
            n = a.shape[0]
            return float((k.sum() - k.diagonal().sum()) / (n * (n - 1)))
        return float(k.mean())

    return mean_kernel(x, x, True) + mean_kernel(y, y, True) - 2 * mean_kernel(x, y, False)


def mixture_nll(mixture: Any, x: torch.Tensor) -> float:
    """Mean negative log-likelihood of samples under a model's exact data density (`log_prob`, e.g.
    `GaussianMixture`): low for samples where the data are; not a divergence (a collapsed set can score well)."""
    if not hasattr(mixture, "log_prob"):
        raise OptimalStepsError("exact NLL needs a model with an exact log_prob (a Gaussian mixture)")
    return float(-mixture.log_prob(flat_samples(x)).mean())


def gaussian_statistics(features: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Mean [D] and covariance [D, D] (unbiased) of a feature set [N, D]."""
    f = flat_samples(features).numpy()
    if f.shape[0] < 2:
        raise OptimalStepsError("a covariance needs at least 2 feature vectors")
    return f.mean(0), np.atleast_2d(np.cov(f, rowvar=False))


def frechet_from_statistics(mu1: np.ndarray, cov1: np.ndarray, mu2: np.ndarray, cov2: np.ndarray) -> float:
    """|mu1 - mu2|^2 + tr(cov1 + cov2 - 2 (cov1 cov2)^(1/2)): the Frechet (W2) distance of two Gaussians,
    squared (as FID reports it)."""
    mu1, mu2 = np.atleast_1d(mu1), np.atleast_1d(mu2)
    cov1, cov2 = np.atleast_2d(cov1), np.atleast_2d(cov2)
    root = sqrtm(cov1 @ cov2)
    if not np.isfinite(root).all():
        # a singular product: regularise both covariances a little, as FID implementations do
        eps = 1e-6 * np.eye(cov1.shape[0])
        root = sqrtm((cov1 + eps) @ (cov2 + eps))
    root = np.real(root)  # rounding can leave tiny imaginary parts
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(cov1) + np.trace(cov2) - 2 * np.trace(root))


def frechet_distance(features_x: torch.Tensor, features_y: torch.Tensor) -> float:
    """Frechet distance between the Gaussian fits of two feature sets [N, D] (FID when the features are
    Inception's; the digits models supply their own)."""
    return frechet_from_statistics(*gaussian_statistics(features_x), *gaussian_statistics(features_y))
