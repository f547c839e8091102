"""Schedules and pipelines: the process a pipeline's model runs in, its teacher grid and default schedule,
the project solver its scheduler is, and the keyword arguments that make `pipe(...)` run a schedule."""

from __future__ import annotations

import copy
import inspect
import warnings
from typing import Any, Optional

import torch

from ...core.errors import OptimalStepsError
from ...core.processes import FLOW, NoiseProcess
from ...core.schedules import Schedule, check_steps, karras
from .common import SettingsWarning, call_parameters, close
from .family import Family
from .registry import family_of
from .settings import current_settings, resolution, warn_settings
from .tables import SigmaTable

# schedulers whose flow sigmas go through the same shift as FlowMatchEulerDiscreteScheduler's
_SHIFTING_FLOW_SCHEDULERS = ("FlowMatchEulerDiscreteScheduler", "UniPCMultistepScheduler")
_REBUILDING_FLAGS = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "invert_sigmas",
                     "stochastic_sampling", "shift_terminal")


def in_process(schedule: Schedule, process: NoiseProcess) -> Schedule:
    if not isinstance(schedule, Schedule):
        raise OptimalStepsError(f"expected a Schedule, got {type(schedule).__name__}")
    if schedule.process.name == process.name:
        return schedule
    warnings.warn(f"the schedule is for process {schedule.process.name}, the pipeline's is {process.name}: "
                  "converted by matching log-SNR", SettingsWarning, stacklevel=3)
    return schedule.in_process(process)


def pipeline_process(pipe: Any) -> NoiseProcess:
    """The process a pipeline's model runs in: flow, or VE with the scheduler's largest sigma."""
    return FLOW if family_of(pipe).flow else SigmaTable.of(pipe.scheduler).process


def flow_shift(pipe: Any, height: Optional[int] = None, width: Optional[int] = None,
               steps: Optional[int] = None, num_frames: Optional[int] = None) -> tuple[float, dict]:
    """(k, settings) of a flow pipeline's time shift at a resolution (and, for Flux 2, a step count): the
    scheduler maps sigma to k sigma / (1 + (k - 1) sigma), with k the static shift, e^mu or mu ("linear")."""
    family = family_of(pipe)
    if not family.flow:
        raise OptimalStepsError(f"{type(pipe).__name__} is not a flow-matching pipeline")
    height, width = resolution(pipe, family, height, width)
    return family.shift(pipe, height, width, steps, num_frames)


def pipeline_teacher(pipe: Any, teacher_steps: int, height: Optional[int] = None,
                     width: Optional[int] = None, num_frames: Optional[int] = None) -> Schedule:
    """The default teacher grid for a pipeline: its own shifted uniform flow schedule (shift or mu at this
    resolution), or Karras rho = 7 over the discrete model's trained sigma range, then 0."""
    family = family_of(pipe)
    teacher_steps = check_steps(teacher_steps)
    if family.flow:
        k, info = flow_shift(pipe, height, width, teacher_steps, num_frames)
        teacher = family.flow_teacher(pipe, teacher_steps, k)
        teacher.metadata.update(info)
        return teacher
    table = SigmaTable.of(pipe.scheduler)
    return karras(table.process, teacher_steps, sigma_min=table.sigma_min)


def scheduler_solver(scheduler: Any) -> Optional[str]:
    """The project solver a diffusers scheduler's update is (None where it is none of them)."""
    name, config = type(scheduler).__name__, scheduler.config
    if name in ("FlowMatchEulerDiscreteScheduler", "EulerDiscreteScheduler") and not config.get("stochastic_sampling"):
        return "euler"
    if name == "DDIMScheduler":
        return "euler"  # DDIM with eta = 0 is the first-order exponential integrator, the project's euler
    if name == "HeunDiscreteScheduler":
        return "heun"
    if (name == "DPMSolverMultistepScheduler" and config.get("algorithm_type") == "dpmsolver++"
            and config.get("solver_order") == 2):
        return "dpmpp2m"
    if (name == "UniPCMultistepScheduler" and config.get("solver_type") == "bh2" and config.get("solver_order") == 2
            and config.get("predict_x0", True)):
        return "unipc"  # the solver engineer `unipc` adds to core/solvers.py
    return None


