"""Optimal Stepsize Distillation: choose M of a teacher's N grid points by dynamic programming.

`search` runs four named stages: check the inputs (`_check_inputs`), run the teacher or load it from a
checkpoint (`_teacher_stage`, `teacher.py`), run the DP (`_dp_stage`: `dp.py`, or coarse to fine:
`coarse.py`), and make the result (`_result_stage`), which also measures the returned schedule's realised
error on the search noise. docs/search.md describes the algorithm; `options.py` the option objects.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Any, Callable, Optional, Sequence

import torch

from . import distributed as dd
from .checkpoint import Checkpointer, fingerprint, run_settings
from .coarse import CoarseToFine, coarse_to_fine_dp
from ..core.checks import as_noise, check_search_args
from ..core.errors import OptimalStepsError, unknown
from .dp import (DPContext, choose_path, cost_view, exact_dp, median_candidates, median_path, reference_dp,
                 reference_median, trace_path)
from .memory import check_fits, estimate_beam_bytes, estimate_search_bytes, estimate_validated_bytes
from ..core.models import check_cond, check_teacher_grid, index_cond, model_process, model_teacher_grid
from ..core.processes import NoiseProcess
from ..core.schedules import Schedule, check_steps
from ..core.solvers import Solver, get_solver, initial_state, nfe_per_trajectory, sample
from .objectives import aggregate, per_sample_error
from .options import Checkpointing, DPOptions, Storage, from_flat
from .result import SearchResult
from . import beam
from .select import DATA_SAMPLES, DEFAULT_WIDTH, METHODS, search_hook, validated_plan
from .teacher import Teacher, amplitude_statistics, run_teacher


@dataclass
class _Inputs:
    """What `_check_inputs` resolved: the process, solver, step counts and teacher grid."""

    process: NoiseProcess
    solver: Solver
    steps: int
    teacher: Schedule
    teacher_steps: int
    dp: DPOptions
    storage: Storage
    checkpointing: Checkpointing


def search(model: Any, noise: torch.Tensor, steps: int, teacher_steps: int = 200, solver: str = "euler",
           cond: dict | None = None, *, teacher_grid: Schedule | None = None, dp: DPOptions | None = None,
           storage: Storage | None = None, checkpointing: Checkpointing | None = None, progress: bool = False,
           seed: int | None = None, callback: Optional[Callable[[str, int, int], None]] = None,
           method: str | None = None, refine_calls: int | None = None) -> SearchResult:
    """Search an M-step schedule for `model` on the search `noise` [B, ...] (and per-sample `cond`).

    - `solver`: the student's (and teacher's) solver; the DP state carries what it needs.
    - `teacher_grid`: the grid to distil (default: the model's, `core.models.model_teacher_grid`, of
      `teacher_steps` steps).
    - `dp` (`DPOptions`): the cost, aggregation, candidates, free start, reference semantics, coarse to fine.
    - `storage` (`Storage`), `checkpointing` (`Checkpointing`): scale (docs/scale.md). Under torch.distributed
      each rank searches its contiguous share of `noise` and the ranks all-reduce every layer's cost table,
      so all take the same decisions; the peak memory is estimated first and the search refused if it
      cannot fit.
    - `callback(stage, done, total)` is called after the teacher ("teacher") and after each layer ("layer").
    - `method`: "validated" (the default unless an option only the plain DP takes is given: candidates of every kind, the winner on a validation set, within twice
      the plain DP's model calls; optimize/select.py) or "dp" (the paper's plain DP, for reproduction; the
      default when cost, aggregate, coarse to fine, free start, storage or checkpoint options are given);
      `dp.objective` ("mse", "log", "tail"; default "log" validated, "mse" dp) and `dp.width` (histories kept
      per cell; default 4 validated, 1 dp) choose the DP's aggregation and beam (optimize/beam.py).
      `dp.reference_compat` always runs the released code's DP.
    Refinement off the grid is composed on top of this search by `optimalsteps.search`
    (`evaluation.baselines.oss_search`), which also makes its starts.
    """
    started = time.perf_counter()
    noise = as_noise(noise, model, "search noise")
    inputs = _check_inputs(model, noise, steps, teacher_steps, solver, cond, teacher_grid, dp, storage, checkpointing)
    check_search_args(noise, inputs.dp.view.channels, inputs.dp.view.frames, seed)
    part = dd.shard(noise.shape[0], inputs.storage.distributed)
    dp_only = _plain_dp_only(inputs.dp, inputs.storage, inputs.checkpointing, part.world)
    method = _resolve_method(method, inputs.dp, dp_only)
    if refine_calls is not None and method != "validated":
        raise OptimalStepsError("refine_calls makes refinement a candidate of the validated search: it needs "
                                f"method='validated', not {method!r}")
    if _beyond_plain_dp(method, inputs.dp):
        result = search_hook(method, model, noise, inputs.steps, inputs.teacher, inputs.solver.name, cond,
                             inputs.dp.objective, inputs.dp.width, inputs.dp.free_start, seed, inputs.dp.candidates,
                             inputs.storage.max_batch, progress, callback, dp_only, refine_calls)
        _measure_error(result, model, noise, cond, inputs.solver.name, inputs.storage.max_batch)
        return result
    progress = progress and part.is_main
    local_noise = noise[part.start:part.stop]
    local_cond = index_cond(cond, torch.arange(part.start, part.stop)) if cond else cond
    estimate = inputs.storage.estimate or memory_estimate(noise, inputs.teacher_steps, inputs.solver.name, inputs.dp,
                                                          inputs.storage, steps=inputs.steps, method=method)
    check_fits(estimate, noise.device, inputs.storage.memory_limit)
    checkpointer = _checkpointer(model, noise, cond, inputs, part, seed)
    teacher_run = _teacher_stage(model, local_noise, local_cond, inputs, checkpointer, progress)
    if callback is not None:
        callback("teacher", inputs.teacher_steps, inputs.teacher_steps)
    ctx = DPContext(model=model, process=inputs.process, solver=inputs.solver,
                    times=inputs.teacher.times.to(noise.device), teacher=teacher_run, cond=local_cond,
                    cost=inputs.dp.cost, per_sample=inputs.dp.per_sample, steps=inputs.steps,
                    max_batch=inputs.storage.max_batch, candidates=inputs.dp.candidates,
                    view=lambda x: cost_view(x, inputs.dp.view.channels, inputs.dp.view.frames, tuple(noise.shape[1:])),
                    cost_dtype=inputs.dp.view.dtype, progress=progress, sample_shape=tuple(noise.shape[1:]), part=part,
                    chunk=inputs.storage.target_chunk, storage=inputs.storage.place, storage_dir=inputs.storage.dir,
                    checkpointer=checkpointer, callback=callback, free_start=inputs.dp.free_start,
                    device=noise.device, cells=_through_cells(inputs, noise.device),
                    start=initial_state(inputs.process, local_noise, float(inputs.teacher.times[0])))
    traces, cost_table, search_nfe, fast = _dp_stage(ctx, inputs.dp)
    if checkpointer is not None:
        checkpointer.close()
    result = _result_stage(model, inputs, ctx, traces, cost_table, search_nfe, fast, started, seed, local_noise)
    _measure_error(result, model, local_noise, local_cond, ctx.solver.name, ctx.max_batch, ctx.cost_dtype, ctx.view,
                   ctx.sample_mean, ctx.part.total)
    return result


def _beyond_plain_dp(method: str, dp: DPOptions) -> bool:
    """Whether the search is the validated choice or a beam / other-objective DP rather than the plain DP."""
    if method not in METHODS:
        raise unknown("method", method, METHODS)
    plain_objective = dp.objective in (None, "mse") or dp.per_sample  # the median mode takes every objective
    return not dp.reference_compat and (method != "dp" or not plain_objective or dp.width not in (None, 1))


def _resolve_method(method: str | None, dp: DPOptions, dp_only: list[str]) -> str:
    """The method asked for, or the default: "dp" when a plain-DP-only option or a free start is given."""
    if method is not None:
        return method
    return "dp" if dp_only or dp.free_start else "validated"


def _plain_dp_only(dp: DPOptions, storage: Storage, checkpointing: Checkpointing, ranks: int) -> list[str]:
    """The options given that only the plain DP takes (refused by the validated and beam searches)."""
    given = {"cost": dp.cost != "xt", "aggregate": dp.aggregate is not None, "coarse_to_fine": bool(dp.coarse_to_fine),
             "storage": storage.place != "memory", "storage_dtype": storage.dtype is not None,
             "target_chunk": storage.target_chunk is not None, "checkpoint_dir": checkpointing.dir is not None,
             "cost_channels": dp.view.channels is not None, "cost_frames": dp.view.frames is not None,
             "through": dp.through is not None, "ranks": ranks > 1}
    return [name for name, is_given in given.items() if is_given]


def _check_inputs(model: Any, noise: torch.Tensor, steps: int, teacher_steps: int, solver: str, cond: dict | None,
                  teacher_grid: Schedule | None, dp: DPOptions | None, storage: Storage | None,
                  checkpointing: Checkpointing | None) -> _Inputs:
    """Stage 1: every input checked, and the teacher grid resolved, before any work."""
    process = model_process(model)
    solver_def = get_solver(solver)
    steps = check_steps(steps)
    dp, storage, checkpointing = dp or DPOptions(), storage or Storage(), checkpointing or Checkpointing()
    if not isinstance(noise, torch.Tensor) or noise.dim() < 2 or noise.shape[0] < 1:
        raise OptimalStepsError("search noise must be a tensor [B, ...] with at least one sample")
    if not torch.isfinite(noise).all():
        raise OptimalStepsError("search noise contains NaN or inf")
    check_cond(cond, noise.shape[0])
    if teacher_grid is None:
        teacher = model_teacher_grid(model, check_steps(teacher_steps))
    else:
        teacher = check_teacher_grid(teacher_grid, process)
    if steps >= teacher.steps:
        raise OptimalStepsError(f"steps ({steps}) must be fewer than the teacher's steps ({teacher.steps})")
    if dp.through is not None and not (dp.through[0] < steps and dp.through[1] < teacher.steps
                                       and dp.through[0] <= dp.through[1]
                                       and steps - dp.through[0] <= teacher.steps - dp.through[1]):
        raise OptimalStepsError(f"through {tuple(dp.through)}: step {dp.through[0]} of {steps} cannot be grid point "
                                f"{dp.through[1]} of {teacher.steps}")
    if dp.reference_compat and solver_def.name != "euler":
        raise OptimalStepsError("--reference-compat reproduces the released code, which supports only the euler solver")
    return _Inputs(process, solver_def, steps, teacher, teacher.steps, dp, storage, checkpointing)


def _checkpointer(model: Any, noise: torch.Tensor, cond: dict | None, inputs: _Inputs, part: dd.Shard,
                  seed: int | None) -> Checkpointer | None:
    """The run's checkpoints, bound to its settings and to fingerprints of the model, noise and conditions."""
    if inputs.checkpointing.dir is None:
        return None
    dp, storage = inputs.dp, inputs.storage
    settings = run_settings(model, noise, cond, steps=inputs.steps, teacher_steps=inputs.teacher_steps,
                            teacher_times=fingerprint(inputs.teacher.times), samples=noise.shape[0], seed=seed,
                            solver=inputs.solver.name, cost=dp.cost, aggregate=dp.aggregate_run,
                            reference_compat=dp.reference_compat, free_start=dp.free_start, candidates=dp.candidates,
                            ranks=part.world, storage_dtype=_dtype_name(storage.dtype or torch.float32),
                            cost_dtype=_dtype_name(dp.view.dtype), cost_channels=_int_list(dp.view.channels),
                            cost_frames=_int_list(dp.view.frames),
                            coarse_to_fine=repr(dp.coarse_to_fine) if dp.coarse_to_fine else None,
                            through=_int_list(dp.through))
    return Checkpointer(inputs.checkpointing.dir, settings, part.rank, inputs.checkpointing.resume)


