"""Compare schedules on a diffusers pipeline as users judge them: in image space.

Every schedule runs with `sample_pipeline` on the same initial latents as a many-step teacher; the latents
are decoded with the pipeline's own VAE (as its `__call__` decodes them) and compared with the teacher's
images: PSNR per image, a grid of decoded samples (teacher row first), and, where the optional metric
packages and their weights are available, LPIPS to the teacher, CLIP score to the prompt and FID against
the teacher's images. Metrics are plain callables (`ImageMetrics`), so any stand-in or user model works.

An edge module like the integration it uses: diffusers and the metric packages are imported only inside
the functions that need them.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import torch

from ..core.errors import OptimalStepsError
from ..core.io import check_writable, write_bytes, write_text
from ..core.schedules import Schedule
from ..core.solvers import get_solver, nfe_per_trajectory
from ..evaluation.metrics import frechet_distance, mse, psnr
from .diffusers import pipeline_inputs, sample_pipeline
from .diffusers.experts import onto_boundary

IMAGE_RANGE = 2.0  # decoded images live in [-1, 1]


@dataclass
class ImageMetrics:
    """Optional image metrics, each a callable on images [N, 3, H, W] in [-1, 1] (None: not computed).

    - `lpips(images, reference)` -> [N] perceptual distances to the reference images
    - `clip(images, prompts)` -> [N] CLIP scores of each image to its prompt text
    - `features(images)` -> [N, F] features whose Frechet distance between two image sets is the FID
    `skipped` says, one entry per metric, why one is missing."""

    lpips: Optional[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = None
    clip: Optional[Callable[[torch.Tensor, Sequence[str]], torch.Tensor]] = None
    features: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
    skipped: dict[str, str] = field(default_factory=dict)


def skipped_line(skipped: Mapping[str, str]) -> Optional[str]:
    """One line naming the metrics not computed and why (None when all are)."""
    if not skipped:
        return None
    return "skipped metrics: " + "; ".join(f"{name} ({why})" for name, why in skipped.items())


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def _unit_uint8(images: torch.Tensor) -> torch.Tensor:
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def _torchmetrics_lpips(device: torch.device):
    from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

    metric = LearnedPerceptualImagePatchSimilarity(net_type="alex", reduction="mean").to(device)

    def lpips(images: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        # per image: the metric reduces over its batch, so feed one pair at a time
        return torch.stack([metric(a[None].clamp(-1, 1).to(device), b[None].clamp(-1, 1).to(device)).detach().cpu()
                            for a, b in zip(images.float(), reference.float())])
    return lpips


def _torchmetrics_clip(device: torch.device, model_name: str):
    from torchmetrics.multimodal.clip_score import CLIPScore

    metric = CLIPScore(model_name_or_path=model_name).to(device)  # loads the weights now, or fails here

    def clip(images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        return torch.stack([metric(_unit_uint8(img)[None].to(device), [text]).detach().cpu()
                            for img, text in zip(images, prompts)])
    return clip


def _torchmetrics_inception(device: torch.device):
    from torchmetrics.image.fid import FrechetInceptionDistance

    net = FrechetInceptionDistance(feature=2048).inception.to(device)  # torch-fidelity's FID Inception

    def features(images: torch.Tensor) -> torch.Tensor:
        return net(_unit_uint8(images).to(device)).reshape(images.shape[0], -1).detach().cpu()
    return features


def _cleanfid_inception(device: torch.device):
    import numpy as np
    from cleanfid.features import build_feature_extractor
    from cleanfid.resize import make_resizer

    net = build_feature_extractor("clean", device, use_dataparallel=False)
    resize = make_resizer("PIL", False, "bicubic", (299, 299))  # clean-fid's own resizing of uint8 images

    def features(images: torch.Tensor) -> torch.Tensor:
        batch = np.stack([resize(img.permute(1, 2, 0).numpy()) for img in _unit_uint8(images).cpu()])
        x = torch.from_numpy(batch).permute(0, 3, 1, 2).float().to(device)
        return net(x).reshape(images.shape[0], -1).detach().cpu()
    return features


def _inception_features(device: torch.device):
    """FID features: torchmetrics' Inception (torch-fidelity weights), else clean-fid's extractor."""
    try:
        return _torchmetrics_inception(device)
    except ImportError as first:
        try:
            return _cleanfid_inception(device)
        except ImportError:
            why = ("torchmetrics or clean-fid" if first.name == "torchmetrics"
                   else f"clean-fid, and torchmetrics' FID says {_first_line(first)}")
            raise ImportError(why, name=why) from None


def default_image_metrics(device: torch.device | str = "cpu",
                          clip_model: str = "openai/clip-vit-base-patch16") -> ImageMetrics:
    """The optional metrics that are installed and whose weights can be loaded (from the local cache when
    offline); each one that cannot is named in `skipped` with the reason."""
    device = torch.device(device)
    out = ImageMetrics()
    builders = {"lpips": lambda: _torchmetrics_lpips(device), "clip": lambda: _torchmetrics_clip(device, clip_model),
                "fid": lambda: _inception_features(device)}
    for name, build in builders.items():
        try:
            setattr(out, "features" if name == "fid" else name, build())
        except ImportError as exc:
            out.skipped[name] = f"not installed: {exc.name or _first_line(exc)}"
        except Exception as exc:  # weights missing offline, a download refused, ...: the metric is optional
            out.skipped[name] = f"weights unavailable: {_first_line(exc)}"
    return out


# ------------------------------------------------------------------------------------------ decoding


def decode_latents(pipe: Any, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Images [B, 3, H, W] (videos [B, 3, F, H, W]) in [-1, 1] from the final latents as the pipeline returns
    them with output_type="latent" (packed sequences unpacked), decoded by its VAE as its __call__ does."""
    vae = getattr(pipe, "vae", None)
    if vae is None:
        raise OptimalStepsError(f"{type(pipe).__name__} has no VAE to decode with (pipe.vae is None)")
    if latents.dim() == 3:  # packed [B, sequence, channels]: the pipeline's own unpacking
        unpack = getattr(pipe, "_unpack_latents", None)
        if unpack is None:
            raise OptimalStepsError(f"{type(pipe).__name__} returned packed latents but has no _unpack_latents")
        latents = unpack(latents, height, width, pipe.vae_scale_factor)
    config = vae.config
    scaling = config.get("scaling_factor") or 1.0
    mean, std = config.get("latents_mean"), config.get("latents_std")
    if mean is not None and std is not None:  # SDXL / Wan / QwenImage style per-channel statistics
        shape = (1, -1) + (1,) * (latents.dim() - 2)
        mean = torch.tensor(mean, dtype=latents.dtype, device=latents.device).reshape(shape)
        std = torch.tensor(std, dtype=latents.dtype, device=latents.device).reshape(shape)
        latents = latents * std / scaling + mean
    else:  # SD / DiT: divide by the scaling factor; SD3 / Flux also add the shift factor
        latents = latents / scaling + (config.get("shift_factor") or 0.0)
    with torch.no_grad():
        images = vae.decode(latents.to(vae.dtype), return_dict=False)[0]
    if images.dim() == 5 and images.shape[2] == 1:  # a one-frame "video" VAE (QwenImage): an image
        images = images[:, :, 0]
    return images.float().clamp(-1, 1).cpu()


