"""compare on a diffusers pipeline in image space, on tiny randomly initialised pipelines built in code
(offline) with their tiny VAEs and stand-in metrics."""

from __future__ import annotations

import builtins
import os

import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"
diffusers = pytest.importorskip("diffusers")

from optimalsteps.core.errors import OptimalStepsError  # noqa: E402
from optimalsteps.core.schedules import Schedule  # noqa: E402
from optimalsteps.integrations import diffusers as od  # noqa: E402
from optimalsteps.integrations.diffusers_compare import (ImageMetrics, _scores, compare_pipeline,  # noqa: E402
                                                         decode_latents, default_image_metrics, write_comparison)

from diffusers_helpers import flux_embeds, gen, one_thread, tiny_dit, tiny_flux, tiny_vae  # noqa: E402, F401

EPS32 = torch.finfo(torch.float32).eps


def vae(shift_factor=None):
    return tiny_vae(scaling_factor=0.7, shift_factor=shift_factor)


def dit_pipe():
    return tiny_dit(vae(), {207: "golden retriever", 281: "tabby cat", 1: "goldfish"})


def flux_pipe(with_vae: bool = True):
    return tiny_flux(vae(shift_factor=0.1) if with_vae else None)


def pooled_features(images: torch.Tensor) -> torch.Tensor:
    """A stand-in feature extractor: per-channel means and spreads."""
    return torch.cat([images.mean((2, 3)), images.std((2, 3))], dim=1)


def stand_in_metrics(calls: list) -> ImageMetrics:
    def lpips(images, reference):
        calls.append("lpips")
        return (images - reference).abs().mean((1, 2, 3))

    def clip(images, prompts):
        calls.append(("clip", list(prompts)))
        return images.mean((1, 2, 3)) + torch.tensor([len(p) for p in prompts], dtype=torch.float32)

    return ImageMetrics(lpips=lpips, clip=clip, features=pooled_features)


# ------------------------------------------------------------------------------------------ decoding


def test_decode_is_the_pipelines_own_decoding_flux_packed_with_shift():
    pipe = flux_pipe()
    embeds = flux_embeds(2)
    schedule = Schedule([1.0, 0.6, 0.3, 0.0], "flow", solver="euler")
    call = dict(guidance_scale=3.5, height=16, width=16)
    latents = od.sample_pipeline(pipe, embeds, schedule, generator=gen(3), **call)
    assert latents.dim() == 3  # packed, as FluxPipeline returns latents
    ours = decode_latents(pipe, latents, 16, 16)
    kwargs = od.pipeline_kwargs(schedule, pipe, height=16, width=16)  # mu depends on the resolution
    theirs = pipe(**embeds, **kwargs, generator=gen(3), output_type="pt", **call).images
    assert ours.shape == theirs.shape == (2, 3, 16, 16)
    # the pipeline post-processes to [0, 1]; same latents, same decoding
    assert torch.allclose((ours + 1) / 2, theirs.float(), atol=64 * EPS32)


def test_decode_dit_and_refuses_without_vae():
    pipe = dit_pipe()
    schedule = od.pipeline_schedule(pipe, 4)
    labels = ["golden retriever", "tabby cat"]
    ours = decode_latents(pipe, od.sample_pipeline(pipe, labels, schedule, guidance_scale=4.0, generator=gen(8)),
                          16, 16)
    theirs = pipe(class_labels=[207, 281], guidance_scale=4.0, num_inference_steps=4, generator=gen(8),
                  output_type="np").images
    assert torch.allclose((ours + 1) / 2, torch.from_numpy(theirs).permute(0, 3, 1, 2).float(), atol=64 * EPS32)
    with pytest.raises(OptimalStepsError, match="FluxPipeline has no VAE to decode with"):
        decode_latents(flux_pipe(with_vae=False), torch.zeros(1, 16, 16), 16, 16)


# ------------------------------------------------------------------------------------------ compare


