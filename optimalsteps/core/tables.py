"""Published schedules: Align Your Steps' tables and the OSS authors' ComfyUI tables, as noise levels for
one model family at their native step count, reached at other step counts by log-linear interpolation
of the levels (as the ComfyUI nodes do) and mapped to any process by matched SNR."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .errors import OptimalStepsError
from .processes import FLOW, ProcessLike, convert_times, get_process
from .schedules import Schedule, check_steps, loglinear_interp

@dataclass(frozen=True)
class Table:
    """A published schedule: M+1 noise levels, noisiest first, for one model family at its native M steps."""

    method: str  # "ays" or "oss"
    family: str
    levels: tuple[float, ...]  # as published; the last one is replaced by 0 when used
    space: str  # "ve": sigma / alpha (k-diffusion sigmas); "flow": flow-matching time
    pin_start: bool  # whether the first level means "the model's largest noise" (mapped to the process start)
    source: str

    @property
    def name(self) -> str:
        return f"{self.method}-{self.family}"

    @property
    def steps(self) -> int:
        return len(self.levels) - 1


_AYS_SOURCE = ("Align Your Steps (Sabour, Fidler, Kreis, ICML 2024), 10-step tables from the project's how-to page "
               "research.nvidia.com/labs/toronto-ai/AlignYourSteps/howto.html, as shipped in ComfyUI "
               "comfy_extras/nodes_align_your_steps.py (SD1.5 / SDXL: Stable Diffusion's sigmas at AYS's timesteps)")
_OSS_SOURCE = ("the OSS authors' tables in ComfyUI's OptimalStepsScheduler, comfy_extras/nodes_optimalsteps.py "
               "(PR #7584, April 2025; Chroma added later by others), searched with Euler in flow time")

TABLES: dict[str, Table] = {t.name: t for t in (
    # VE sigmas of Stable Diffusion's discrete VP schedule at AYS's published integer timesteps (SD1.5: 999, 850,
    # 736, 645, 545, 455, 343, 233, 124, 24, 0; SDXL: 999, 845, 730, 587, 443, 310, 193, 116, 53, 13, 0), as
    # ComfyUI ships them; AYS's continuous sigmas (diffusers AysSchedules, 3 decimals) differ by at most 1.4%
    Table("ays", "sd15", (14.6146412293, 6.4745760956, 3.8636745985, 2.6946151520, 1.8841921177, 1.3943805092,
                          0.9642583904, 0.6523686016, 0.3977456272, 0.1515232662, 0.0291671582),
          "ve", True, _AYS_SOURCE + "; Stable Diffusion 1.5"),
    Table("ays", "sdxl", (14.6146412293, 6.3184485287, 3.7681790315, 2.1811480769, 1.3405244945, 0.8620721141,
                          0.5550693289, 0.3798540708, 0.2332364134, 0.1114188177, 0.0291671582),
          "ve", True, _AYS_SOURCE + "; Stable Diffusion XL"),
    # Stable Video Diffusion is an EDM (VE) model with sigma_max 700
    Table("ays", "svd", (700.00, 54.5, 15.886, 7.977, 4.248, 1.789, 0.981, 0.403, 0.173, 0.034, 0.002),
          "ve", True, _AYS_SOURCE + "; Stable Video Diffusion"),
    # flow times; FLUX.1-dev at 1024x1024 (mu = 1.15): its first level 0.9968 is a searched start, not 1
    Table("oss", "flux", (0.9968, 0.9886, 0.9819, 0.975, 0.966, 0.9471, 0.9158, 0.8287, 0.5512, 0.2808, 0.001),
          "flow", False, _OSS_SOURCE + "; FLUX.1-dev, 10 steps"),
    # Wan 2.1, searched for time shift 8.0 (the authors' comment)
    Table("oss", "wan", (1.0, 0.997, 0.995, 0.993, 0.991, 0.989, 0.987, 0.985, 0.98, 0.975, 0.973, 0.968, 0.96,
                         0.946, 0.927, 0.902, 0.864, 0.776, 0.539, 0.208, 0.001),
          "flow", False, _OSS_SOURCE + "; Wan 2.1 at shift 8.0, 20 steps"),
    Table("oss", "chroma", (0.992, 0.99, 0.988, 0.985, 0.982, 0.978, 0.973, 0.968, 0.961, 0.953, 0.943, 0.931,
                            0.917, 0.9, 0.881, 0.858, 0.832, 0.802, 0.769, 0.731, 0.69, 0.646, 0.599, 0.55, 0.501,
                            0.451, 0.402, 0.355, 0.311, 0.27, 0.232, 0.199, 0.169, 0.143, 0.12, 0.101, 0.084, 0.07,
                            0.058, 0.048, 0.001),
          "flow", False, _OSS_SOURCE + "; Chroma, 40 steps"),
)}

# the method-level names that take `family=`
TABLE_METHODS = {"ays": "Align Your Steps", "oss-table": "OSS (ComfyUI OptimalStepsScheduler)"}


def _table_key(method: str) -> str:
    return "ays" if method == "ays" else "oss"


def get_table(name: str, family: str | None = None) -> Table:
    """A table by full name (`ays-sd15`) or by method and family (`ays` or `oss-table`, family="sd15")."""
    if name in TABLE_METHODS:
        method = name
    elif name.startswith("ays-") or name.startswith("oss-"):
        method = "ays" if name.startswith("ays-") else "oss-table"
        own = name.split("-", 1)[1]
        if family is not None and family.lower() != own:
            raise OptimalStepsError(f"{name} is the {own} table; family={family!r} contradicts it")
        family = own
    else:
        raise OptimalStepsError(f"{name!r} is not a published table; known: {', '.join(TABLES)}")
    if family is None:
        raise OptimalStepsError(f"{name} needs a model family (family=...): one of {', '.join(families(method))}")
    key = f"{_table_key(method)}-{family.lower()}"
    if key not in TABLES:
        raise OptimalStepsError(f"{TABLE_METHODS[method]} has no table for model family {family!r}; "
                                f"it has: {', '.join(families(method))}")
    return TABLES[key]


def families(method: str) -> list[str]:
    prefix = _table_key(method) + "-"
    return [t.family for t in TABLES.values() if t.name.startswith(prefix)]


def table_levels(table: Table, steps: int) -> np.ndarray:
    """The table at `steps` steps: its M+1 levels log-linearly interpolated to steps+1 (unchanged at its
    native step count), the last replaced by 0, as the AYS and OptimalSteps ComfyUI nodes do."""
    steps = check_steps(steps)
    levels = np.asarray(table.levels, dtype=np.float64)
    if steps + 1 != len(levels):
        levels = loglinear_interp(levels, steps + 1)
    levels = levels.copy()
    levels[-1] = 0.0
    return levels


def table_schedule(name: str, process: ProcessLike, steps: int, family: str | None = None,
                   pin_start: bool | None = None) -> Schedule:
    """A published table for `process`: its noise levels mapped by matched SNR (VE sigma s has log-SNR -log s,
    flow time t has log((1-t)/t)). `pin_start` (default: the table's own convention, on for AYS whose first
    level is the model's largest sigma) moves the first time to the process start."""
    table = get_table(name, family)
    process = get_process(process)
    levels = torch.as_tensor(table_levels(table, steps))
    if table.space == "flow":
        times = convert_times(levels, FLOW, process)
        above = levels[:-1] >= float(convert_times(torch.tensor(process.t_start), process, FLOW))
    else:
        top = process.sigma_ve_max
        times = process.t_from_sigma_ve(levels.clamp(max=top))
        above = levels[:-1] >= top
    # levels above the process's largest noise collapse onto its start: only the first may (it is the start)
    if bool(above[1:].any()):
        shown = ", ".join(f"{v:.4g}" for v in levels[:-1][above].tolist())
        raise OptimalStepsError(f"table {table.name} has noise levels above the largest of process {process.name} "
                                f"({shown}); it was made for {'flow' if table.space == 'flow' else 'VE-sigma'} models")
    if table.pin_start if pin_start is None else pin_start:
        times[0] = process.t_start
    times[-1] = process.t_clean
    metadata = {"baseline": table.name, "source": table.source, "native_steps": table.steps,
                "levels": levels.tolist(), "level_space": table.space}
    if steps != table.steps:
        metadata["interpolated_from_steps"] = table.steps
    return Schedule(times, process, metadata=metadata)
