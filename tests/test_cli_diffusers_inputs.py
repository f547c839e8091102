"""The CLI on diffusers pipelines: Wan 2.2's search places the boundary step (every solver), `sample` runs a
schedule on a pipeline, and --image / --strength / --mask reach the pipeline call as the Python API takes them.
Tiny pipelines built in code stand in for a saved one (`load_pipeline` returns them) with a stand-in text
encoder: each prompt's embeddings are drawn from a seed its letters give."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"
diffusers = pytest.importorskip("diffusers")
PIL = pytest.importorskip("PIL.Image")

from optimalsteps.cli.main import main  # noqa: E402
from optimalsteps.core.schedules import Schedule  # noqa: E402
from optimalsteps.integrations import diffusers as od  # noqa: E402
from optimalsteps.integrations import diffusers_compare  # noqa: E402
from optimalsteps.integrations.diffusers import loading, tiny  # noqa: E402

from diffusers_helpers import gen, one_thread, rel_err  # noqa: E402, F401

TOL = torch.finfo(torch.float32).eps * 8


def text_embeds(texts, count: int, shape: tuple[int, ...]) -> torch.Tensor:
    rows = [torch.randn(*shape, generator=gen(sum(map(ord, t)))) for t in texts]
    return torch.stack(rows).repeat_interleave(count, dim=0)


def with_wan_text(pipe):
    """Wan's encode_prompt, stood in: 8 tokens of width 16 per prompt; the negative prompt likewise."""
    def encode_prompt(prompt, negative_prompt=None, do_classifier_free_guidance=True, num_videos_per_prompt=1,
                      prompt_embeds=None, negative_prompt_embeds=None, max_sequence_length=None, device=None):
        embeds = text_embeds(prompt, num_videos_per_prompt, (8, 16))
        neg = text_embeds(negative_prompt or [""] * len(prompt), num_videos_per_prompt, (8, 16))
        return embeds, (neg if do_classifier_free_guidance else None)
    return stand_in(pipe, encode_prompt)


def with_flux_text(pipe):
    def encode_prompt(prompt, prompt_embeds=None, pooled_prompt_embeds=None, num_images_per_prompt=1, **_):
        return (text_embeds(prompt, num_images_per_prompt, (8, 32)),
                text_embeds(prompt, num_images_per_prompt, (16,)), torch.zeros(8, 3))
    return stand_in(pipe, encode_prompt)


def stand_in(pipe, encode_prompt):
    pipe.tokenizer = pipe.text_encoder = object()  # present, so that texts are accepted; never called
    pipe.encode_prompt = encode_prompt
    return pipe


@pytest.fixture
def serve(monkeypatch):
    """`--model diffusers:tiny` loads the given pipeline."""
    def use(pipe):
        monkeypatch.setattr(loading, "load_pipeline", lambda spec, height=None, width=None: pipe)
        return pipe
    return use


def png(path, size=16, seed=0):
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    PIL.fromarray(pixels).save(path)
    return path


def load_latents(path) -> torch.Tensor:
    return torch.from_numpy(np.load(path))


@pytest.mark.parametrize("solver", ["euler", "heun", "dpmpp2m", "unipc"])
def test_cli_wan22_search_places_the_boundary_and_sample_runs_it(serve, tmp_path, capsys, solver):
    pipe = serve(with_wan_text(tiny.wan22().pipe))
    out, latents = tmp_path / "wan22.json", tmp_path / "latents.npy"
    model = ["--model", "diffusers:tiny", "--prompt", "a cat", "--guidance", "5", "--height", "32", "--width", "32"]
    assert main(["search", *model, "--steps", "3", "--teacher-steps", "12", "--samples", "1", "--solver", solver,
                 "--out", str(out)]) == 0
    assert "experts: steps 1-" in capsys.readouterr().out
    schedule = Schedule.load(out)
    meta, times = schedule.metadata, schedule.times.tolist()
    assert meta["boundary"] == 0.875 == times[meta["split_step"]] and schedule.solver == solver
    assert meta["high_sigmas"] + meta["low_sigmas"][1:] == times
    assert meta["experts"] == [1] * meta["split_step"] + [2] * (3 - meta["split_step"])
    assert main(["sample", *model, "--schedule", str(out), "--solver", solver, "--samples", "1", "--seed", "4",
                 "--out", str(latents)]) == 0
    ours = od.sample_pipeline(pipe, ["a cat"], schedule, 5.0, 32, 32, generator=gen(4), solver=solver)
    assert rel_err(load_latents(latents), ours) <= TOL


