"""Loading a pipeline for the CLI: `diffusers:PATH_OR_ID[,dtype=...][,device=...]`, with the family (and,
for a local folder, the resolution) checked from its configs before any weights load."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Optional

import torch

from ...core.errors import OptimalStepsError
from .common import Prompts, require_diffusers
from .registry import family_from_index
from .run import draw_latents, pipeline_inputs, sampler_noise
from .settings import check_size


def parse_spec(spec: str) -> tuple[str, dict[str, str]]:
    """`PATH_OR_ID[,dtype=bfloat16][,device=cuda]` -> (path or id, options)."""
    ident, _, rest = spec.partition(",")
    if not ident:
        raise OptimalStepsError("diffusers model spec needs a path or hub id: diffusers:PATH_OR_ID")
    options = {}
    for part in filter(None, rest.split(",")):
        key, sep, value = part.partition("=")
        if not sep or key.strip() not in ("dtype", "device"):
            raise OptimalStepsError(f"diffusers option {part!r} is not dtype=... or device=...")
        options[key.strip()] = value.strip()
    return ident, options


def _first_line(exc: Exception) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise OptimalStepsError(f"{path} is not readable JSON: {exc}") from None


def _pipeline_index(ident: str) -> dict:
    """The model_index.json a local folder or hub id declares, read before any weights."""
    index = Path(ident) / "model_index.json"
    if index.is_file():
        return _read_json(index)
    if Path(ident).exists():
        raise OptimalStepsError(f"{ident} is not a diffusers pipeline folder (no model_index.json)")
    diffusers = require_diffusers()
    try:
        return dict(diffusers.DiffusionPipeline.load_config(ident))
    except Exception as exc:  # hub / offline errors: report in one line
        raise OptimalStepsError(f"could not read the diffusers pipeline {ident!r}: {_first_line(exc)}") from None


def _precheck_size(ident: str, index: dict, height: Optional[int], width: Optional[int]) -> None:
    """Refuse a resolution from a local folder's component configs, before gigabytes of weights load."""
    family = family_from_index(index)
    folder = Path(ident)
    net_file = folder / family.denoiser / "config.json"
    if not net_file.is_file() or height is None or width is None:
        return  # checked once the pipeline is loaded, where its defaults are known
    vae_file = folder / "vae" / "config.json"
    blocks = _read_json(vae_file).get("block_out_channels") if vae_file.is_file() else None
    vae_scale_factor = 2 ** (len(blocks) - 1) if blocks else 8  # the pipelines' own rule, 8 without a VAE
    check_size(str(index.get("_class_name")), family.size_rules(vae_scale_factor, _read_json(net_file)), height, width)


def load_pipeline(spec: str, height: Optional[int] = None, width: Optional[int] = None) -> Any:
    """A supported pipeline from `PATH_OR_ID[,dtype=...][,device=...]`. The family (and, for a local folder,
    the resolution) is checked before any weights load."""
    diffusers = require_diffusers()
    ident, options = parse_spec(spec)
    index = _pipeline_index(ident)
    family_from_index(index)
    if Path(ident).is_dir():
        _precheck_size(ident, index, height, width)
    dtype = None
    if "dtype" in options:
        dtype = getattr(torch, options["dtype"], None)
        if not isinstance(dtype, torch.dtype):
            raise OptimalStepsError(f"unknown dtype {options['dtype']!r}")
    try:
        pipe = diffusers.DiffusionPipeline.from_pretrained(ident, torch_dtype=dtype)
        if "device" in options:
            pipe = pipe.to(options["device"])
    except Exception as exc:  # a broken or unreachable checkpoint: one line, no traceback
        raise OptimalStepsError(f"could not load diffusers pipeline {ident!r}: {_first_line(exc)}") from None
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_diffusers_model(spec: str, prompts: Prompts, guidance: Optional[float] = None, height: Optional[int] = None,
                         width: Optional[int] = None, seed: int = 0, samples: Optional[int] = None, *,
                         negative_prompt: Optional[str] = None, num_frames: Optional[int] = None,
                         teacher_steps: Optional[int] = None, **call_options: Any
                         ) -> tuple[Any, torch.Tensor, dict, dict]:
    """(model, noise, cond, metadata) for the CLI's search / compare with --model diffusers:SPEC: each prompt
    gets ceil(samples / prompts) initial latents, drawn as the pipeline draws them from `seed`. The model's
    `teacher_grid(teacher_steps)` is the pipeline's default teacher grid."""
    pipe = load_pipeline(spec, height, width)
    return pipeline_model(pipe, spec, prompts, guidance, height, width, seed, samples, negative_prompt=negative_prompt,
                          num_frames=num_frames, teacher_steps=teacher_steps, **call_options)


def pipeline_model(pipe: Any, spec: str, prompts: Prompts, guidance: Optional[float] = None,
                   height: Optional[int] = None, width: Optional[int] = None, seed: int = 0,
                   samples: Optional[int] = None, *, negative_prompt: Optional[str] = None,
                   num_frames: Optional[int] = None, teacher_steps: Optional[int] = None,
                   **call_options: Any) -> tuple[Any, torch.Tensor, dict, dict]:
    """`load_diffusers_model` on a loaded pipeline; `call_options` as `pipe(...)` takes them (image=, strength=,
    ...). With `teacher_steps`, the latents are drawn at the start of that teacher grid (img2img: the image
    noised to where its strength starts), where the search and compare start."""
    texts = [prompts] if isinstance(prompts, str) else list(prompts or [])
    if not texts:
        raise OptimalStepsError("a diffusers model needs at least one --prompt (or --prompts-file)")
    per_prompt = max(1, math.ceil((samples or len(texts)) / len(texts)))
    inputs = pipeline_inputs(pipe, texts, guidance, height, width, negative_prompt=negative_prompt,
                             images_per_prompt=per_prompt, num_frames=num_frames, **call_options)
    model = inputs.model
    model.spec = f"diffusers:{parse_spec(spec)[0]}"
    if teacher_steps is not None:
        model.teacher_grid(teacher_steps)  # sets the process start to the teacher's
    start = float(model.process.t_start)
    generator = torch.Generator(device="cpu").manual_seed(int(seed))
    noise = sampler_noise(pipe, draw_latents(pipe, inputs, generator, start), model.process, start)
    return model, noise, inputs.cond, {"diffusers": {**inputs.metadata, "seed": int(seed)}}