def test_compare_on_dit_scores_images_against_the_teacher(tmp_path):
    pipe = dit_pipe()
    labels = ["golden retriever", "tabby cat", "goldfish"]
    teacher = od.pipeline_teacher(pipe, 20)
    coarse = od.pipeline_schedule(pipe, 2)
    finer = od.pipeline_schedule(pipe, 8)
    calls = []
    result = compare_pipeline(pipe, labels, {"teacher-grid": teacher, "ddim-2": coarse, "ddim-8": finer},
                              teacher_steps=20, guidance_scale=4.0, seed=5, metrics=stand_in_metrics(calls))
    rows = {r["schedule"]: r for r in result.rows}
    # the teacher's own grid reproduces its images: identical (PSNR at its 300 dB cap), zero distances
    assert rows["teacher-grid"]["psnr"] == pytest.approx(300.0) and rows["teacher-grid"]["lpips"] == 0
    assert abs(rows["teacher-grid"]["fid"]) < 1e-6
    # more steps, closer to the teacher in image space
    assert rows["ddim-8"]["psnr"] > rows["ddim-2"]["psnr"] > 0
    assert rows["ddim-2"]["lpips"] > rows["ddim-8"]["lpips"] > 0 and rows["ddim-2"]["fid"] > 0
    assert rows["ddim-2"]["latent_mse"] > rows["ddim-8"]["latent_mse"] > 0
    # the CLIP stand-in sees each image's prompt text
    assert ("clip", labels) in calls and result.teacher["clip"] is not None and result.skipped is None
    assert result.teacher["steps"] == 20 and rows["ddim-2"]["nfe"] == 2
    # grid: teacher row first, then one row per schedule, one column per sample
    assert result.grid_rows == ["teacher", "teacher-grid", "ddim-2", "ddim-8"]
    assert result.grid.dtype == torch.uint8 and result.grid.shape == (3, 4 * 16, 3 * 16)
    assert torch.equal(result.grid[:, :16], result.grid[:, 16:32])  # the teacher-grid row is the teacher's
    paths = write_comparison(result, tmp_path)
    assert [p.name for p in paths] == ["results.json", "results.md", "grid.png"]
    assert "| ddim-2 | euler | 2 | 2 |" in paths[1].read_text()
    with pytest.raises(OptimalStepsError):
        write_comparison(result, tmp_path)


def test_compare_on_flux_embeddings_skips_clip_and_names_missing_packages(monkeypatch):
    pipe = flux_pipe()
    real_import = builtins.__import__

    def no_metric_packages(name, *args, **kwargs):
        if name.split(".")[0] in ("torchmetrics", "cleanfid"):
            raise ImportError(f"No module named {name!r}", name=name.split(".")[0])
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_metric_packages)
    missing = default_image_metrics()
    assert missing.lpips is missing.clip is missing.features is None
    schedule = Schedule([1.0, 0.5, 0.0], "flow", solver="euler")
    result = compare_pipeline(pipe, flux_embeds(2), {"two": schedule}, teacher_steps=6, guidance_scale=3.5,
                              height=16, width=16, metrics=missing)
    line = result.skipped
    assert "\n" not in line and line.startswith("skipped metrics: ")
    assert "lpips (not installed: torchmetrics)" in line and "clip (not installed" in line and "fid (" in line
    row = result.rows[0]
    assert row["lpips"] is row["clip"] is row["fid"] is None and 0 < row["psnr"] < 300
    # with stand-ins, embeddings still have no prompt text to score CLIP against
    calls = []
    result = compare_pipeline(pipe, flux_embeds(2), {"two": schedule}, teacher_steps=6, guidance_scale=3.5,
                              height=16, width=16, metrics=stand_in_metrics(calls))
    assert result.skipped == "skipped metrics: clip (the prompts are not text)"
    assert result.rows[0]["fid"] is not None and not any(isinstance(c, tuple) for c in calls)


def test_scores_and_bad_input():
    images = torch.rand(3, 3, 8, 8) * 2 - 1
    calls = []
    scores = _scores(stand_in_metrics(calls), images, images, ["a", "bb", "ccc"], pooled_features(images))
    assert scores["lpips"] == 0 and abs(scores["fid"]) < 1e-6
    assert scores["clip"] == pytest.approx(float(images.mean((1, 2, 3)).mean()) + 2.0, abs=16 * EPS32)
    with pytest.raises(OptimalStepsError, match="at least one schedule"):
        compare_pipeline(dit_pipe(), ["goldfish"], {})
