"""Optimal Stepsize Distillation: choose M of a teacher's N grid points by dynamic programming.

`search` checks its inputs, runs the teacher (`teacher.py`), runs the DP (`dp.py`, or coarse to fine:
`coarse.py`) and makes the result; docs/search.md describes the algorithm.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch

from . import distributed as dd
from .checkpoint import Checkpointer, fingerprint, run_settings
from .coarse import CoarseToFine, coarse_to_fine_dp
from ..core.checks import as_noise, check_schedule_arg, check_search_args, check_storage_dtype
from ..core.errors import OptimalStepsError
from .dp import AGGREGATES, COSTS, DPContext, cost_view, exact_dp, median_path, reference_dp, reference_median, trace_path
from .memory import check_fits, check_storage, estimate_search_bytes, storage_dtype as parse_storage_dtype
from ..core.models import index_cond, model_process
from ..core.schedules import Schedule, check_steps
from ..core.solvers import get_solver, initial_state, nfe_per_trajectory
from .teacher import Teacher, amplitude_statistics, default_teacher_grid, run_teacher

@dataclass
class SearchResult:
    schedule: Schedule
    indices: list[int]  # teacher-grid indices of the schedule, start -> clean end
    per_sample: Optional[list[Schedule]]  # per-sample schedules (median aggregation), else None
    per_sample_indices: Optional[list[list[int]]]
    cost_table: torch.Tensor  # [M+1, N+1] best cost per cell (joint) or [B, M+1, N+1] (per sample); inf = unreachable
    cost: float  # the DP's recorded final cost (mean over samples)
    nfe: int  # model evaluations spent, per sample state, teacher included
    teacher_nfe: int
    seconds: float
    teacher: Schedule
    teacher_samples: torch.Tensor
    amplitude: dict[str, list[float]] = field(default_factory=dict)  # teacher quantiles per grid index
    refinement: Optional[Any] = None  # the refine.RefineResult of search(..., refine=True)


def search(model: Any, noise: torch.Tensor, steps: int, teacher_steps: int = 200, solver: str = "euler",
           teacher_schedule: Schedule | None = None, cond: dict | None = None, cost: str = "xt",
           aggregate: str = "joint", reference_compat: bool = False, max_batch: int = 4096,
           candidates: int = 4, cost_channels: Optional[Sequence[int]] = None,
           cost_frames: Optional[Sequence[int]] = None, cost_dtype: torch.dtype = torch.float64,
           progress: bool = False, seed: int | None = None, storage: str = "memory",
           storage_dtype: torch.dtype | str | None = None, storage_dir: str | None = None,
           target_chunk: int | None = None, memory_limit: int | None = None, checkpoint_dir: str | None = None,
           resume: bool = False, distributed: bool = True,
           callback: Optional[Callable[[str, int, int], None]] = None, coarse_to_fine: Any = False,
           free_start: bool = False) -> SearchResult:
    """Search an M-step schedule for `model` on the search `noise` [B, ...] (and per-sample `cond`).

    - `solver`: the student's (and teacher's) solver; the DP state carries what it needs.
    - `cost`: "xt" (mean squared distance to the teacher state, the released code's) or "x0" (distance of
      the model's clean estimate at the candidate state to the teacher's there; the `candidates` best
      sources of each cell by xt cost are re-ranked, at one model call each).
    - `aggregate`: "joint" (one DP, cost averaged over samples, each sample carrying its own states) or
      "median" (a DP per sample, then the per-position median of teacher indices: the paper's OSS-ave).
    - `reference_compat`: the authors' released semantics (see docs/search.md).
    - Heun needs a model call at each candidate target: the `candidates` best sources of each cell by
      the Euler predictor's cost are evaluated, so a layer costs at most (N+1) * (1 + candidates) calls.
    - Scale (docs/scale.md): under torch.distributed each rank searches its contiguous share of `noise`
      and the ranks all-reduce every layer's cost table, so all take the same decisions; `storage`
      ("memory" | "cpu" | "disk" in `storage_dir`) and `storage_dtype` keep the teacher trajectory
      elsewhere or in lower precision; `target_chunk` bounds per-layer temporaries; the peak memory is
      estimated first and the search refused if it cannot fit (`memory_limit` bytes, else what is free);
      `checkpoint_dir` writes the state after the teacher and every layer, `resume` continues from it.
    - `free_start`: the first step may start from the initial state placed at any later grid point (the
      freedom the released code's first layer has, kept here with exactly-M-step cells); the schedule then
      records `noise_scale_time` and `sample` starts from sigma(t_start) * noise at its first time.
    - `callback(stage, done, total)` is called after the teacher ("teacher") and after each layer ("layer").
    - `coarse_to_fine` (True or a `CoarseToFine`): the DP on a coarse sub-grid, then on bands around its
      choices (far fewer model calls, docs/refine.md). Refinement off the grid is composed on top of this
      search by `optimalsteps.search` (`evaluation.baselines.oss_search`), which also makes its starts.
    """
    started = time.perf_counter()
    process = model_process(model)
    noise = as_noise(noise, model, "search noise")
    check_search_args(noise, max_batch, target_chunk, memory_limit, cost_channels, cost_frames, seed)
    solver_def = get_solver(solver)
    steps = check_steps(steps)
    if cost not in COSTS:
        raise OptimalStepsError(f"unknown cost {cost!r}; known: {', '.join(COSTS)}")
    if aggregate not in AGGREGATES:
        raise OptimalStepsError(f"unknown aggregate {aggregate!r}; known: {', '.join(AGGREGATES)}")
    if not isinstance(noise, torch.Tensor) or noise.dim() < 2 or noise.shape[0] < 1:
        raise OptimalStepsError("search noise must be a tensor [B, ...] with at least one sample")
    if not torch.isfinite(noise).all():
        raise OptimalStepsError("search noise contains NaN or inf")
    if candidates < 1:
        raise OptimalStepsError(f"candidates must be at least 1, got {candidates}")
    batch = noise.shape[0]
    storage_dtype = check_storage_dtype(parse_storage_dtype(storage_dtype))
    check_storage(storage)
    for key, value in (cond or {}).items():
        if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] not in (1, batch):
            raise OptimalStepsError(f"condition {key!r} has {value.shape[0]} rows but there are {batch} noise samples")
    if teacher_schedule is None:
        teacher_steps = check_steps(teacher_steps)
        teacher = default_teacher_grid(process, teacher_steps)
    else:
        check_schedule_arg(teacher_schedule, "teacher_schedule")
        teacher = teacher_schedule if isinstance(teacher_schedule, Schedule) else Schedule(teacher_schedule, process)
        if teacher.process.name != process.name:
            raise OptimalStepsError(f"teacher schedule is for {teacher.process.name}, the model's process is {process.name}")
        if abs(float(teacher.times[0]) - process.t_start) > 1e-9 * max(1.0, process.t_start):
            raise OptimalStepsError("the teacher schedule must start at the process start")
        teacher_steps = teacher.steps
    if steps >= teacher_steps:
        raise OptimalStepsError(f"steps ({steps}) must be fewer than the teacher's steps ({teacher_steps})")
    if reference_compat and solver_def.name != "euler":
        raise OptimalStepsError("--reference-compat reproduces the released code, which supports only the euler solver")
    if reference_compat and coarse_to_fine:
        raise OptimalStepsError("--refine and --coarse-to-fine work on the exact DP, not with --reference-compat")

    sample_shape = tuple(noise.shape[1:])
    cost = "xt" if reference_compat else cost
    per_sample = reference_compat or aggregate == "median"
    part = dd.shard(batch, distributed)
    progress = progress and part.is_main
    local_noise = noise[part.start:part.stop]
    local_cond = index_cond(cond, torch.arange(part.start, part.stop)) if cond else cond

    estimate = memory_estimate(local_noise, teacher_steps, solver_def.name, cost, storage, storage_dtype,
                               target_chunk, cost_dtype)
    check_fits(estimate, noise.device, memory_limit)

    checkpointer = None
    if checkpoint_dir is not None:
        settings = run_settings(model, noise, cond, steps=steps, teacher_steps=teacher_steps,
                                teacher_times=fingerprint(teacher.times), samples=batch, seed=seed,
                                solver=solver_def.name, cost=cost, aggregate=aggregate,
                                reference_compat=reference_compat, free_start=free_start, candidates=candidates,
                                ranks=part.world, storage_dtype=str(storage_dtype or "float32").replace("torch.", ""),
                                cost_dtype=str(cost_dtype).replace("torch.", ""),
                                cost_channels=None if cost_channels is None else [int(c) for c in cost_channels],
                                cost_frames=None if cost_frames is None else [int(f) for f in cost_frames],
                                coarse_to_fine=repr(coarse_to_fine) if coarse_to_fine else None)
        checkpointer = Checkpointer(checkpoint_dir, settings, part.rank, resume)
    teacher_run = None
    if checkpointer is not None and resume:
        saved = checkpointer.load("teacher")
        if saved is not None:
            place = noise.device if storage == "memory" else torch.device("cpu")
            teacher_run = Teacher(saved["states"].to(place), None if saved["x0"] is None
                                  else saved["x0"].to(place), int(saved["nfe"]))
    if teacher_run is None:
        teacher_run = run_teacher(model, local_noise, teacher, solver_def.name, local_cond, progress, max_batch,
                                  storage_dtype, storage, storage_dir, keep_x0=(cost == "x0"))
        if checkpointer is not None:
            checkpointer.save("teacher", {"states": teacher_run.states.cpu(), "nfe": teacher_run.nfe,
                                          "x0": None if teacher_run.x0 is None else teacher_run.x0.cpu()})
    if callback is not None:
        callback("teacher", teacher_steps, teacher_steps)
    ctx = DPContext(model=model, process=process, solver=solver_def, times=teacher.times.to(noise.device),
                   teacher=teacher_run, cond=local_cond, cost=cost, per_sample=per_sample, steps=steps,
                   max_batch=max_batch, candidates=candidates,
                   view=lambda x: cost_view(x, cost_channels, cost_frames, sample_shape),
                   cost_dtype=cost_dtype, progress=progress, sample_shape=sample_shape, part=part,
                   chunk=target_chunk, storage=storage, storage_dir=storage_dir, checkpointer=checkpointer,
                   callback=callback, free_start=free_start and not reference_compat,
                   device=noise.device, start=initial_state(process, local_noise, float(teacher.times[0])))
    fast = None
    if coarse_to_fine:
        traces, cost_table, search_nfe, fast = coarse_to_fine_dp(ctx, coarse_to_fine)
    else:
        traces, cost_table, search_nfe = (reference_dp if reference_compat else exact_dp)(ctx)

    if checkpointer is not None:
        checkpointer.close()
    per_sample_indices = None
    last_layer = steps if not reference_compat else -1
    if ctx.per_sample:
        local = [trace_path(traces[b], steps, teacher_steps, reference_compat, free_start)
                 for b in range(traces.shape[0])]
        per_sample_indices = [ix for chunk in dd.all_gather_objects(local, part) for ix in chunk]
        indices = (reference_median if reference_compat else median_path)(per_sample_indices)
        final_cost = float(ctx.sample_mean(cost_table[:, last_layer, teacher_steps]))
    else:
        indices = trace_path(traces, steps, teacher_steps, False, free_start)
        final_cost = float(cost_table[steps, teacher_steps])

    nfe = int(ctx.global_sum(torch.tensor([teacher_run.nfe * (part.stop - part.start) + search_nfe],
                                          dtype=torch.float64)))
    teacher_nfe = teacher_run.nfe * batch
    seconds = time.perf_counter() - started
    amplitude = amplitude_statistics(teacher_run.states, part=part)
    schedule = _indices_schedule(indices, teacher, solver_def.name, reference_compat)
    schedule.metadata.update({
        "method": "oss-reference" if reference_compat else "oss",
        "model": getattr(model, "spec", type(model).__name__),
        "nfe": nfe, "search_nfe": nfe, "teacher_nfe": teacher_nfe, "search_seconds": round(seconds, 4),
        "ranks": part.world, "coarse_to_fine": fast,
        "teacher_steps": teacher_steps, "teacher_schedule": teacher.metadata.get("baseline", "custom"),
        "solver": solver_def.name, "cost": ctx.cost, "aggregate": "median" if ctx.per_sample else "joint",
        "samples": batch, "seed": seed, "steps": steps, "teacher_indices": indices, "dp_cost": final_cost,
        "reference_compat": reference_compat, "free_start": free_start,
        "calibration": {"q05": [amplitude["q05"][i] for i in schedule.metadata.get("_grid", indices)[:-1]],
                        "q95": [amplitude["q95"][i] for i in schedule.metadata.get("_grid", indices)[:-1]]},
    })
    schedule.metadata.pop("_grid", None)
    per_sample_schedules = None
    if per_sample_indices is not None:
        per_sample_schedules = [_indices_schedule(ix, teacher, solver_def.name, reference_compat)
                                for ix in per_sample_indices]
        for s in per_sample_schedules:
            s.metadata.pop("_grid", None)
    teacher_out = teacher_run.states[:, -1].to(device=noise.device, dtype=torch.promote_types(noise.dtype, torch.float32))
    result = SearchResult(schedule, indices, per_sample_schedules, per_sample_indices, cost_table, final_cost, nfe,
                          teacher_nfe, seconds, teacher, teacher_out, amplitude)
    return result


def memory_estimate(noise: torch.Tensor, teacher_steps: int, solver: str = "euler", cost: str = "xt",
                    storage: str = "memory", storage_dtype: torch.dtype | str | None = None,
                    target_chunk: int | None = None, cost_dtype: torch.dtype = torch.float64) -> dict[str, int]:
    """Peak bytes a search of these (this rank's) noise samples will hold, by place (device, host, disk)."""
    return estimate_search_bytes(noise.shape[0], noise[0].numel(), teacher_steps + 1, get_solver(solver).multistep,
                                 cost == "x0", check_storage(storage), parse_storage_dtype(storage_dtype) or
                                 torch.float32, torch.promote_types(noise.dtype, torch.float32), target_chunk,
                                 cost_dtype)


def _indices_schedule(indices: list[int], teacher: Schedule, solver: str, reference: bool) -> Schedule:
    """The schedule of grid indices; in reference mode repeated (padded) start indices become zero-length
    steps the released code would run: they are dropped here and counted in the metadata."""
    grid = sorted(set(indices)) if reference else list(indices)
    times = teacher.times[grid]
    metadata: dict[str, Any] = {"_grid": grid}
    if reference:
        metadata["padded_steps"] = len(indices) - len(grid)
        metadata["reference_indices"] = list(indices)
    if grid[0] != 0:
        # the first step starts from the initial state sigma(t_start) * noise placed at a later grid time
        metadata["noise_scale_time"] = float(teacher.times[0])
    return Schedule(times, teacher.process, solver=solver, metadata=metadata)


def search_nfe_bound(steps: int, teacher_steps: int, solver: str = "euler", cost: str = "xt",
                     candidates: int = 4) -> int:
    """An upper bound of the model evaluations per search sample, teacher included."""
    teacher = nfe_per_trajectory(solver, teacher_steps)
    per_layer = teacher_steps + 1
    extra = candidates * (teacher_steps + 1) * ((cost == "x0") + get_solver(solver).corrector)
    return teacher + steps * (per_layer + extra)


def coarse_to_fine_search(model: Any, noise: torch.Tensor, steps: int, teacher_steps: int = 200,
                          solver: str = "euler", coarse_steps: int | None = None, window: int | None = None,
                          factor: int = 4, rounds: int = 2, **options: Any) -> SearchResult:
    """`search` with the coarse-to-fine DP (the same teacher, far fewer model calls); `options` go to `search`."""
    fast = CoarseToFine(coarse_steps, factor, window, rounds)
    return search(model, noise, steps, teacher_steps=teacher_steps, solver=solver, coarse_to_fine=fast, **options)
