"""Discrete DDPM noise levels (SD, SDXL, DiT): the scheduler's sigma table, the network's fractional
timestep of any sigma, and the network output as the project's prediction."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ...core.errors import OptimalStepsError
from ...core.processes import NoiseProcess, ve_process


@dataclass(frozen=True)
class SigmaTable:
    """A discrete scheduler's noise levels: the VE sigma of timesteps 0..T-1 and the timestep of any sigma.

    Built from the scheduler's own float32 `alphas_cumprod` (trained betas and zero-SNR rescaling
    included), because the network sees the timesteps diffusers computes from that table.
    """

    log_sigmas: torch.Tensor  # float32 [T], increasing
    continuous: bool  # v-prediction configs with timestep_type="continuous" take 0.25 log sigma

    @classmethod
    def of(cls, scheduler: Any) -> "SigmaTable":
        alphas_cumprod = getattr(scheduler, "alphas_cumprod", None)
        if alphas_cumprod is None:
            raise OptimalStepsError(f"{type(scheduler).__name__} has no alphas_cumprod: not a discrete DDPM scheduler")
        ac = torch.as_tensor(alphas_cumprod, dtype=torch.float32).cpu()
        config = scheduler.config
        continuous = (config.get("timestep_type") == "continuous" and config.get("prediction_type") == "v_prediction")
        return cls(torch.log(((1 - ac) / ac) ** 0.5), continuous)

    @property
    def sigma_min(self) -> float:
        return float(torch.exp(self.log_sigmas[0].double()))

    @property
    def process(self) -> NoiseProcess:
        # six significant digits: the process is named ve(sigma_max=%g), and a schedule file re-creates its
        # process from that name, so the start time must survive the round trip exactly
        return ve_process(float(f"{float(torch.exp(self.log_sigmas[-1].double())):g}"))

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        """The network's float32 timestep at VE sigma: linear interpolation in log sigma, as diffusers does."""
        s = sigma.to(torch.float32)
        if self.continuous:
            return 0.25 * torch.log(s)
        log_s = torch.log(s.clamp(min=1e-10)).double()
        table = self.log_sigmas.double().to(s.device)
        low = (torch.searchsorted(table, log_s, right=True) - 1).clamp(0, len(table) - 2)
        weight = ((table[low] - log_s) / (table[low] - table[low + 1])).clamp(0, 1)
        return (low.double() + weight).to(torch.float32)

    def sigma(self, timesteps: torch.Tensor) -> torch.Tensor:
        """VE sigma (float64) of integer timesteps."""
        return torch.exp(self.log_sigmas.double()[torch.as_tensor(timesteps, dtype=torch.long)])


def discrete_x0(prediction_type: str, out: torch.Tensor, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """The network output as the model returns it: eps as is, v- and sample-prediction as x0 (VE state x)."""
    if prediction_type == "v_prediction":
        return out * (-sigma / (sigma**2 + 1) ** 0.5) + x / (sigma**2 + 1)
    return out


def discrete_prediction(prediction_type: str) -> str:
    if prediction_type not in ("epsilon", "v_prediction", "sample"):
        raise OptimalStepsError(f"scheduler prediction_type {prediction_type!r} is not supported")
    return "eps" if prediction_type == "epsilon" else "x0"