def _through_cells(inputs: _Inputs, device: torch.device) -> torch.Tensor | None:
    """The DP cells [M+1, N+1] of the schedules that are at grid point j after k steps (`dp.through`)."""
    if inputs.dp.through is None:
        return None
    k, j = (int(v) for v in inputs.dp.through)
    cells = torch.zeros((inputs.steps + 1, inputs.teacher_steps + 1), dtype=torch.bool, device=device)
    cells[:k, :j] = True
    cells[k, j] = True
    cells[k + 1:, j + 1:] = True
    return cells


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _int_list(values: Optional[Sequence[int]]) -> Optional[list[int]]:
    return None if values is None else [int(v) for v in values]


def _teacher_stage(model: Any, local_noise: torch.Tensor, local_cond: dict | None, inputs: _Inputs,
                   checkpointer: Checkpointer | None, progress: bool) -> Teacher:
    """Stage 2: the teacher trajectory on this rank's samples, from a checkpoint when resuming."""
    storage = inputs.storage
    if checkpointer is not None and inputs.checkpointing.resume:
        saved = checkpointer.load("teacher")
        if saved is not None:
            place = local_noise.device if storage.place == "memory" else torch.device("cpu")
            return Teacher(saved["states"].to(place), None if saved["x0"] is None else saved["x0"].to(place),
                           int(saved["nfe"]))
    run = run_teacher(model, local_noise, inputs.teacher, inputs.solver.name, local_cond, progress, storage.max_batch,
                      storage.dtype, storage.place, storage.dir, keep_x0=(inputs.dp.cost == "x0"))
    if checkpointer is not None:
        checkpointer.save("teacher", {"states": run.states.cpu(), "nfe": run.nfe,
                                      "x0": None if run.x0 is None else run.x0.cpu()})
    return run