def test_cli_wan22_compare_and_schedule_put_every_schedule_on_the_boundary(serve, tmp_path, capsys, monkeypatch):
    case = tiny.wan22()
    pipe = serve(with_wan_text(case.pipe))
    torch.manual_seed(0)
    pipe.vae = diffusers.AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 1], num_res_blocks=1,
                                          temperal_downsample=[True], latents_mean=[0.0] * 4, latents_std=[1.0] * 4,
                                          scale_factor_temporal=2, scale_factor_spatial=2).eval()
    monkeypatch.setattr(diffusers_compare, "default_image_metrics",
                        lambda device="cpu": diffusers_compare.ImageMetrics(skipped={"lpips": "stand-in"}))
    model = ["--model", "diffusers:tiny", "--prompt", "a cat", "--guidance", "5", "--height", "32", "--width", "32",
             "--samples", "1", "--teacher-steps", "12"]
    searched = tmp_path / "searched.json"
    assert main(["search", *model, "--steps", "3", "--high-steps", "2", "--out", str(searched)]) == 0
    report = tmp_path / "cmp"
    assert main(["compare", *model, "--steps", "3", "--solvers", "euler", "--schedules", "oss,uniform",
                 "--high-steps", "2", "--eval-samples", "1", "--images", "--out", str(report)]) == 0
    assert "two experts: every schedule gets a step on the boundary 0.875" in capsys.readouterr().out
    rows = {row["schedule"]: row for row in json.loads((report / "results.json").read_text())}
    # the same constrained search (results.json keeps 12 digits)
    assert rows["oss"]["times"] == pytest.approx(Schedule.load(searched).times.tolist(), abs=1e-12)
    assert rows["oss"]["times"][2] == 0.875 and rows["uniform"]["times"] == pytest.approx([1.0, 0.875, 1 / 3, 0.0])
    images = json.loads((report / "images" / "results.json").read_text())["rows"]
    assert [row["boundary_moved"] for row in images] == [None, None]  # already on it
    for name, expected_split, extra in (("uniform", 1, []), ("oss", 2, ["--option", "teacher_steps=12"])):
        out = tmp_path / f"{name}.json"
        assert main(["schedule", name, *model[:-2], "--steps", "3", "--high-steps", "2", *extra,
                     "--out", str(out)]) == 0
        schedule = Schedule.load(out)
        assert schedule.metadata["split_step"] == expected_split and 0.875 in schedule.times.tolist()
        assert main(["sample", *model[:-2], "--schedule", str(out), "--seed", "1",
                     "--out", str(tmp_path / f"{name}.npy")]) == 0
    assert Schedule.load(tmp_path / "uniform.json").metadata["boundary_moved"] == {"step": 1, "from": pytest.approx(2 / 3)}
    assert Schedule.load(tmp_path / "oss.json").times.tolist() == Schedule.load(searched).times.tolist()


def test_cli_high_steps_refused_in_one_line(serve, tmp_path, capsys):
    base = ["--prompt", "a cat", "--guidance", "5", "--height", "32", "--width", "32", "--samples", "1",
            "--teacher-steps", "12", "--out", str(tmp_path / "s.json")]
    cases = [(["search", "--model", "gmm:2d", "--steps", "3", "--high-steps", "1", "--out", str(tmp_path / "g.json")],
              "--high-steps applies only to a two-expert pipeline"),
             (["search", "--model", "diffusers:tiny", "--steps", "3", "--high-steps", "3", *base],
              "--high-steps 3 must be fewer than the step count (3)"),
             (["compare", "--model", "diffusers:tiny", "--steps", "2,4", "--high-steps", "2", *base[:-2],
               "--out", str(tmp_path / "c")], "--high-steps 2 must be fewer than the step count (2)")]
    for argv, message in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1
    serve(with_wan_text(tiny.wan21().pipe))
    assert main(["search", "--model", "diffusers:tiny", "--steps", "3", "--high-steps", "1", *base]) == 2
    err = capsys.readouterr().err.strip()
    assert "--high-steps applies only to a two-expert pipeline" in err and "has one" in err
    assert not (tmp_path / "s.json").exists()


