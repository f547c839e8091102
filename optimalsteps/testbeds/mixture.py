"""The exact Gaussian-mixture model: data x0 ~ sum_k w_k N(mu_k, diag(s_k^2)).

Under any process x_t = alpha x0 + sigma eps the marginal is again a mixture, so the posterior mean
E[x0 | x_t] (the optimal denoiser) and the probability-flow ODE are known in closed form. Searches and
solvers are checked against its exact ODE solution.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.integrate import solve_ivp

from ..core.errors import OptimalStepsError
from ..core.io import load_json
from ..core.processes import ProcessLike, get_process


class GaussianMixture:
    """An exact x0-predicting model for a diagonal Gaussian mixture."""

    prediction = "x0"

    def __init__(self, weights, means, stds, process: ProcessLike = "flow"):
        weights = torch.as_tensor(np.asarray(weights, dtype=np.float64))
        means = torch.as_tensor(np.asarray(means, dtype=np.float64))
        stds = torch.as_tensor(np.asarray(stds, dtype=np.float64))
        if weights.dim() != 1 or weights.numel() < 1:
            raise OptimalStepsError("mixture 'weights' must be a non-empty list of K numbers")
        k = weights.numel()
        if means.dim() != 2 or means.shape[0] != k:
            raise OptimalStepsError(f"mixture 'means' must be [K][D] with K={k}, got shape {list(means.shape)}")
        d = means.shape[1]
        if stds.dim() == 1 and stds.shape[0] == k:
            stds = stds[:, None].expand(k, d).clone()
        if stds.shape != (k, d):
            raise OptimalStepsError(f"mixture 'stds' must be [K] or [K][D] with K={k}, D={d}, got {list(stds.shape)}")
        for name, value in (("weights", weights), ("means", means), ("stds", stds)):
            if not torch.isfinite(value).all():
                raise OptimalStepsError(f"mixture '{name}' contains NaN or inf")
        if (weights <= 0).any():
            raise OptimalStepsError("mixture 'weights' must all be positive")
        if (stds <= 0).any():
            raise OptimalStepsError("mixture 'stds' must all be positive")
        self.weights = weights / weights.sum()
        self.means = means
        self.stds = stds
        self.process = get_process(process)
        self.sample_shape = (d,)

    # ------------------------------------------------------------------ construction

    @classmethod
    def random(cls, dim: int = 64, components: int = 8, seed: int = 0, process: ProcessLike = "flow",
               spread: float = 1.0, std: float = 0.3) -> "GaussianMixture":
        if dim < 1 or components < 1:
            raise OptimalStepsError(f"gmm dim and components must be at least 1, got dim={dim}, components={components}")
        rng = np.random.default_rng(seed)
        weights = rng.dirichlet(np.full(components, 5.0))
        means = rng.normal(size=(components, dim)) * spread
        # one std per component keeps the exact model fast (distances become matrix products)
        stds = std * np.exp(rng.uniform(-0.5, 0.5, size=components))
        return cls(weights, means, stds, process)

    @classmethod
    def from_json(cls, path: str | Path) -> "GaussianMixture":
        data = load_json(path, "mixture file")
        if not isinstance(data, dict):
            raise OptimalStepsError(f"mixture file {path} must hold a JSON object")
        missing = [key for key in ("weights", "means", "stds") if key not in data]
        if missing:
            raise OptimalStepsError(f"mixture file {path} is missing key(s): {', '.join(missing)}")
        try:
            return cls(data["weights"], data["means"], data["stds"], data.get("process", "flow"))
        except (TypeError, ValueError) as exc:
            if isinstance(exc, OptimalStepsError):
                raise OptimalStepsError(f"mixture file {path}: {exc}") from None
            raise OptimalStepsError(f"mixture file {path} has malformed arrays: {exc}") from None

    def to_json(self) -> dict[str, Any]:
        return {
            "weights": self.weights.tolist(),
            "means": self.means.tolist(),
            "stds": self.stds.tolist(),
            "process": self.process.name,
        }

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    # ------------------------------------------------------------------ the exact model

    @property
    def isotropic(self) -> bool:
        """Each component has one std for all dimensions: distances then reduce to matrix products."""
        return bool((self.stds == self.stds[:, :1]).all())

    def _marginal(self, x: torch.Tensor, t: torch.Tensor):
        """Per-component log-densities [B, K] of x_t, and the affine posterior mean of each component as
        (scale [B, K], offset [B, K, D] or None): E[x0 | x_t, k] = scale * x_t + (1 - alpha * scale) * mu_k."""
        dtype = torch.promote_types(x.dtype, torch.float32)
        x = x.to(dtype)
        t = torch.as_tensor(t, dtype=torch.float64, device=x.device).reshape(-1)
        alpha = self.process.alpha(t).to(dtype)[:, None]
        sigma = self.process.sigma(t).to(dtype)[:, None]
        means = self.means.to(device=x.device, dtype=dtype)
        log_w = torch.log(self.weights).to(device=x.device, dtype=dtype)[None]
        if self.isotropic:
            var0 = (self.stds[:, 0] ** 2).to(device=x.device, dtype=dtype)[None]  # [1, K]
            var_t = alpha * alpha * var0 + sigma * sigma  # [B, K]
            sq = ((x * x).sum(-1, keepdim=True) - 2 * alpha * (x @ means.T)
                  + alpha * alpha * (means * means).sum(-1)[None]).clamp(min=0)
            dim = x.shape[-1]
            log_comp = -0.5 * (sq / var_t + dim * torch.log(2 * math.pi * var_t)) + log_w
            return log_comp, alpha * var0 / var_t
        var0 = (self.stds ** 2).to(device=x.device, dtype=dtype)[None]
        var_t = alpha[..., None] ** 2 * var0 + sigma[..., None] ** 2  # [B, K, D]
        diff = x[:, None, :] - alpha[..., None] * means[None]
        log_comp = -0.5 * (diff * diff / var_t + torch.log(2 * math.pi * var_t)).sum(-1) + log_w
        return log_comp, alpha[..., None] * var0 / var_t

    def posterior_mean(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        log_comp, gain = self._marginal(x, t)
        resp = torch.softmax(log_comp, dim=1)  # [B, K]
        x = x.to(log_comp.dtype)
        means = self.means.to(device=x.device, dtype=x.dtype)
        t = torch.as_tensor(t, dtype=torch.float64, device=x.device).reshape(-1)
        alpha = self.process.alpha(t).to(x.dtype)[:, None]
        if gain.dim() == 2:  # isotropic: sum_k r_k (g_k x + (1 - alpha g_k) mu_k)
            return (resp * gain).sum(1, keepdim=True) * x + (resp * (1 - alpha * gain)) @ means
        mean_k = gain * x[:, None, :] + (1 - alpha[..., None] * gain) * means[None]
        return (resp[:, :, None] * mean_k).sum(1)

    def __call__(self, x: torch.Tensor, t: torch.Tensor, **cond: Any) -> torch.Tensor:
        return self.posterior_mean(x, t).to(x.dtype)

    def log_prob_marginal(self, x: torch.Tensor, t) -> torch.Tensor:
        log_comp, _ = self._marginal(x.to(torch.float64), torch.as_tensor(t, dtype=torch.float64).expand(x.shape[0]))
        return torch.logsumexp(log_comp, dim=1)

    def log_prob(self, x0: torch.Tensor) -> torch.Tensor:
        """Exact log-density of clean data [B, D] (float64)."""
        return self.log_prob_marginal(x0, torch.tensor(self.process.t_clean, dtype=torch.float64))

    def data_samples(self, count: int, generator: torch.Generator | None = None) -> torch.Tensor:
        comp = torch.multinomial(self.weights, count, replacement=True, generator=generator)
        z = torch.randn(count, self.dim, generator=generator, dtype=torch.float64)
        return self.means[comp] + self.stds[comp] * z

    # ------------------------------------------------------------------ the exact ODE solution

    def exact_solution(self, noise: torch.Tensor, t_from: float | None = None, rtol: float = 1e-10,
                       atol: float = 1e-10) -> torch.Tensor:
        """The probability-flow ODE solution at the clean end from x = sigma(t_from) * noise (scipy DOP853).

        Flow is integrated in flow time; VP and VE in the scaled state y = x/alpha against log(sigma/alpha),
        where the ODE is dy/dlog s = y - E[x0|y]. The last stretch below s = 1e-7 is replaced by the
        posterior mean, whose error there is O(s^2).
        """
        process = self.process
        t0 = process.t_start if t_from is None else float(t_from)
        x = (noise.to(torch.float64) * process.sigma(torch.tensor(t0, dtype=torch.float64))).cpu()
        batch, dim = x.shape
        t_small = 1e-7

        if process.kind == "flow":
            def rhs(t, flat):
                xs = torch.from_numpy(flat.reshape(batch, dim))
                x0 = self.posterior_mean(xs, torch.full((batch,), t, dtype=torch.float64))
                return ((xs - x0) / t).reshape(-1).numpy()

            sol = solve_ivp(rhs, (t0, t_small), x.reshape(-1).numpy(), method="DOP853", rtol=rtol, atol=atol)
            end = torch.from_numpy(sol.y[:, -1].reshape(batch, dim))
            return self.posterior_mean(end, torch.full((batch,), t_small, dtype=torch.float64))

        alpha0 = float(process.alpha(torch.tensor(t0, dtype=torch.float64)))
        y = x / alpha0
        s0 = float(process.sigma_ve(torch.tensor(t0, dtype=torch.float64)))

        def rhs_log(log_s, flat):
            ys = torch.from_numpy(flat.reshape(batch, dim))
            t = process.t_from_sigma_ve(torch.full((batch,), math.exp(log_s), dtype=torch.float64))
            x_t = ys * process.alpha(t)[:, None]
            x0 = self.posterior_mean(x_t, t)
            return (ys - x0).reshape(-1).numpy()

        sol = solve_ivp(rhs_log, (math.log(s0), math.log(t_small)), y.reshape(-1).numpy(), method="DOP853",
                        rtol=rtol, atol=atol)
        y_end = torch.from_numpy(sol.y[:, -1].reshape(batch, dim))
        t_end = process.t_from_sigma_ve(torch.full((batch,), t_small, dtype=torch.float64))
        return self.posterior_mean(y_end * process.alpha(t_end)[:, None], t_end)
