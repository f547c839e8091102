"""Amplitude calibration (OSS paper sec. 3.4): rescale each step's model input to the teacher's quantile range.

The search stores, per schedule time, the teacher's mean 5% / 95% quantiles of the state. At sampling
time, before each model call, each sample's own quantiles are mapped to them: the paper's Eq. 13 is a
pure scale, (S95 - S5) / (x95 - x5) * x; the released code's is the affine map matching both quantiles.
Off by default: it lowers PSNR against the teacher.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..core.errors import OptimalStepsError, unknown

MODES = ("scale", "affine")


@dataclass(frozen=True)
class AmplitudeCalibration:
    q05: tuple[float, ...]  # the teacher's 5% quantile at each schedule time but the last
    q95: tuple[float, ...]
    mode: str = "scale"

    def __post_init__(self):
        if self.mode not in MODES:
            raise unknown("calibration mode", self.mode, MODES)
        if len(self.q05) != len(self.q95):
            raise OptimalStepsError("calibration quantile lists differ in length")

    @classmethod
    def from_schedule(cls, schedule, mode: str = "scale") -> "AmplitudeCalibration":
        stats = schedule.metadata.get("calibration")
        if not isinstance(stats, dict) or "q05" not in stats or "q95" not in stats:
            raise OptimalStepsError("this schedule has no calibration statistics (search it with optimalsteps search)")
        if len(stats["q05"]) != schedule.steps:
            raise OptimalStepsError(
                f"calibration statistics have {len(stats['q05'])} entries for a {schedule.steps}-step schedule"
            )
        return cls(tuple(map(float, stats["q05"])), tuple(map(float, stats["q95"])), mode)

    def __call__(self, x: torch.Tensor, step_index: int, t: float) -> torch.Tensor:
        flat = x.reshape(x.shape[0], -1).to(torch.float32)
        q = torch.quantile(flat, torch.tensor([0.05, 0.95], device=x.device), dim=1)  # [2, B]
        lo, hi = q[0], q[1]
        target_lo, target_hi = self.q05[step_index], self.q95[step_index]
        scale = (target_hi - target_lo) / (hi - lo).clamp(min=1e-12)
        shape = (-1,) + (1,) * (x.dim() - 1)
        if self.mode == "scale":
            return x * scale.to(x.dtype).reshape(shape)
        shift = target_lo - scale * lo
        return x * scale.to(x.dtype).reshape(shape) + shift.to(x.dtype).reshape(shape)