def _stills(images: torch.Tensor) -> torch.Tensor:
    """The images the perceptual metrics and the grid see: videos by their first frame."""
    return images[:, :, 0] if images.dim() == 5 else images


def image_grid(rows: Sequence[torch.Tensor], columns: int = 8) -> torch.Tensor:
    """One uint8 image [3, R*H, C*W] with a row per image set (each [N, 3, H, W] in [-1, 1])."""
    picked = [_unit_uint8(_stills(r)[:columns]) for r in rows]
    count = min(r.shape[0] for r in picked)
    return torch.cat([torch.cat(list(r[:count]), dim=2) for r in picked], dim=1)


# ------------------------------------------------------------------------------------------ comparison


@dataclass
class PipelineComparison:
    rows: list[dict[str, Any]]  # per schedule: name, solver, steps, nfe, latent_mse, psnr, lpips, clip, fid
    teacher: dict[str, Any]  # the teacher's steps, solver, and its CLIP score
    grid: torch.Tensor  # uint8 [3, H', W']: teacher row first, then one row per schedule
    grid_rows: list[str]
    skipped: Optional[str]  # one line: which metrics were skipped and why


def _prompt_texts(prompts: Any, batch: int) -> Optional[list[str]]:
    """Each sample's prompt text (prompts repeated per image, in the pipeline's order), None without text."""
    if isinstance(prompts, str):
        prompts = [prompts]
    if not isinstance(prompts, (list, tuple)) or not prompts or not all(isinstance(p, str) for p in prompts):
        return None
    per = batch // len(prompts)
    return [p for p in prompts for _ in range(per)]


