"""The OptimalSteps nodes: search a schedule on the loaded model, load a saved one as SIGMAS.

ComfyUI is imported only inside the functions that run in it; the numerics live in the library
(`optimalsteps.integrations.comfyui`, `optimalsteps.optimize.search`).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from optimalsteps.core.errors import OptimalStepsError
from optimalsteps.core.schedules import Schedule
from optimalsteps.integrations import comfyui as oc
from optimalsteps.optimize.options import Storage
from optimalsteps.optimize.search import search

CATEGORY = "sampling/custom_sampling/schedulers"
SCHEDULE_FOLDER = "optimalsteps"  # inside ComfyUI's output folder
NO_SCHEDULES = "(no saved schedules)"
TARGET_CHUNK = 32  # grid points per block of the DP's temporaries: bounds memory on large latents
log = logging.getLogger("optimalsteps")


def schedule_dir() -> Path:
    import folder_paths

    return Path(folder_paths.get_output_directory()) / SCHEDULE_FOLDER


def saved_schedules() -> list[str]:
    root = schedule_dir()
    if not root.is_dir():
        return []
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*.json"))


def _node_error(node: str, exc: Exception) -> ValueError:
    """ComfyUI shows a node's exception message to the user: one line naming the node."""
    return ValueError(f"{node}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}")


def _interrupt_check() -> None:
    import comfy.model_management

    comfy.model_management.throw_exception_if_processing_interrupted()


def _empty_latent(model, latent_image: dict, samples: int) -> torch.Tensor:
    """Zeros of the latent's per-sample shape, with the channels the model expects (as SamplerCustom)."""
    latent = latent_image["samples"]
    try:
        import comfy.sample

        latent = comfy.sample.fix_empty_latent_channels(model, latent)
    except (ImportError, AttributeError):
        pass
    return torch.zeros((samples,) + tuple(latent.shape[1:]), dtype=torch.float32)


class _Progress:
    """The search's callback: ComfyUI's progress bar, the interrupt between layers, a time estimate.

    The first layer evaluates only the start; from the second on every layer evaluates each reachable
    grid state, so the second layer's time times the layers left is the estimate that is logged."""

    def __init__(self, steps: int):
        import comfy.utils

        self.bar = comfy.utils.ProgressBar(steps + 1)
        self.steps = steps
        self.started = time.perf_counter()
        self.last = self.started
        self.teacher_seconds = None
        self.full_layer_seconds = None

    def __call__(self, stage: str, done: int, total: int) -> None:
        now = time.perf_counter()
        if stage == "teacher":
            self.teacher_seconds = now - self.started
            self.bar.update_absolute(1)
        else:
            if done == 2:
                self.full_layer_seconds = now - self.last
                log.info("OptimalSteps: teacher %.1f s, one full layer %.1f s; about %.0f s to go",
                         self.teacher_seconds or 0.0, self.full_layer_seconds,
                         self.full_layer_seconds * (self.steps - 2))
            self.bar.update_absolute(1 + done)
        self.last = now
        _interrupt_check()


