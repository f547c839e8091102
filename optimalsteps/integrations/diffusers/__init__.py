"""diffusers integration: search a schedule with a pipeline's own network, prompts, guidance and initial
latents, then run it through the pipeline (`pipeline_kwargs`) or with the project's sampler
(`sample_pipeline`).

Each supported pipeline family (`families/`, listed in `registry.py`) wraps its network into the model
contract the way its `__call__` drives it, so that the project's Euler on a schedule reproduces the
pipeline's Euler scheduler on the same schedule:

- flow matching (Flux, SD3, Wan, QwenImage, Flux 2, Chroma): process "flow", time = the scheduler's sigma,
  prediction "velocity" (the network output is d x / d sigma = eps - x0, what the flow scheduler steps with);
- discrete DDPM models (SD, SDXL, DiT): process "ve" with the scheduler's own largest sigma, state
  x = latent / alpha, network input x / sqrt(sigma^2 + 1) at the fractional timestep of sigma (log-sigma
  interpolation on the scheduler's table), prediction eps (x0 for v- and sample-prediction configs).

An edge module: the core never imports it, and `diffusers` is imported only where a function needs it.
"""

from .experts import ExpertSchedule, expert_schedules, onto_boundary  # noqa: F401
from .common import CallOptions, Guidance, PipelineInputs, PipelineModel, SettingsWarning  # noqa: F401
from .family import Family  # noqa: F401
from .loading import load_diffusers_model, load_pipeline, parse_spec  # noqa: F401
from .registry import FAMILIES, family_of, pipeline_family  # noqa: F401
from .run import draw_latents, pipeline_inputs, sample_pipeline, sampler_noise, search_pipeline  # noqa: F401
from .schedules import (flow_shift, pipeline_kwargs, pipeline_process, pipeline_schedule,  # noqa: F401
                        pipeline_teacher, scheduler_solver)
from .tables import SigmaTable  # noqa: F401

__all__ = ["search_pipeline", "sample_pipeline", "pipeline_kwargs", "pipeline_schedule", "pipeline_teacher",
           "pipeline_family", "load_pipeline", "load_diffusers_model", "SettingsWarning", "pipeline_inputs",
           "draw_latents", "sampler_noise", "flow_shift", "pipeline_process", "scheduler_solver", "CallOptions",
           "ExpertSchedule", "expert_schedules", "onto_boundary"]