def _scores(metrics: ImageMetrics, images: torch.Tensor, teacher: torch.Tensor, texts: Optional[list[str]],
            teacher_features: Optional[torch.Tensor]) -> dict[str, Optional[float]]:
    stills, reference = _stills(images), _stills(teacher)
    out: dict[str, Optional[float]] = {"lpips": None, "clip": None, "fid": None}
    if metrics.lpips is not None:
        out["lpips"] = float(torch.as_tensor(metrics.lpips(stills, reference)).double().mean())
    if metrics.clip is not None and texts is not None:
        out["clip"] = float(torch.as_tensor(metrics.clip(stills, texts)).double().mean())
    if teacher_features is not None:
        out["fid"] = frechet_distance(metrics.features(stills), teacher_features)
    return out


def compare_pipeline(pipe: Any, prompts: Any, schedules: Mapping[str, Schedule], teacher_steps: int = 200,
                     teacher_solver: str = "euler", guidance_scale: Optional[float] = None,
                     height: Optional[int] = None, width: Optional[int] = None, seed: int = 0,
                     metrics: Optional[ImageMetrics] = None, grid_columns: int = 8,
                     **sample_options: Any) -> PipelineComparison:
    """Run each schedule (with its own solver, `schedule.solver`, else euler) and a `teacher_steps` teacher on
    the initial latents the pipeline draws from `seed`, decode all with the pipeline's VAE, and score the
    images against the teacher's. `metrics` defaults to `default_image_metrics()`; FID needs at least two
    images. Other options go to `sample_pipeline` (negative_prompt, images_per_prompt, ...).
    On a two-expert pipeline (Wan 2.2) every schedule runs with a step exactly on the experts' boundary: one
    without is put onto it (`onto_boundary`: its point nearest the boundary moved there), and each row says
    which point moved (`boundary_moved`, None when none did); the teacher runs as the pipeline runs it."""
    if not schedules:
        raise OptimalStepsError("compare_pipeline needs at least one schedule")
    get_solver(teacher_solver)
    metrics = metrics if metrics is not None else default_image_metrics()
    # the call options (image=, strength=, ...) make the model and its teacher the call's, as in sample_pipeline
    inputs = pipeline_inputs(pipe, prompts, guidance_scale, height, width,
                             **{k: v for k, v in sample_options.items() if k != "progress"})
    h, w = inputs.height, inputs.width

    def run(schedule: Schedule, solver: str) -> tuple[torch.Tensor, torch.Tensor]:
        latents = sample_pipeline(pipe, prompts, schedule, guidance_scale, h, w,
                                  generator=torch.Generator().manual_seed(int(seed)), solver=solver, **sample_options)
        return latents, decode_latents(pipe, latents, h, w)

    teacher = inputs.model.teacher_grid(teacher_steps)
    teacher_latents, teacher_images = run(teacher, teacher_solver)
    texts = _prompt_texts(prompts, teacher_images.shape[0])
    skipped = dict(metrics.skipped)
    if metrics.clip is not None and texts is None:
        skipped["clip"] = "the prompts are not text"
    teacher_features = None
    if metrics.features is not None:
        if teacher_images.shape[0] < 2:
            skipped["fid"] = "needs at least two images"
        else:
            teacher_features = metrics.features(_stills(teacher_images))
    teacher_row = {"steps": teacher.steps, "solver": teacher_solver,
                   "nfe": nfe_per_trajectory(teacher_solver, teacher.steps),
                   "clip": _scores(metrics, teacher_images, teacher_images, texts, None)["clip"]}
    rows, grid_rows, grid_sets = [], ["teacher"], [teacher_images]
    split = getattr(inputs.model, "expert_split", None)
    for name, schedule in schedules.items():
        solver = schedule.solver or "euler"
        experts = {}
        if split is not None:
            schedule = onto_boundary(schedule, split.boundary)
            experts = {"boundary_moved": schedule.metadata.get("boundary_moved")}
        latents, images = run(schedule, solver)
        rows.append({"schedule": name, "solver": solver, "steps": schedule.steps,
                     "nfe": nfe_per_trajectory(solver, schedule.steps),
                     "latent_mse": mse(latents, teacher_latents), "psnr": psnr(images, teacher_images, IMAGE_RANGE),
                     **_scores(metrics, images, teacher_images, texts, teacher_features), **experts})
        grid_rows.append(name)
        grid_sets.append(images)
    return PipelineComparison(rows, teacher_row, image_grid(grid_sets, grid_columns), grid_rows,
                              skipped_line(skipped))