def test_cli_image_reaches_image_to_video(serve, tmp_path):
    case = tiny.wan_i2v()
    pipe = serve(with_wan_text(case.pipe))
    image, out = png(tmp_path / "first.png"), tmp_path / "video.npy"
    schedule = od.pipeline_schedule(pipe, 3, 16, 16)
    schedule.save(tmp_path / "s.json")
    args = ["sample", "--model", "diffusers:tiny", "--prompt", "a dog", "--guidance", "5", "--height", "16",
            "--width", "16", "--num-frames", "5", "--schedule", str(tmp_path / "s.json"), "--samples", "1",
            "--seed", "2"]
    assert main([*args, "--image", str(image), "--out", str(out)]) == 0
    picture = PIL.open(image).convert("RGB")
    ours = od.sample_pipeline(pipe, ["a dog"], schedule, 5.0, 16, 16, generator=gen(2), image=picture, num_frames=5)
    assert rel_err(load_latents(out), ours) <= TOL
    other = tmp_path / "other.npy"
    assert main([*args, "--image", str(png(tmp_path / "second.png", seed=1)), "--out", str(other)]) == 0
    assert rel_err(load_latents(other), ours) > 1e-3  # the image is the condition


def test_cli_strength_and_image_reach_img2img_in_search_sample_and_compare(serve, tmp_path, capsys, monkeypatch):
    case = tiny.flux_img2img_pixels()
    pipe = serve(with_flux_text(case.pipe))
    image = png(tmp_path / "photo.png")
    model = ["--model", "diffusers:tiny", "--prompt", "a fox", "--guidance", "3.5", "--height", "16", "--width", "16",
             "--image", str(image), "--strength", "0.7"]
    out = tmp_path / "s.json"
    assert main(["search", *model, "--steps", "2", "--teacher-steps", "8", "--samples", "1", "--method", "dp",
                 "--out", str(out)]) == 0
    picture = PIL.open(image).convert("RGB")
    api = od.search_pipeline(pipe, ["a fox"], steps=2, teacher_steps=8, guidance_scale=3.5, height=16, width=16,
                             seed=0, image=picture, strength=0.7, method="dp")
    schedule = Schedule.load(out)
    assert schedule.times.tolist() == pytest.approx(api.schedule.times.tolist(), abs=1e-12)
    assert schedule.metadata["diffusers"]["strength"] == 0.7 and schedule.times[0] < 1.0
    latents = tmp_path / "x.npy"
    assert main(["sample", *model, "--schedule", str(out), "--samples", "1", "--seed", "3",
                 "--out", str(latents)]) == 0
    ours = od.sample_pipeline(pipe, ["a fox"], schedule, 3.5, 16, 16, generator=gen(3), image=picture, strength=0.7)
    assert rel_err(load_latents(latents), ours) <= TOL

    def stand_in_metrics(device="cpu"):
        return diffusers_compare.ImageMetrics(skipped={"lpips": "stand-in", "clip": "stand-in", "fid": "stand-in"})
    monkeypatch.setattr(diffusers_compare, "default_image_metrics", stand_in_metrics)
    report = tmp_path / "cmp"
    assert main(["compare", *model, "--steps", "2", "--solvers", "euler", "--schedules", "uniform", "--samples", "2",
                 "--eval-samples", "2", "--teacher-steps", "8", "--images", "--out", str(report)]) == 0
    printed = capsys.readouterr().out
    assert "PSNR to the teacher's images" in printed and "skipped metrics" in printed
    import json

    rows = json.loads((report / "images" / "results.json").read_text())["rows"]
    assert [r["schedule"] for r in rows] == ["uniform euler 2"] and np.isfinite(rows[0]["psnr"])
    assert (report / "images" / "grid.png").is_file()


def test_cli_image_inputs_refused_in_one_line(serve, tmp_path, capsys):
    serve(with_wan_text(tiny.wan_i2v().pipe))
    base = ["search", "--model", "diffusers:tiny", "--prompt", "a", "--steps", "2", "--teacher-steps", "6",
            "--height", "16", "--width", "16", "--num-frames", "5", "--out", str(tmp_path / "o.json")]
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("hello")
    for extra, message in ((["--image", str(tmp_path / "missing.png")], "cannot read --image"),
                           (["--image", str(not_an_image)], "cannot read --image"),
                           (["--image", str(png(tmp_path / "i.png")), "--mask", str(png(tmp_path / "m.png"))],
                            "takes no mask")):
        capsys.readouterr()
        assert main(base + extra) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1
    capsys.readouterr()
    assert main(["search", "--model", "gmm:2d", "--steps", "2", "--image", str(tmp_path / "i.png"),
                 "--out", str(tmp_path / "p.json")]) == 2
    assert "--image applies only to --model diffusers" in capsys.readouterr().err
    assert main(["compare", "--model", "gmm:2d", "--images", "--out", str(tmp_path / "c")]) == 2
    assert "--images applies only to --model diffusers" in capsys.readouterr().err