class OptimalStepsSearch:
    """Search an optimal schedule for this model, conditioning, resolution, CFG and sampler."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL",),
            "positive": ("CONDITIONING",),
            "negative": ("CONDITIONING",),
            "latent_image": ("LATENT",),
            "cfg": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01}),
            "sampler_name": (list(oc.SAMPLER_SOLVERS),),
            "steps": ("INT", {"default": 8, "min": 1, "max": 100}),
            "teacher_steps": ("INT", {"default": 100, "min": 2, "max": 1000}),
            "search_samples": ("INT", {"default": 4, "min": 1, "max": 256}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF}),
        }, "optional": {
            "filename_prefix": ("STRING", {"default": "schedule"}),
        }}

    RETURN_TYPES = ("SIGMAS", "STRING")
    RETURN_NAMES = ("sigmas", "summary")
    FUNCTION = "search"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Searches an optimal few-step schedule for the model as you run it (patches, LoRAs, shift, "
                   "CFG, resolution) and the chosen sampler; saves it to output/optimalsteps.")

    def search(self, model, positive, negative, latent_image, cfg, sampler_name, steps, teacher_steps,
               search_samples, seed, filename_prefix="schedule"):
        try:
            return run_search(model, positive, negative, latent_image, cfg, sampler_name, steps, teacher_steps,
                              search_samples, seed, filename_prefix)
        except OptimalStepsError as exc:
            raise _node_error("OptimalStepsSearch", exc) from None


@dataclass
class NodeSearch:
    """What one search in ComfyUI produced (the node returns sigmas and summary)."""

    result: Any  # the library's SearchResult
    sigmas: torch.Tensor  # ComfyUI SIGMAS of the searched schedule
    teacher_sigmas: torch.Tensor
    teacher_final: torch.Tensor  # what ComfyUI's sampler path returned: the teacher's end states
    noise: torch.Tensor  # the unit noise given to ComfyUI (before its noise_scaling)
    calls: int  # guided model calls (each a batch of search_samples at one sigma)
    path: Path
    summary: str


def run_search(model, positive, negative, latent_image, cfg, sampler_name, steps, teacher_steps, search_samples,
               seed, filename_prefix="schedule"):
    out = search_schedule(model, positive, negative, latent_image, cfg, sampler_name, steps, teacher_steps,
                          search_samples, seed, filename_prefix)
    return out.sigmas, out.summary


def search_schedule(model, positive, negative, latent_image, cfg, sampler_name, steps, teacher_steps,
                    search_samples, seed, filename_prefix="schedule") -> NodeSearch:
    """Teacher and DP inside ComfyUI's guider call path, from ComfyUI's own first state; saves the schedule."""
    import comfy.samplers

    if steps >= teacher_steps:
        raise OptimalStepsError(f"steps ({steps}) must be fewer than teacher_steps ({teacher_steps})")
    solver = oc.solver_for_sampler(sampler_name)
    model_sampling = model.get_model_object("model_sampling")
    convention = oc.sigma_convention(model_sampling)
    teacher = oc.teacher_grid(convention, teacher_steps, getattr(model_sampling, "percent_to_sigma", None))
    latent = _empty_latent(model, latent_image, search_samples)
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(int(seed)), dtype=torch.float32)
    progress = _Progress(steps)
    found = {}

    def search_in_sampler(model_k, x, sigmas, extra_args=None, callback=None, disable=None):
        # runs where a ComfyUI sampler runs: x is ComfyUI's own first state, model_k its guided model
        denoiser = oc.ComfyDenoiser(model_k, convention, extra_args, dtype=x.dtype, max_batch=search_samples,
                                    before_call=_interrupt_check, spec=type(getattr(model, "model", model)).__name__)
        found["result"] = search(denoiser, oc.search_noise(x, float(sigmas[0])), steps, teacher_grid=teacher,
                                 solver=solver, seed=int(seed), callback=progress,
                                 storage=Storage(distributed=False, target_chunk=TARGET_CHUNK))
        found["calls"] = denoiser.calls
        return found["result"].teacher_samples.to(x.dtype)

    guider = comfy.samplers.CFGGuider(model)
    guider.set_conds(positive, negative)
    guider.set_cfg(cfg)
    teacher_sigmas = teacher.to_sigmas().to(torch.float32)
    teacher_final = guider.sample(noise, latent, comfy.samplers.KSAMPLER(search_in_sampler), teacher_sigmas,
                                  disable_pbar=True, seed=int(seed))
    result = found["result"]
    schedule = result.schedule
    schedule.metadata.update({"start": "comfyui", "comfyui": searched_under(
        model, convention, sampler_name, cfg, latent, steps, teacher_steps, search_samples, seed, progress,
        found["calls"])})
    path = save_schedule(schedule, filename_prefix)
    sigmas = oc.comfy_sigmas(schedule, convention)
    text = summarize(schedule, sigmas, sampler_name, solver, result, found["calls"], path)
    return NodeSearch(result, sigmas, teacher_sigmas, teacher_final, noise, found["calls"], path, text)


def searched_under(model, convention, sampler_name, cfg, latent, steps, teacher_steps, samples, seed, progress,
                   calls) -> dict:
    inner = getattr(model, "model", model)
    return {"model": type(inner).__name__, "model_sampling": convention.prediction, "family": convention.family,
            "shift": convention.shift, "sigma_min": convention.sigma_min, "sigma_max": convention.sigma_max,
            "sampler": sampler_name, "cfg": float(cfg), "latent_shape": list(latent.shape[1:]),
            "width": int(latent.shape[-1]) * 8, "height": int(latent.shape[-2]) * 8, "steps": int(steps),
            "teacher_steps": int(teacher_steps), "search_samples": int(samples), "seed": int(seed),
            "model_calls": int(calls), "teacher_seconds": progress.teacher_seconds,
            "full_layer_seconds": progress.full_layer_seconds}


def save_schedule(schedule: Schedule, prefix: str) -> Path:
    """output/optimalsteps/<prefix>_00001.json, never replacing a file (the counter moves on)."""
    prefix = (prefix or "schedule").strip().replace("\\", "/").strip("/")
    if not prefix or ".." in prefix.split("/"):
        raise OptimalStepsError(f"filename_prefix {prefix!r} must be a relative name inside the output folder")
    root = schedule_dir()
    for counter in range(1, 100000):
        path = root / f"{prefix}_{counter:05d}.json"
        if not path.exists():
            return schedule.save(path)
    raise OptimalStepsError(f"no free file name for prefix {prefix!r} in {root}")


def summarize(schedule, sigmas, sampler_name, solver, result, calls, path) -> str:
    values = " ".join(f"{v:.4g}" for v in sigmas.tolist())
    return (f"{schedule.steps} steps for ComfyUI {sampler_name} (library solver {solver}); teacher "
            f"{result.teacher.steps} steps; mean squared error to the teacher {result.error:.4g}; {calls} model calls "
            f"in {result.seconds:.1f} s; saved {path.name}\nsigmas: {values}")


class OptimalStepsLoadSchedule:
    """A saved schedule as SIGMAS for this model, optionally at another step count and denoise."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL",),
            "schedule": (saved_schedules() or [NO_SCHEDULES],),
            "steps": ("INT", {"default": 0, "min": 0, "max": 1000,
                              "tooltip": "0 keeps the saved step count; otherwise log-linear interpolation"}),
            "denoise": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01}),
        }}

    RETURN_TYPES = ("SIGMAS", "STRING")
    RETURN_NAMES = ("sigmas", "summary")
    FUNCTION = "load"
    CATEGORY = CATEGORY

    @classmethod
    def IS_CHANGED(cls, model, schedule, steps, denoise):
        path = schedule_dir() / schedule
        return os.path.getmtime(path) if path.is_file() else float("nan")

    def load(self, model, schedule, steps=0, denoise=1.0):
        try:
            return load_sigmas(model, schedule, steps, denoise)
        except OptimalStepsError as exc:
            raise _node_error("OptimalStepsLoadSchedule", exc) from None