def _fmt(value: Any) -> str:
    if value is None:
        return "–"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def comparison_markdown(result: PipelineComparison) -> str:
    keys = ("schedule", "solver", "steps", "nfe", "psnr", "lpips", "clip", "fid", "latent_mse")
    head = ("| schedule | solver | steps | NFE | PSNR dB (to teacher) | LPIPS (to teacher) | CLIP score | "
            "FID (to teacher) | latent MSE |")
    lines = [head, "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    lines += ["| " + " | ".join(_fmt(row[k]) for k in keys) + " |" for row in result.rows]
    teacher = result.teacher
    lines += ["", f"Teacher: {teacher['steps']} steps of {teacher['solver']} (NFE {teacher['nfe']}); "
              f"its CLIP score {_fmt(teacher['clip'])}. Grid rows: {', '.join(result.grid_rows)}."]
    moved = [f"{row['schedule']} (step {row['boundary_moved']['step']}: {row['boundary_moved']['from']:.4g})"
             for row in result.rows if row.get("boundary_moved")]
    if moved:
        lines += ["", "Two experts: each schedule runs with a step on their boundary; moved onto it: "
                  + ", ".join(moved) + "."]
    if result.skipped:
        lines += ["", result.skipped]
    return "\n".join(lines) + "\n"


def write_comparison(result: PipelineComparison, out_dir: str | Path, overwrite: bool = False) -> list[Path]:
    """results.json, results.md and grid.png in `out_dir` (existing files only with `overwrite`)."""
    from PIL import Image

    out = Path(out_dir)
    paths = [out / "results.json", out / "results.md", out / "grid.png"]
    for path in paths:
        check_writable(path, overwrite)
    out.mkdir(parents=True, exist_ok=True)
    payload = {"rows": result.rows, "teacher": result.teacher, "grid_rows": result.grid_rows,
               "skipped": result.skipped}
    write_text(paths[0], json.dumps(payload, indent=2) + "\n", overwrite)
    write_text(paths[1], comparison_markdown(result), overwrite)
    buffer = io.BytesIO()
    Image.fromarray(result.grid.permute(1, 2, 0).numpy()).save(buffer, format="PNG")
    write_bytes(paths[2], buffer.getvalue(), overwrite)
    return paths