def _dp_stage(ctx: DPContext, dp: DPOptions):
    """Stage 3: (traces, cost table, model calls, coarse-to-fine levels or None) of the chosen DP."""
    if dp.coarse_to_fine:
        return coarse_to_fine_dp(ctx, dp.coarse_to_fine)
    traces, cost_table, nfe = (reference_dp if dp.reference_compat else exact_dp)(ctx)
    return traces, cost_table, nfe, None


def _result_stage(model: Any, inputs: _Inputs, ctx: DPContext, traces: torch.Tensor, cost_table: torch.Tensor,
                  search_nfe: int, fast: Any, started: float, seed: int | None,
                  local_noise: torch.Tensor) -> SearchResult:
    """Stage 4: the traced schedule(s), the DP's cost, model calls, and the schedule's metadata."""
    steps, n, dp, part = inputs.steps, inputs.teacher_steps, inputs.dp, ctx.part
    reference, solver = dp.reference_compat, inputs.solver.name
    per_sample_indices, chosen = None, None
    if ctx.per_sample:
        local = [trace_path(traces[b], steps, n, reference, dp.free_start) for b in range(traces.shape[0])]
        per_sample_indices = [ix for chunk in dd.all_gather_objects(local, part) for ix in chunk]
        indices = (reference_median if reference else median_path)(per_sample_indices)
        if dp.objective is not None and not reference:
            indices, chosen = _median_by_objective(model, inputs, ctx, local_noise, per_sample_indices)
        final_cost = float(ctx.sample_mean(cost_table[:, steps if not reference else -1, n]))
    else:
        indices = trace_path(traces, steps, n, False, dp.free_start)
        final_cost = float(cost_table[steps, n])
    teacher_run, batch = ctx.teacher, part.total
    nfe = int(ctx.global_sum(torch.tensor([teacher_run.nfe * (part.stop - part.start) + search_nfe],
                                          dtype=torch.float64))) + (chosen["nfe"] if chosen else 0)
    seconds = time.perf_counter() - started
    amplitude = amplitude_statistics(teacher_run.states, part=part)
    schedule = _indices_schedule(indices, inputs.teacher, solver, reference)
    grid = schedule.metadata.pop("_grid")
    schedule.metadata.update({
        "method": "oss-reference" if reference else "oss", "model": getattr(model, "spec", type(model).__name__),
        "nfe": nfe, "search_nfe": nfe, "teacher_nfe": teacher_run.nfe * batch, "search_seconds": round(seconds, 4),
        "ranks": part.world, "coarse_to_fine": fast, "teacher_steps": n,
        "teacher_grid": inputs.teacher.metadata.get("baseline", "custom"), "solver": solver, "cost": dp.cost,
        "aggregate": dp.aggregate_run, "samples": batch, "seed": seed, "steps": steps, "teacher_indices": indices,
        "dp_cost": final_cost, "reference_compat": reference, "free_start": dp.free_start,
        "calibration": {"q05": [amplitude["q05"][i] for i in grid[:-1]],
                        "q95": [amplitude["q95"][i] for i in grid[:-1]]},
    })
    if chosen is not None:
        schedule.metadata.update({"objective": dp.objective, "median_choice": chosen})
    per_sample_schedules = None
    if per_sample_indices is not None:
        per_sample_schedules = [_indices_schedule(ix, inputs.teacher, solver, reference) for ix in per_sample_indices]
        for s in per_sample_schedules:
            s.metadata.pop("_grid", None)
    device = ctx.device
    teacher_out = teacher_run.states[:, -1].to(device=device, dtype=ctx.start.dtype)
    return SearchResult(schedule, indices, per_sample_schedules, per_sample_indices, cost_table, final_cost, nfe,
                        teacher_run.nfe * batch, seconds, inputs.teacher, teacher_out, amplitude)


