"""Measured equality of the diffusers integration with the pipelines themselves, per family, on the tiny
random pipelines of `optimalsteps.integrations.diffusers.tiny` (CPU, float32, offline).

For each family it reports, as relative L2 errors of the final latents:
- teacher: the search's teacher samples against `pipe(..., **pipeline_kwargs(teacher))` from the same seed;
- own run: the same against the pipeline's own `num_inference_steps=N` run (where its default grid is the
  teacher grid: the families whose default is linspace(1, 1/N, N) under their shift; for pipelines without a
  schedule argument, a search whose teacher is `pipeline_schedule(pipe, N)`);
- sample: `sample_pipeline(schedule)` against `pipe(..., **pipeline_kwargs(schedule))` for the searched
  schedule (for pipelines without a schedule argument: `pipeline_schedule(pipe, M)` against
  `pipe(num_inference_steps=M)`).

    PYTHONPATH=. nice -n 10 python benchmarks/diffusers_equality.py [case ...]

(img2img: pipeline_kwargs' strength 1.0 replaces the call's strength.)
"""

from __future__ import annotations

import os
import sys
import time
import warnings

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from optimalsteps.integrations import diffusers as od  # noqa: E402
from optimalsteps.integrations.diffusers import tiny  # noqa: E402

STEPS, TEACHER_STEPS = 4, 16


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def fresh_global_seed() -> None:
    """CogView4 Control samples its control latents from torch's global random state: the same before each run."""
    torch.manual_seed(0)


def measure(case: tiny.TinyCase) -> dict[str, float]:
    pipe, prompts, call = case.pipe, case.prompts, case.call
    if not case.custom_schedule:
        schedule = od.pipeline_schedule(pipe, STEPS, call["height"], call["width"])
        ours = od.sample_pipeline(pipe, prompts, schedule, generator=gen(2), **call)
        theirs = pipe(**prompts, num_inference_steps=STEPS, generator=gen(2), output_type="latent", **call).frames
        errors = {"sample": rel_err(ours, theirs)}
        # a search on the pipeline's own N-step grid: its teacher is the pipeline's N-step run
        grid = od.pipeline_schedule(pipe, TEACHER_STEPS, call["height"], call["width"])
        result = od.search_pipeline(pipe, prompts, steps=STEPS, seed=1, teacher_schedule=grid, **call)
        if hasattr(result, "teacher_samples"):  # a two-expert search returns its two stages instead
            own = pipe(**prompts, num_inference_steps=TEACHER_STEPS, generator=gen(1), output_type="latent",
                       **call).frames
            errors["own run"] = rel_err(result.teacher_samples, own)
        return errors
    latents = case.notes.get("latents", tiny.pipeline_latents)  # LTX-2: its video and audio latents as one state
    fresh_global_seed()
    result = od.search_pipeline(pipe, prompts, steps=STEPS, teacher_steps=TEACHER_STEPS, seed=1, **call)
    fresh_global_seed()
    teacher = latents(pipe, **prompts, **{**call, **od.pipeline_kwargs(result.teacher, pipe)}, generator=gen(1))
    errors = {"teacher": rel_err(result.teacher_samples, teacher)}
    if case.default_is_teacher:
        fresh_global_seed()
        own = latents(pipe, **prompts, **call, num_inference_steps=TEACHER_STEPS, generator=gen(1))
        errors["own run"] = rel_err(result.teacher_samples, own)
    fresh_global_seed()
    ours = od.sample_pipeline(pipe, prompts, result.schedule, generator=gen(4), **call)
    fresh_global_seed()
    theirs = latents(pipe, **prompts, **{**call, **od.pipeline_kwargs(result.schedule, pipe)}, generator=gen(4))
    return {**errors, "sample": rel_err(ours, theirs)}


def main() -> None:
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    import diffusers

    print(f"diffusers {diffusers.__version__}, torch {torch.__version__}, CPU float32, "
          f"{STEPS}-step search on a {TEACHER_STEPS}-step teacher\n")
    print("| family (tiny pipeline, settings) | teacher vs pipeline | teacher vs own N-step run | "
          "sample_pipeline vs pipeline |")
    print("|---|---|---|---|")
    only = sys.argv[1:]  # case names (tiny.CASES) to measure; all without
    for name, build in tiny.CASES.items():
        if only and name not in only:
            continue
        start = time.perf_counter()
        case = build()
        errors = measure(case)
        cells = [f"{errors[k]:.1e}" if k in errors else "-" for k in ("teacher", "own run", "sample")]
        print(f"| {case.name} | " + " | ".join(cells) + " |", flush=True)
        print(f"  ({name}: {time.perf_counter() - start:.1f} s)", file=sys.stderr)


if __name__ == "__main__":
    main()