def read_schedule(name: str) -> Schedule:
    root = schedule_dir()
    path = (root / name).resolve()
    if name == NO_SCHEDULES or root.resolve() not in path.parents:
        raise OptimalStepsError(f"no saved schedule {name!r} in {root}")
    return Schedule.load(path)


def load_sigmas(model, name, steps=0, denoise=1.0):
    schedule = read_schedule(name)
    convention = oc.sigma_convention(model.get_model_object("model_sampling"))
    try:
        sigmas = oc.loader_sigmas(schedule, convention, steps, denoise)
    except OptimalStepsError as exc:
        raise OptimalStepsError(f"{name}: {exc}") from None
    under = schedule.metadata.get("comfyui", {})
    notes = [oc.start_note(schedule, convention)]
    if under.get("shift") is not None and convention.shift is not None and under["shift"] != convention.shift:
        notes.append(f"searched at shift {under['shift']:g}, the model now has shift {convention.shift:g}")
    values = " ".join(f"{v:.4g}" for v in sigmas.tolist())
    text = (f"{name}: {len(sigmas) - 1} steps for {schedule.solver or 'any'} solver"
            f" ({under.get('sampler', 'library search')}); " + "; ".join(notes) + f"\nsigmas: {values}")
    return sigmas, text


def register_schedulers() -> list[str]:
    """Saved schedules as extra KSampler scheduler names ("optimalsteps/<file>"), for plain KSampler users.

    Called at load time when OPTIMALSTEPS_KSAMPLER_SCHEDULERS=1; a schedule that does not fit the model
    it is used with raises ComfyUI's usual scheduler error with one line."""
    import comfy.samplers as samplers

    added = []
    for name in saved_schedules():
        key = f"optimalsteps/{name[:-5]}"
        if key in samplers.SCHEDULER_HANDLERS:
            continue

        def handler(model_sampling, steps, _name=name):
            try:
                convention = oc.sigma_convention(model_sampling)
                return oc.loader_sigmas(read_schedule(_name), convention, steps)
            except OptimalStepsError as exc:
                raise _node_error(f"scheduler optimalsteps/{_name}", exc) from None

        samplers.SCHEDULER_HANDLERS[key] = samplers.SchedulerHandler(handler, use_ms=True)
        if key not in samplers.SCHEDULER_NAMES:
            samplers.SCHEDULER_NAMES.append(key)
        added.append(key)
    return added


NODE_CLASS_MAPPINGS = {"OptimalStepsSearch": OptimalStepsSearch, "OptimalStepsLoadSchedule": OptimalStepsLoadSchedule}
NODE_DISPLAY_NAME_MAPPINGS = {"OptimalStepsSearch": "Optimal Steps Search",
                              "OptimalStepsLoadSchedule": "Optimal Steps Load Schedule"}