def pipeline_schedule(pipe: Any, num_inference_steps: int, height: Optional[int] = None,
                      width: Optional[int] = None) -> Schedule:
    """The schedule `pipe(..., num_inference_steps=M)` runs by default, as a Schedule (the baseline to beat,
    and how runs of pipelines without custom schedules, DiT and Wan, are reproduced by `sample_pipeline`)."""
    family = family_of(pipe)
    steps = check_steps(num_inference_steps)
    process = pipeline_process(pipe)
    scheduler = copy.deepcopy(pipe.scheduler)
    name = type(scheduler).__name__
    try:
        if family.flow:
            family.default_run(pipe, scheduler, steps, *resolution(pipe, family, height, width))
        else:
            scheduler.set_timesteps(steps)
    except ValueError as exc:
        raise OptimalStepsError(f"{name} could not set {steps} steps: {exc}") from None
    if family.flow:
        times = torch.as_tensor(scheduler.sigmas, dtype=torch.float64)
    elif name == "DDIMScheduler":
        times = _ddim_sigmas(scheduler, steps)
    elif getattr(scheduler, "sigmas", None) is not None and len(scheduler.sigmas) == len(scheduler.timesteps) + 1:
        times = torch.as_tensor(scheduler.sigmas, dtype=torch.float64)
    else:
        raise OptimalStepsError(f"cannot read the schedule of {name}")
    if len(times) != steps + 1 or float(times[-1]) != 0.0:
        raise OptimalStepsError(f"{name} does not run {steps} steps ending at sigma 0 (got {len(times)} sigmas "
                                f"ending at {float(times[-1]):.4g}); it is not an ODE schedule this library runs")
    times = times.clamp(max=process.t_start)  # sigma_max is kept to 6 digits in the process name
    return Schedule(times, process, solver=scheduler_solver(scheduler),
                    metadata={"baseline": "pipeline", "pipeline": type(pipe).__name__, "scheduler": name})


def _ddim_sigmas(scheduler: Any, steps: int) -> torch.Tensor:
    """DDIM steps from each timestep to timestep - T // M (the clean end past 0 with set_alpha_to_one): a
    schedule only where each target is the next timestep, as with "leading" spacing."""
    timesteps = [int(t) for t in scheduler.timesteps]
    stride = scheduler.config.num_train_timesteps // steps
    targets = [t - stride for t in timesteps]
    if targets[:-1] != timesteps[1:] or targets[-1] >= 0 or not scheduler.config.get("set_alpha_to_one", True):
        raise OptimalStepsError("this DDIMScheduler's steps do not chain into one schedule ending at sigma 0 "
                                "(use timestep_spacing='leading' and set_alpha_to_one=True)")
    sigmas = SigmaTable.of(scheduler).sigma(torch.tensor(timesteps))
    return torch.cat([sigmas, torch.zeros(1, dtype=torch.float64)])


# ------------------------------------------------------------------------- pipeline_kwargs

def pipeline_kwargs(schedule: Schedule, pipe: Any, height: Optional[int] = None, width: Optional[int] = None,
                    guidance_scale: Optional[float] = None, strength: Optional[float] = None,
                    num_frames: Optional[int] = None) -> dict[str, Any]:
    """Keyword arguments that make `pipe(...)` run exactly `schedule`.

    - flow schedulers (FlowMatchEulerDiscrete; UniPC with flow sigmas): `sigmas` without the terminal 0 (the
      scheduler appends it), pre-divided by the static or dynamic shift so that shifting gives the schedule
      back, plus `mu` where the pipeline takes it and `num_inference_steps` where mu follows it (Flux 2).
      Pass the height / width you call with (default: the schedule's own), since mu follows the resolution
      (LTX-2's also follows `num_frames`, default: the schedule's own).
    - EulerDiscreteScheduler (SD, SDXL): `sigmas` with the terminal 0, M + 1 values.
    - schedulers that take only integer `timesteps` (DPMSolverMultistep, Heun, ...): rounded timesteps, with
      a SettingsWarning saying how far rounding moved the sigmas.
    - img2img (Flux Img2Img): the schedule covers [s, 0] from the sigma s its image is noised to; the kwargs
      carry strength=1.0 (pass them instead of your own strength), so the pipeline keeps every sigma and
      noises the image to the first. `strength`, if given, is checked against the one the schedule was
      searched with.
    Refuses pipelines and schedulers that cannot take a custom schedule (DDIM, DiT, Wan: use
    `sample_pipeline`), and warns when the pipeline, resolution, shift / mu, guidance or solver differ from
    those recorded at search time.
    """
    family = family_of(pipe)
    cls = type(pipe).__name__
    if not family.custom_schedule:
        raise OptimalStepsError(f"{cls} takes no custom schedule (its __call__ has no sigmas or timesteps); run "
                                "the schedule with optimalsteps.diffusers.sample_pipeline")
    recorded = schedule.metadata.get("diffusers") or {}
    _check_strength(pipe, strength, recorded.get("strength"))
    height = recorded.get("height") if height is None else height
    width = recorded.get("width") if width is None else width
    height, width = resolution(pipe, family, height, width)
    schedule = in_process(schedule, pipeline_process(pipe))
    frames = recorded.get("num_frames") if num_frames is None else num_frames
    current = current_settings(pipe, family, height, width, guidance_scale, frames, steps=schedule.steps)
    warn_settings(schedule, current, scheduler_solver(pipe.scheduler), type(pipe.scheduler).__name__)
    if family.flow:
        return _flow_kwargs(schedule, pipe, family, height, width, frames)
    return _discrete_kwargs(schedule, pipe)


