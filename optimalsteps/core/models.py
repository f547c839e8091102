"""The model contract: what a model is, how its prediction becomes a clean estimate, classifier-free
guidance, and drawing noise of a model's sample shape.

A model is any callable `model(x, t, **cond)` with attributes `process` ("flow" | "vp" | "ve", or a
`NoiseProcess`) and `prediction` ("x0" | "eps" | "v" | "velocity"); `x` is `[B, ...]` and `t` a tensor
`[B]` in the process's native time. Optional attributes: `sample_shape` (the shape of one sample, used
when noise must be drawn), `data_samples(n, generator)` (true data, for distribution metrics),
`spec` (the string it was loaded from), `teacher_grid(teacher_steps) -> Schedule` (the grid a search or a
comparison distils for this model, e.g. a pipeline's shifted or trained-range grid; read through
`model_teacher_grid`, which falls back to `default_teacher_grid`), `time_dtype` (the dtype it takes `t`
in; None or absent: x's dtype).
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

from .checks import check_model, check_noise_count, check_schedule_arg, check_seed
from .errors import OptimalStepsError
from .processes import NoiseProcess, check_prediction, get_process, to_x0_eps
from .schedules import Schedule, check_steps, karras, uniform


class Model(Protocol):
    process: Any
    prediction: str

    def __call__(self, x: torch.Tensor, t: torch.Tensor, **cond: Any) -> torch.Tensor: ...


def model_process(model: Any) -> NoiseProcess:
    if not hasattr(model, "process") or not hasattr(model, "prediction"):
        raise OptimalStepsError("a model needs attributes 'process' and 'prediction' (see optimalsteps.models)")
    check_prediction(model.prediction)
    return get_process(model.process)


def model_time_dtype(model: Any, x: torch.Tensor) -> torch.dtype:
    """The dtype `model` takes its times in: its `time_dtype`, else the state's dtype."""
    return getattr(model, "time_dtype", None) or x.dtype


def end_of_step(model: Any) -> Any:
    """The model that evaluates the state a step has just reached (Heun's corrector): its `end_of_step` where it
    switches networks at a time a step can end on (Wan 2.2's boundary, which the step landing there runs on
    the high-noise expert and the next step on the low-noise one), else the model itself."""
    return getattr(model, "end_of_step", model)


def default_teacher_grid(process: NoiseProcess, teacher_steps: int) -> Schedule:
    """The default teacher grid: uniform native time for flow / vp, Karras rho = 7 (80 -> 0.002, then 0) for ve."""
    if process.kind == "ve":
        return karras(process, teacher_steps, sigma_min=0.002, sigma_max=min(80.0, process.t_start))
    return uniform(process, teacher_steps)


def model_teacher_grid(model: Any, teacher_steps: int) -> Schedule:
    """The teacher grid of `teacher_steps` steps for `model`: its own `teacher_grid(teacher_steps)` where it
    has one, else `default_teacher_grid`. Search and compare both read it here."""
    process = model_process(model)
    own = getattr(model, "teacher_grid", None)
    grid = own(check_steps(teacher_steps)) if callable(own) else default_teacher_grid(process, teacher_steps)
    return check_teacher_grid(grid, process)


def check_teacher_grid(grid: Any, process: NoiseProcess) -> Schedule:
    """A teacher grid as a Schedule of `process` that starts at the process start."""
    check_schedule_arg(grid, "teacher grid")
    grid = grid if isinstance(grid, Schedule) else Schedule(grid, process)
    if grid.process.name != process.name:
        raise OptimalStepsError(f"teacher grid is for {grid.process.name}, the model's process is {process.name}")
    if abs(float(grid.times[0]) - process.t_start) > 1e-9 * max(1.0, process.t_start):
        raise OptimalStepsError("the teacher grid must start at the process start")
    return grid


def predict_x0(model: Any, x: torch.Tensor, t: torch.Tensor, cond: dict | None = None) -> torch.Tensor:
    """The model's clean-data estimate at states x [B, ...] and times t [B], in x's dtype.

    The model may run in a lower precision; its output is brought back to the state dtype before any
    arithmetic. A non-finite or wrongly shaped output is reported with the time at which it happened.
    """
    process = model_process(model)
    t = torch.as_tensor(t, dtype=torch.float64, device=x.device)
    if t.dim() == 0:
        t = t.expand(x.shape[0])
    out = model(x, t.to(model_time_dtype(model, x)), **(cond or {}))
    if not isinstance(out, torch.Tensor) or out.shape != x.shape:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise OptimalStepsError(
            f"model returned shape {shape} for input shape {tuple(x.shape)} at t={_times_text(t)}"
        )
    out = out.to(x.dtype)
    if not torch.isfinite(out).all():
        raise OptimalStepsError(f"model returned NaN/inf at t={_times_text(t)}")
    x0, _ = to_x0_eps(model.prediction, out, x, t, process)
    return x0