def _median_by_objective(model: Any, inputs: _Inputs, ctx: DPContext, local_noise: torch.Tensor,
                         per_sample_indices: list[list[int]]) -> tuple[list[int], dict[str, Any]]:
    """The median mode under an objective: of the per-position median path and the per-sample paths
    (dp.median_candidates), the one whose per-sample final errors on the search samples of all ranks, in the
    DP's cost view, have the lowest objective; one sampling of the search noise per candidate."""
    solver, batch = inputs.solver.name, local_noise.shape[0]
    target = ctx.view(ctx.teacher.states[:, -1].reshape(batch, -1).to(ctx.device))
    candidates = median_candidates(per_sample_indices)
    rows = []
    for path in candidates:
        schedule = _indices_schedule(path, inputs.teacher, solver, False)
        out = sample(model, local_noise, schedule, solver, ctx.cond, max_batch=ctx.max_batch).samples
        local = per_sample_error(ctx.view(out.reshape(batch, -1)), target).cpu().tolist()
        rows.append([e for chunk in dd.all_gather_objects(local, ctx.part) for e in chunk])
    errors = torch.tensor(rows, dtype=torch.float64)
    best = choose_path(errors, inputs.dp.objective)
    calls = len(candidates) * nfe_per_trajectory(solver, inputs.steps) * ctx.part.total
    return candidates[best], {"candidates": candidates, "scores": aggregate(errors, inputs.dp.objective).tolist(),
                              "chosen": best, "nfe": calls}


