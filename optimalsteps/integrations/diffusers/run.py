"""Search and sample with a pipeline: check the call, encode it once, wrap the network, draw the latents
the pipeline would draw, then run the project's search or sampler on them."""

from __future__ import annotations

import copy
import dataclasses
import inspect
import math
import warnings
from typing import Any, Callable, Optional, Sequence, Union

import torch

from ...core.errors import OptimalStepsError
from ...core.processes import NoiseProcess
from ...core.schedules import Schedule, check_steps
from ...core.solvers import get_solver, sample
from ...optimize.options import from_flat
from ...optimize.search import search
from .common import (MEDIA_OPTIONS, CallOptions, PipelineInputs, Prompts, SettingsWarning, check_call_options, require_diffusers)
from .family import Family, Request, whole_number
from .registry import family_of
from .experts import ExpertSchedule, ExpertSplit, boundary_routed, check_expert_schedule, search_experts
from .schedules import in_process, pipeline_schedule, pipeline_teacher
from .settings import current_settings, guidance_scale, model_id, resolution, warn_settings


_CALL_FIELDS = set(inspect.signature(CallOptions).parameters)


def _options(guidance: Optional[float], negative_prompt: Any, images_per_prompt: int, true_cfg_scale: Any,
             num_frames: Any, call_options: dict) -> CallOptions:
    known = set(inspect.signature(CallOptions).parameters)
    unknown = sorted(set(call_options) - known)
    if unknown:
        names = sorted(known - {"guidance_scale"})
        raise OptimalStepsError(f"unknown pipeline call option(s) {unknown}; known: {names}")
    return CallOptions(guidance_scale=guidance, negative_prompt=negative_prompt, images_per_prompt=images_per_prompt,
                       true_cfg_scale=true_cfg_scale, num_frames=num_frames, **call_options)


def _request(pipe: Any, family: Family, prompts: Prompts, options: CallOptions, height: Optional[int],
             width: Optional[int]) -> Request:
    """Every check of a call, before any encoder or network runs."""
    check_call_options(pipe, options)
    family.check_options(pipe, options)
    height, width = family.requested_size(pipe, height, width, options)
    height, width = family.call_size(pipe, *resolution(pipe, family, height, width), options)
    frames = family.num_frames(pipe, options.num_frames)
    scale = guidance_scale(pipe, options.guidance_scale)
    kind = family.guidance(pipe, scale, options)
    if not whole_number(options.images_per_prompt) or options.images_per_prompt < 1:
        raise OptimalStepsError(f"images_per_prompt must be a whole number >= 1, got {options.images_per_prompt!r}")
    conditioning = family.conditioning(pipe, prompts, options)
    spec = f"diffusers:{model_id(pipe) or type(pipe).__name__}"
    return Request(conditioning, scale, kind, height, width, frames, int(options.images_per_prompt), options, spec)


def _metadata(pipe: Any, family: Family, request: Request, steps: Optional[int]) -> dict[str, Any]:
    c, options = request.conditioning, request.options
    metadata = current_settings(pipe, family, request.height, request.width, request.scale, request.frames, steps)
    metadata.update({
        "family": family.name, "scheduler": type(pipe.scheduler).__name__, "guidance": request.kind,
        "prediction": pipe.scheduler.config.get("prediction_type", "flow"),
        "prompts": c.texts if c.texts is not None else (c.labels if c.labels is not None else "embeddings"),
        "images_per_prompt": request.per_prompt,
    })
    for name, value in options.given().items():
        if name != "num_frames" and name not in MEDIA_OPTIONS:
            metadata[name] = value.tolist() if isinstance(value, torch.Tensor) else value
    if "strength" in request.extras:
        metadata["strength"] = request.extras["strength"]  # img2img: the call default's too
    return metadata


def pipeline_inputs(pipe: Any, prompts: Prompts, guidance_scale: Optional[float] = None,
                    height: Optional[int] = None, width: Optional[int] = None, *,
                    negative_prompt: Union[str, Sequence[str], None] = None, images_per_prompt: int = 1,
                    true_cfg_scale: Optional[float] = None, num_frames: Optional[int] = None,
                    steps: Optional[int] = None, **call_options: Any) -> PipelineInputs:
    """Check the request against the pipeline, encode the prompts and wrap the network into the model
    contract. Every check runs before the text encoders do. `call_options` are the other options of the
    pipeline call that change its output (see CallOptions)."""
    require_diffusers()
    family = family_of(pipe)
    options = _options(guidance_scale, negative_prompt, images_per_prompt, true_cfg_scale, num_frames, call_options)
    request = _request(pipe, family, prompts, options, height, width)
    with torch.no_grad():
        cond = family.encode(pipe, request)
        model, dtype = family.build(pipe, request, cond)
    h, w = request.height, request.width
    model.integer_timesteps = family.flow and type(pipe.scheduler).__name__ != "FlowMatchEulerDiscreteScheduler"
    if type(pipe.scheduler).__name__ == "UniPCMultistepScheduler" and family.flow:
        model.scheduler_shift = float(family.shift(pipe, h, w, steps or 1, request.frames)[0])
    model.set_teacher(_teacher(pipe, family, model, request.options, h, w, request.frames))
    boundary = family.expert_boundary(pipe)
    if boundary is not None:
        model.expert_split = ExpertSplit(boundary, lambda m: pipeline_schedule(pipe, m, h, w))
    return PipelineInputs(model, cond, request.conditioning.count * request.per_prompt, h, w, request.frames, dtype,
                          _metadata(pipe, family, request, steps), request.extras)