# Conditions, one rule everywhere: a tensor whose first dimension is 1 (or a scalar, or a non-tensor) is
# broadcast to every sample; a tensor with B rows holds one row per sample; any other row count is an error.

def is_broadcast(value: Any) -> bool:
    """Whether a condition value is shared by all samples (not a tensor, a scalar, or first dimension 1)."""
    return not isinstance(value, torch.Tensor) or value.dim() == 0 or value.shape[0] == 1


def check_cond(cond: dict | None, batch: int) -> dict | None:
    """`cond` unchanged, after checking every per-sample tensor has one row per each of `batch` samples."""
    for key, value in (cond or {}).items():
        if not is_broadcast(value) and value.shape[0] != batch:
            raise OptimalStepsError(f"condition {key!r} has {value.shape[0]} rows but there are {batch} noise samples")
    return cond


def index_cond(cond: dict | None, index: torch.Tensor) -> dict | None:
    """The conditions of the samples at `index`: per-sample tensors indexed on their first dimension,
    broadcast ones kept as they are."""
    if not cond:
        return cond
    return {k: v if is_broadcast(v) else v[index] for k, v in cond.items()}


def _times_text(t: torch.Tensor) -> str:
    values = sorted({round(float(v), 6) for v in t.flatten()[:1000]})
    if len(values) <= 3:
        return ", ".join(f"{v:g}" for v in values)
    return f"{values[0]:g}..{values[-1]:g}"


class CFGModel:
    """Classifier-free guidance: out = uncond + scale * (cond - uncond), one batched call of 2B.

    `cond` and `uncond` are dicts of per-sample condition tensors (first dimension B for `cond`; `uncond`
    tensors may have first dimension 1 and are broadcast). Conditions passed at call time override `cond`.
    """

    def __init__(self, model: Any, guidance_scale: float, cond_key: str = "labels", uncond_value: Any = None):
        self.model = model
        self.process = model.process
        self.prediction = model.prediction
        self.guidance_scale = float(guidance_scale)
        self.cond_key = cond_key
        self.uncond_value = uncond_value
        for attr in ("sample_shape", "data_samples", "num_classes", "spec", "features", "data_range", "teacher_grid",
                     "time_dtype"):
            if hasattr(model, attr):
                setattr(self, attr, getattr(model, attr))

    def __call__(self, x: torch.Tensor, t: torch.Tensor, **cond: Any) -> torch.Tensor:
        if self.guidance_scale == 1.0 or self.cond_key not in cond:
            return self.model(x, t, **cond)
        c = cond[self.cond_key]
        u = self.uncond_value
        if u is None:
            raise OptimalStepsError("CFGModel needs an unconditional value (uncond_value)")
        u = torch.as_tensor(u, device=c.device, dtype=c.dtype)
        if u.dim() < c.dim() or u.shape[0] != c.shape[0]:
            u = u.expand(c.shape) if u.dim() == c.dim() else u.expand(c.shape[:1] + u.shape)
        rest = {k: v for k, v in cond.items() if k != self.cond_key}
        both = self.model(torch.cat([x, x]), torch.cat([t, t]), **{self.cond_key: torch.cat([c, u])}, **rest)
        out_c, out_u = both.chunk(2)
        return out_u + self.guidance_scale * (out_c - out_u)


def sample_shape(model: Any) -> tuple[int, ...]:
    shape = getattr(model, "sample_shape", None)
    if shape is None:
        raise OptimalStepsError("the model has no sample_shape; pass noise explicitly (--noise FILE.npy)")
    return tuple(int(s) for s in shape)


def draw_noise(model: Any, count: int, seed: int, dtype: torch.dtype = torch.float32,
               device: torch.device | str = "cpu", allow_huge: bool = False) -> torch.Tensor:
    """Standard normal noise [count, *sample_shape], deterministic given the seed (drawn on the CPU);
    more than checks.MAX_SAMPLES samples need `allow_huge`, more than fit in memory are refused."""
    count = check_noise_count(count, sample_shape(check_model(model)), allow_huge)
    seed = check_seed(seed)
    generator = torch.Generator().manual_seed(int(seed))
    return torch.randn((count,) + sample_shape(model), generator=generator, dtype=torch.float64).to(
        dtype=dtype, device=device
    )