def _check_strength(pipe: Any, strength: Any, recorded: Any) -> None:
    if strength is None:
        return
    if "strength" not in call_parameters(pipe):
        raise OptimalStepsError(f"{type(pipe).__name__} takes no strength")
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0.0 < strength <= 1.0:
        raise OptimalStepsError(f"strength must be a number in (0, 1], got {strength!r}")
    if recorded is not None and not close(float(strength), float(recorded)):
        warnings.warn(f"the schedule was searched at strength {recorded}, not {strength}: it starts where "
                      f"strength {recorded} starts", SettingsWarning, stacklevel=3)


def _flow_kwargs(schedule: Schedule, pipe: Any, family: Family, height: int, width: int,
                 frames: Optional[int]) -> dict[str, Any]:
    scheduler = pipe.scheduler
    name = type(scheduler).__name__
    if name not in _SHIFTING_FLOW_SCHEDULERS:
        raise OptimalStepsError(f"{name} cannot take a custom flow schedule exactly; set pipe.scheduler = "
                                "FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config), or run "
                                "sample_pipeline")
    config = scheduler.config
    for flag in _REBUILDING_FLAGS:
        if config.get(flag):
            raise OptimalStepsError(f"{name} with {flag}={config.get(flag)!r} changes custom sigmas; build the "
                                    "scheduler without it")
    k, info = family.shift(pipe, height, width, schedule.steps, frames)
    sigmas = schedule.to_flow_sigmas()
    # the scheduler maps s to k s / (1 + (k - 1) s); hand it the preimage of each schedule sigma, written
    # so that sigma = 1 stays exactly 1 for any k
    unshifted = sigmas / (sigmas + k * (1.0 - sigmas))
    # UniPC shifts the sigmas with array arithmetic: a list would fail inside its set_timesteps
    values = unshifted.numpy() if name == "UniPCMultistepScheduler" else unshifted.tolist()
    return {"sigmas": values, **family.schedule_extras(pipe, info, schedule.steps),
            **family.schedule_timesteps(pipe, unshifted)}


def _discrete_kwargs(schedule: Schedule, pipe: Any) -> dict[str, Any]:
    scheduler = pipe.scheduler
    name = type(scheduler).__name__
    params = set(inspect.signature(scheduler.set_timesteps).parameters)
    if name == "EulerDiscreteScheduler":
        return {"sigmas": schedule.to_sigmas().tolist()}  # M + 1 values: it expects the terminal 0
    if "timesteps" in params and getattr(scheduler, "alphas_cumprod", None) is not None:
        for flag in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "use_lu_lambdas"):
            if scheduler.config.get(flag):
                raise OptimalStepsError(f"{name} with {flag}=True cannot take custom timesteps")
        return {"timesteps": _rounded_timesteps(schedule, scheduler)}
    raise OptimalStepsError(f"{name} takes no custom schedule (its set_timesteps has neither sigmas nor "
                            "timesteps); set pipe.scheduler = EulerDiscreteScheduler.from_config("
                            "pipe.scheduler.config), or run sample_pipeline")


def _rounded_timesteps(schedule: Schedule, scheduler: Any) -> list[int]:
    table = SigmaTable.of(scheduler)
    sigmas = schedule.to_sigmas()[:-1]
    rounded = torch.round(table.timestep(sigmas).double()).long().clamp(0, len(table.log_sigmas) - 1)
    if bool((rounded[1:] >= rounded[:-1]).any()):
        raise OptimalStepsError(f"rounding to integer timesteps merges steps ({rounded.tolist()}); use "
                                "EulerDiscreteScheduler (it takes sigmas) or sample_pipeline")
    change = float(((table.sigma(rounded) / sigmas) - 1.0).abs().max())
    warnings.warn(f"{type(scheduler).__name__} takes integer timesteps only: rounding moved the schedule's sigmas "
                  f"by up to {100 * change:.3g}% (timesteps {rounded.tolist()})", SettingsWarning, stacklevel=4)
    return rounded.tolist()