def _teacher(pipe: Any, family: Family, model: Any, options: CallOptions, height: int, width: int,
             frames: Optional[int]) -> Callable[[int], Schedule]:
    """The model's teacher grid: the pipeline's own, as the call runs it (img2img: from its strength's start,
    which becomes the start of the model's process, since a search starts at the process start)."""
    def grid(teacher_steps: int) -> Schedule:
        teacher = family.teacher(pipe, pipeline_teacher(pipe, teacher_steps, height, width, frames), options)
        if float(teacher.times[0]) != model.process.t_start:
            model.process = dataclasses.replace(model.process, t_start=float(teacher.times[0]))
        return teacher
    return grid


def draw_latents(pipe: Any, inputs: PipelineInputs, generator: Any = None, sigma_start: float = 1.0) -> torch.Tensor:
    """The pipeline's initial latents for `generator`, drawn exactly as its __call__ does (unit variance; an
    img2img pipeline's: its image noised to the flow sigma `sigma_start`)."""
    return family_of(pipe).start(pipe, inputs, generator, sigma_start)


def _initial_ve_scale(pipe: Any, family: Family, sigma0: float) -> float:
    """The VE state a pipeline starts from, per unit of its drawn latents, for a schedule starting at sigma0.

    Schedulers that integrate VE states (Euler, ...) start from latents * init_noise_sigma: sigma0 for
    "linspace"/"trailing" spacing, sqrt(sigma0^2 + 1) for "leading". The others (DDIM, DPM-Solver, ...) start
    from the latents themselves as the VP state, which is the VE state latents * sqrt(sigma0^2 + 1); DiT's
    pipeline always does so.
    """
    vp = math.sqrt(sigma0 * sigma0 + 1.0)
    if not family.custom_schedule:
        return vp
    scheduler = copy.deepcopy(pipe.scheduler)
    if "sigmas" in inspect.signature(scheduler.set_timesteps).parameters:
        scheduler.set_timesteps(sigmas=[sigma0, 0.0])
    init = float(scheduler.init_noise_sigma)
    return init if init > 1.0 else vp


def sampler_noise(pipe: Any, latents: torch.Tensor, process: NoiseProcess, t_start: float) -> torch.Tensor:
    """Noise n with sigma(t_start) * n equal to the state the pipeline starts from with these latents."""
    family = family_of(pipe)
    sigma0 = float(process.sigma(torch.tensor(t_start, dtype=torch.float64)))
    latents = latents.to(torch.promote_types(latents.dtype, torch.float32))
    if family.flow:
        return latents / sigma0  # a flow pipeline starts from the latents whatever its first sigma
    return latents * (_initial_ve_scale(pipe, family, float(process.sigma_ve(t_start))) / sigma0)


def search_pipeline(pipe: Any, prompts: Prompts, steps: int, teacher_steps: int = 200,
                    guidance_scale: Optional[float] = None, height: Optional[int] = None,
                    width: Optional[int] = None, seed: int = 0, *, images_per_prompt: int = 1,
                    negative_prompt: Union[str, Sequence[str], None] = None, true_cfg_scale: Optional[float] = None,
                    num_frames: Optional[int] = None, teacher_schedule: Optional[Schedule] = None,
                    **options: Any) -> Any:
    """Search an M-step schedule with a pipeline's own network, prompts and guidance, on the initial latents
    `pipe(prompts, generator=torch.Generator().manual_seed(seed))` would draw, over all prompts at once
    (`aggregate="joint"`, or "median" of per-sample schedules). The teacher defaults to the model's
    `teacher_grid` (`pipeline_teacher`). Keyword arguments that are pipeline call options (CallOptions:
    max_sequence_length, attention_kwargs, ...) make the searched model the model as called; the others go
    to `optimalsteps.search`.
    Returns its SearchResult, whose schedules record the pipeline settings under metadata["diffusers"]."""
    steps = check_steps(steps)
    call_options = {k: options.pop(k) for k in list(options) if k in _CALL_FIELDS}
    high_steps = options.pop("high_steps", None)
    if teacher_schedule is None and steps >= check_steps(teacher_steps):
        raise OptimalStepsError(f"steps ({steps}) must be fewer than the teacher's steps ({teacher_steps})")
    inputs = pipeline_inputs(pipe, prompts, guidance_scale, height, width, negative_prompt=negative_prompt,
                             images_per_prompt=images_per_prompt, true_cfg_scale=true_cfg_scale,
                             num_frames=num_frames, steps=steps, **call_options)
    if teacher_schedule is None:
        teacher_schedule = inputs.model.teacher_grid(teacher_steps)
    generator = torch.Generator(device="cpu").manual_seed(int(seed))
    start = float(teacher_schedule.times[0])
    noise = sampler_noise(pipe, draw_latents(pipe, inputs, generator, start), inputs.model.process, start)
    recorded = {**inputs.metadata, "seed": int(seed)}
    if getattr(inputs.model, "expert_split", None) is not None:
        return _search_experts(inputs, noise, steps, high_steps, teacher_schedule, recorded, seed, options)
    if high_steps is not None:
        raise OptimalStepsError("high_steps is for pipelines with two experts (Wan 2.2 with transformer_2)")
    result = search(inputs.model, noise, steps, teacher_grid=teacher_schedule, cond=inputs.cond, seed=seed,
                    **from_flat(options))
    for schedule in [result.schedule, result.teacher] + list(result.per_sample or []):
        schedule.metadata["diffusers"] = dict(recorded)
    return result