def _measure_error(result: SearchResult, model: Any, noise: torch.Tensor, cond: dict | None, solver: str,
                   max_batch: int, dtype: torch.dtype = torch.float64, view: Callable = lambda d: d,
                   mean: Callable = lambda e: e.mean(), samples: int | None = None) -> None:
    """The returned schedule's realised error on (this rank's) search noise, in the DP's cost view and
    precision: one sample run, its calls counted apart from the search's (metadata `error_nfe`)."""
    out = sample(model, noise, result.schedule, solver, cond, max_batch=max_batch)
    diff = (out.samples.to(dtype) - result.teacher_samples.to(dtype)).reshape(noise.shape[0], -1)
    result.error = float(mean(view(diff).pow(2).mean(-1)))
    result.schedule.metadata["error"] = result.error
    result.schedule.metadata["error_nfe"] = out.nfe * (samples or noise.shape[0])


def memory_estimate(noise: torch.Tensor, teacher_steps: int, solver: str = "euler", dp: DPOptions | None = None,
                    storage: Storage | None = None, *, steps: int = 1, method: str | None = None,
                    checkpointing: Checkpointing | None = None, model: Any = None) -> dict[str, int]:
    """Peak bytes this rank's share of a search of `noise` will hold, by place (device, host, disk), for the
    method `search` will run with these options (`estimated_method`): the plain DP (`estimate_search_bytes`),
    the validated search (`estimate_validated_bytes`; given the `model`, with its data guard's true samples
    on the host when the model offers them) or the beam DP of method "dp" with an objective or
    width (`estimate_beam_bytes` and its teacher). `steps` (M) sizes the beam DPs' layers (the default 1 is
    their largest)."""
    dp, storage = dp or DPOptions(), storage or Storage()
    chosen = estimated_method(noise, dp, storage, solver, method, checkpointing)
    solver_def = get_solver(solver)
    state_dtype = torch.promote_types(noise.dtype, torch.float32)
    batch, numel, points = noise.shape[0], noise[0].numel(), teacher_steps + 1
    if chosen == "validated":
        count, runs = validated_plan(batch, teacher_steps, steps, solver_def.name,
                                     DEFAULT_WIDTH if dp.width is None else dp.width, dp.candidates)
        out = estimate_validated_bytes(batch, count, numel, points, steps, solver_def.multistep, state_dtype,
                                       beam.BLOCK_ELEMENTS, runs, solver_def.source_corrector)
        if callable(getattr(model, "data_samples", None)):
            # the data guard: DATA_SAMPLES true samples in float64 and one set's flattened float64 copy (features
            # are smaller than samples, so samples bound them)
            out["host"] += 2 * DATA_SAMPLES * numel * 8
        return out
    if chosen == "beam":
        run = estimate_beam_bytes(batch, numel, points, steps, dp.width or 1, solver_def.multistep, state_dtype,
                                  beam.BLOCK_ELEMENTS, solver_def.source_corrector)
        return {"device": batch * points * numel * state_dtype.itemsize + run, "host": 0, "disk": 0}
    part = dd.shard(noise.shape[0], storage.distributed)
    return estimate_search_bytes(part.stop - part.start, noise[0].numel(), teacher_steps + 1, get_solver(solver).multistep,
                                 dp.cost == "x0", storage.place, storage.dtype or torch.float32,
                                 torch.promote_types(noise.dtype, torch.float32), storage.target_chunk,
                                 dp.view.dtype, get_solver(solver).source_corrector)


def estimated_method(noise: torch.Tensor, dp: DPOptions, storage: Storage, solver: str, method: str | None = None,
                     checkpointing: Checkpointing | None = None) -> str:
    """Which search `search` runs with these options: "validated", "beam" (method "dp" with an objective or
    width, on the full grid) or "dp" (the plain or reference DP)."""
    ranks = dd.shard(noise.shape[0], storage.distributed).world
    dp_only = _plain_dp_only(dp, storage, checkpointing or Checkpointing(), ranks)
    chosen = _resolve_method(method, dp, dp_only)
    if not _beyond_plain_dp(chosen, dp):
        return "dp"
    return "validated" if chosen == "validated" else "beam"


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
    options = from_flat(options)
    dp = replace(options.pop("dp", None) or DPOptions(), coarse_to_fine=fast)
    options.setdefault("method", "dp")  # coarse to fine is a way of running the plain DP
    return search(model, noise, steps, teacher_steps, solver, dp=dp, **options)