def _search_experts(inputs: PipelineInputs, noise: torch.Tensor, steps: int, high_steps: Optional[int],
                    teacher: Schedule, recorded: dict, seed: int, options: dict) -> ExpertSchedule:
    result = search_experts(inputs.model, noise, steps, teacher, inputs.cond, options.pop("solver", "euler"),
                            high_steps, seed=seed, **options)
    for schedule in [result.schedule, result.result.teacher]:
        schedule.metadata["diffusers"] = dict(recorded)
    return result


def expert_model(pipe: Any, model: Any, schedule: Schedule) -> Any:
    """The model that runs `schedule`: with a two-expert schedule (metadata split_step: searched, or a named one
    put onto the boundary), the step at the boundary is the second expert's; one for another boundary is
    refused."""
    if "split_step" not in schedule.metadata:
        return model
    split = getattr(model, "expert_split", None)
    boundary = None if split is None else split.boundary
    if boundary is None:
        raise OptimalStepsError(f"the schedule was searched for two experts; {type(pipe).__name__} has one")
    check_expert_schedule(schedule, boundary)
    return boundary_routed(model)


def sample_pipeline(pipe: Any, prompts: Prompts, schedule: Schedule, guidance_scale: Optional[float] = None,
                    height: Optional[int] = None, width: Optional[int] = None, generator: Any = None,
                    solver: str = "euler", *, negative_prompt: Union[str, Sequence[str], None] = None,
                    images_per_prompt: int = 1, true_cfg_scale: Optional[float] = None,
                    num_frames: Optional[int] = None, progress: bool = False, **call_options: Any) -> torch.Tensor:
    """Run `schedule` with the project's sampler on the pipeline's model, conditions and initial latents
    (drawn as the pipeline draws them from `generator`), returning the final latents as
    `pipe(..., output_type="latent")` would (Flux: packed). With solver="euler" and a generator of the same
    seed this equals `pipe(..., **pipeline_kwargs(schedule, pipe))`; it also runs schedules searched for
    heun / dpmpp2m, and pipelines that take no custom schedule (DiT, Wan). `call_options`: as the pipeline
    call takes them (max_sequence_length=..., attention_kwargs=..., ...)."""
    family = family_of(pipe)
    get_solver(solver)
    if not isinstance(schedule, Schedule):
        raise OptimalStepsError(f"expected a Schedule, got {type(schedule).__name__}")
    inputs = pipeline_inputs(pipe, prompts, guidance_scale, height, width, negative_prompt=negative_prompt,
                             images_per_prompt=images_per_prompt, true_cfg_scale=true_cfg_scale,
                             num_frames=num_frames, steps=schedule.steps, **call_options)
    process = inputs.model.process
    schedule = in_process(schedule, process)
    current = current_settings(pipe, family, inputs.height, inputs.width, inputs.metadata["guidance_scale"],
                               inputs.num_frames, schedule.steps)
    warn_settings(schedule, current, solver, "sample_pipeline")
    config = pipe.scheduler.config
    if not family.flow and (config.get("clip_sample") or config.get("thresholding")):
        warnings.warn(f"{type(pipe.scheduler).__name__} clips or thresholds x0 (clip_sample / thresholding); "
                      "sample_pipeline solves the ODE without it", SettingsWarning, stacklevel=2)
    model = expert_model(pipe, inputs.model, schedule)
    start = float(schedule.times[0])
    noise = sampler_noise(pipe, draw_latents(pipe, inputs, generator, start), process, start)
    return sample(model, noise, schedule, solver=solver, cond=inputs.cond, progress=progress).samples
