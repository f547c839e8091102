"""Optimal Stepsize Distillation: choose M of a teacher's N grid points by dynamic programming.

The teacher runs once on the search noise with the student's solver. Cell (k, j) of the DP holds the
best student state at teacher index j reached in exactly k student steps (grid indices run from the
start, 0, to the clean end, N) and the source index it came from. A transition i -> j is one student
step with the chosen solver, scored against the teacher's state at j; each cell keeps its argmin, and
the schedule is the path traced back from (M, N).

Efficiency: one batched model call per layer evaluates every reachable source state of every sample;
since a solver step is linear in (state, x0, previous x0), the squared distance of every
(source, target) pair expands into a few Gram and matrix products, so no N^2 candidate states are ever
built: only the winning state of each cell is. Memory is O(N * B * D).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch
from tqdm.auto import tqdm

from . import distributed as dd
from .checkpoint import Checkpointer, fingerprint
from ..core.errors import OptimalStepsError
from .memory import allocate, check_fits, check_storage, estimate_search_bytes, storage_dtype as parse_storage_dtype
from ..core.models import index_cond, model_process, predict_x0
from ..core.processes import NoiseProcess
from ..core.schedules import Schedule, check_steps, karras, uniform
from ..core.solvers import (get_solver, heun_coefficients, initial_state, nfe_per_trajectory, solver_step,
                      update_coefficients)

COSTS = ("xt", "x0")
AGGREGATES = ("joint", "median")


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


def default_teacher_schedule(process: NoiseProcess, teacher_steps: int) -> Schedule:
    """The default teacher grid: uniform native time for flow / vp, Karras rho = 7 (80 -> 0.002, then 0) for ve."""
    if process.kind == "ve":
        return karras(process, teacher_steps, sigma_min=0.002, sigma_max=min(80.0, process.t_start))
    return uniform(process, teacher_steps)


teacher_schedule = default_teacher_schedule


@dataclass
class Teacher:
    states: torch.Tensor  # [B, N+1, ...] the teacher trajectory at every grid point
    x0: Optional[torch.Tensor]  # [B, N+1, ...] its clean estimates (the state itself at the end), if kept
    nfe: int  # per sample


def run_teacher(model: Any, noise: torch.Tensor, teacher: Schedule, solver: str, cond: dict | None = None,
                progress: bool = False, max_batch: int = 4096, storage_dtype: torch.dtype | None = None,
                storage: str = "memory", storage_dir: str | None = None, keep_x0: bool = True) -> Teacher:
    """The teacher trajectory with the student's solver, keeping its states (and clean estimates) in the
    chosen storage and precision; the teacher itself always steps in float32 or better."""
    process = model_process(model)
    times = teacher.times.tolist()
    x = initial_state(process, noise, times[0])
    dtype = storage_dtype or x.dtype
    shape = (x.shape[0], len(times)) + tuple(x.shape[1:])
    states = allocate(shape, dtype, x.device, storage, storage_dir, "teacher-states")
    x0s = allocate(shape, dtype, x.device, storage, storage_dir, "teacher-x0") if keep_x0 else None
    states[:, 0] = x
    x0_prev, t_prev, nfe = None, None, 0
    for i in tqdm(range(len(times) - 1), desc="teacher", disable=not progress, leave=False):
        try:
            x0 = _predict_chunked(model, x, torch.full((x.shape[0],), times[i], dtype=torch.float64), cond, max_batch)
            out = solver_step(solver, model, x, times[i], times[i + 1], x0=x0, x0_prev=x0_prev, t_prev=t_prev,
                              cond=cond)
        except OptimalStepsError as exc:
            raise OptimalStepsError(f"teacher step {i + 1} of {len(times) - 1}: {exc}") from None
        if x0s is not None:
            x0s[:, i] = x0
        x, x0_prev, t_prev, nfe = out.x, x0, times[i], nfe + out.nfe + 1
        states[:, i + 1] = x
    if x0s is not None:
        x0s[:, -1] = x
    return Teacher(states, x0s, nfe)


def _predict_chunked(model: Any, x: torch.Tensor, t: torch.Tensor, cond: dict | None, max_batch: int,
                     rows: torch.Tensor | None = None) -> torch.Tensor:
    """predict_x0 in chunks of at most max_batch states; `rows` maps each state to its sample's condition."""
    out = []
    for start in range(0, x.shape[0], max_batch):
        stop = min(start + max_batch, x.shape[0])
        sub_cond = cond
        if cond:
            idx = rows[start:stop] if rows is not None else torch.arange(start, stop)
            sub_cond = index_cond(cond, idx)
        out.append(predict_x0(model, x[start:stop], t[start:stop], sub_cond))
    return torch.cat(out) if len(out) > 1 else out[0]


def amplitude_statistics(states: torch.Tensor, low: float = 0.05, high: float = 0.95,
                         part: dd.Shard | None = None) -> dict[str, list[float]]:
    """Per grid index, the mean over samples (of all ranks) of each sample's low / high quantile of its
    state (paper sec. 3.4)."""
    sums = torch.zeros(2, states.shape[1], dtype=torch.float64)
    for b in range(states.shape[0]):  # one sample at a time: quantile copies its input
        flat = states[b].reshape(states.shape[1], -1).to(torch.float32)
        sums += torch.quantile(flat, torch.tensor([low, high], dtype=torch.float32, device=flat.device),
                               dim=-1).cpu().double()
    count = states.shape[0]
    if part is not None and part.active:
        sums = dd.all_reduce_sum(sums.to(_reduce_device()), part).cpu()
        count = part.total
    mean = sums / count
    return {"q05": mean[0].tolist(), "q95": mean[1].tolist()}


def _reduce_device() -> torch.device:
    """Where collective tensors must live: the GPU for NCCL, the CPU for gloo."""
    import torch.distributed as dist

    if dd.is_distributed() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# ------------------------------------------------------------------------------------ the DP


@dataclass
class _Layer:
    """The DP's states after k steps: one per (sample, grid index); `valid` marks reachable cells."""

    states: torch.Tensor  # [B, N+1, D] flattened
    x0_prev: Optional[torch.Tensor]  # [B, N+1, D] the clean estimate the last step used (multistep solvers)
    t_prev: torch.Tensor  # [B, N+1] the time that estimate was made at (nan: none)
    x0_cache: Optional[torch.Tensor]  # [B, N+1, D] the model's estimate at the cell's state, if already known
    valid: torch.Tensor  # [N+1] bool


def _cost_view(x: torch.Tensor, cost_channels: Optional[Sequence[int]], cost_frames: Optional[Sequence[int]],
               sample_shape: tuple[int, ...]) -> torch.Tensor:
    """The part of flattened states [..., D] that the cost sees: chosen channels (dim 0 of a sample) and
    frames (dim 1 of a 4-d [C, F, H, W] sample), as the authors' video search does."""
    if cost_channels is None and cost_frames is None:
        return x
    lead = x.shape[:-1]
    view = x.reshape(lead + tuple(sample_shape))
    nd = len(lead)
    if cost_channels is not None:
        view = view.index_select(nd, torch.as_tensor(list(cost_channels), device=x.device))
    if cost_frames is not None:
        view = view.index_select(nd + 1, torch.as_tensor(list(cost_frames), device=x.device))
    return view.reshape(lead + (-1,))


def _pair_costs(coeffs: list[torch.Tensor], vectors: list[torch.Tensor], targets: torch.Tensor,
                targets_sq: torch.Tensor) -> torch.Tensor:
    """Mean squared distance between sum_a c_a[b,i,j] v_a[b,i] and targets[b,j] for every (b, i, j),
    by expanding the square: Gram terms per source and one batched matrix product per vector."""
    dim = targets.shape[-1]
    cost = targets_sq[:, None, :].clone()
    for a, (ca, va) in enumerate(zip(coeffs, vectors)):
        cost = cost - 2.0 * ca * torch.bmm(va, targets.transpose(1, 2))
        for b in range(a, len(vectors)):
            gram = (va * vectors[b]).sum(-1)[..., None]
            cost = cost + (1.0 if a == b else 2.0) * ca * coeffs[b] * gram
    return (cost / dim).clamp(min=0.0)


def search(model: Any, noise: torch.Tensor, steps: int, teacher_steps: int = 200, solver: str = "euler",
           teacher_schedule: Schedule | None = None, cond: dict | None = None, cost: str = "xt",
           aggregate: str = "joint", reference_compat: bool = False, max_batch: int = 4096,
           candidates: int = 4, cost_channels: Optional[Sequence[int]] = None,
           cost_frames: Optional[Sequence[int]] = None, cost_dtype: torch.dtype = torch.float64,
           progress: bool = False, seed: int | None = None, storage: str = "memory",
           storage_dtype: torch.dtype | str | None = None, storage_dir: str | None = None,
           target_chunk: int | None = None, memory_limit: int | None = None, checkpoint_dir: str | None = None,
           resume: bool = False, distributed: bool = True,
           callback: Optional[Callable[[str, int, int], None]] = None, refine: Any = False,
           refine_budget: int | None = None, coarse_to_fine: Any = False, free_start: bool = False,
           method: str = "validated", objective: str | None = None, width: int | None = None) -> SearchResult:
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
    - `method`: "validated" (default: candidates of every kind, the winner on a validation set, within twice
      the plain DP's model calls; optimize/select.py) or "dp" (the paper's plain DP, for reproduction);
      `objective` ("mse", "log", "tail"; default "log" validated, "mse" dp) and `width` (histories kept per
      cell; default 4 validated, 1 dp) choose the DP's aggregation and beam (optimize/beam.py).
    - `callback(stage, done, total)` is called after the teacher ("teacher") and after each layer ("layer").
    - `coarse_to_fine` (True or a `refine.CoarseToFine`): the DP on a coarse sub-grid, then on bands around
      its choices (far fewer model calls); `refine` (True or a `refine.Refinement`): then optimise the
      times off the grid on the search samples, within `refine_budget` model calls (docs/refine.md).
    """
    started = time.perf_counter()
    process = model_process(model)
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
    storage_dtype = parse_storage_dtype(storage_dtype)
    check_storage(storage)
    for key, value in (cond or {}).items():
        if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] not in (1, batch):
            raise OptimalStepsError(f"condition {key!r} has {value.shape[0]} rows but there are {batch} noise samples")
    if teacher_schedule is None:
        teacher_steps = check_steps(teacher_steps)
        teacher = default_teacher_schedule(process, teacher_steps)
    else:
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
    if reference_compat and (refine or coarse_to_fine):
        raise OptimalStepsError("--refine and --coarse-to-fine work on the exact DP, not with --reference-compat")

    if not reference_compat and (method != "dp" or objective not in (None, "mse") or width not in (None, 1)):
        from .select import search_hook

        dp_options = {"cost": cost != "xt", "aggregate": aggregate != "joint", "refine": bool(refine),
                      "coarse_to_fine": bool(coarse_to_fine), "storage": storage != "memory",
                      "storage_dtype": storage_dtype is not None, "target_chunk": target_chunk is not None,
                      "checkpoint_dir": checkpoint_dir is not None, "cost_channels": cost_channels is not None,
                      "cost_frames": cost_frames is not None, "ranks": dd.shard(batch, distributed).world > 1}
        return search_hook(method, model, noise, steps, teacher, solver_def.name, cond, objective, width, free_start,
                           seed, candidates, max_batch, progress, callback, [k for k, v in dp_options.items() if v])
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
        settings = {"model": str(getattr(model, "spec", type(model).__name__)), "steps": steps,
                    "teacher_steps": teacher_steps, "teacher_times": fingerprint(teacher.times),
                    "samples": batch, "seed": seed, "noise": fingerprint(noise), "solver": solver_def.name,
                    "cost": cost, "aggregate": aggregate, "reference_compat": reference_compat,
                    "free_start": free_start,
                    "candidates": candidates, "ranks": part.world}
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
    ctx = _Context(model=model, process=process, solver=solver_def, times=teacher.times.to(noise.device),
                   teacher=teacher_run, cond=local_cond, cost=cost, per_sample=per_sample, steps=steps,
                   max_batch=max_batch, candidates=candidates,
                   view=lambda x: _cost_view(x, cost_channels, cost_frames, sample_shape),
                   cost_dtype=cost_dtype, progress=progress, sample_shape=sample_shape, part=part,
                   chunk=target_chunk, storage=storage, storage_dir=storage_dir, checkpointer=checkpointer,
                   callback=callback, free_start=free_start and not reference_compat,
                   device=noise.device, start=initial_state(process, local_noise, float(teacher.times[0])))
    fast = None
    if coarse_to_fine:
        from .refine import coarse_to_fine_dp

        traces, cost_table, search_nfe, fast = coarse_to_fine_dp(ctx, coarse_to_fine)
    else:
        traces, cost_table, search_nfe = (_reference_dp if reference_compat else _exact_dp)(ctx)

    per_sample_indices = None
    last_layer = steps if not reference_compat else -1
    if ctx.per_sample:
        local = [_trace(traces[b], steps, teacher_steps, reference_compat, free_start)
                 for b in range(traces.shape[0])]
        per_sample_indices = [ix for chunk in dd.all_gather_objects(local, part) for ix in chunk]
        indices = (_reference_median if reference_compat else _median)(per_sample_indices)
        final_cost = float(ctx.sample_mean(cost_table[:, last_layer, teacher_steps]))
    else:
        indices = _trace(traces, steps, teacher_steps, False, free_start)
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
    if refine:
        from .refine import refine_search_result

        result = refine_search_result(model, noise, result, solver_def.name, refine_budget, cond, max_batch, progress,
                                      refine)
    return result


def memory_estimate(noise: torch.Tensor, teacher_steps: int, solver: str = "euler", cost: str = "xt",
                    storage: str = "memory", storage_dtype: torch.dtype | str | None = None,
                    target_chunk: int | None = None, cost_dtype: torch.dtype = torch.float64) -> dict[str, int]:
    """Peak bytes a search of these (this rank's) noise samples will hold, by place (device, host, disk)."""
    return estimate_search_bytes(noise.shape[0], noise[0].numel(), teacher_steps + 1, get_solver(solver).multistep,
                                 cost == "x0", check_storage(storage), parse_storage_dtype(storage_dtype) or
                                 torch.float32, torch.promote_types(noise.dtype, torch.float32), target_chunk,
                                 cost_dtype)


@dataclass
class _Context:
    model: Any
    process: NoiseProcess
    solver: Any
    times: torch.Tensor
    teacher: Teacher
    cond: dict | None
    cost: str
    per_sample: bool
    steps: int
    max_batch: int
    candidates: int
    view: Any
    cost_dtype: torch.dtype
    progress: bool
    sample_shape: tuple[int, ...]
    part: dd.Shard
    chunk: Optional[int]  # sources / targets per block (None: all at once)
    storage: str
    storage_dir: Optional[str]
    checkpointer: Optional[Checkpointer]
    callback: Optional[Callable[[str, int, int], None]]
    device: torch.device
    start: torch.Tensor  # the initial states of this rank's samples, exact (not from lower-precision storage)
    nfe: int = 0
    cells: Optional[torch.Tensor] = None  # [M+1, N+1] bool: the only cells the DP may fill (coarse to fine)
    free_start: bool = False  # the first step may start from the initial state placed at a later grid point

    def global_sum(self, local: torch.Tensor) -> torch.Tensor:
        if not self.part.active:
            return local
        return dd.all_reduce_sum(local.to(_reduce_device()), self.part).to(local.device)

    def sample_mean(self, per_sample: torch.Tensor) -> torch.Tensor:
        """The mean over all samples of all ranks of a per-sample tensor [B_local, ...]."""
        return self.global_sum(per_sample.to(torch.float64).sum(0)) / self.part.total

    def teacher_rows(self, tgt: torch.Tensor, which: str = "states") -> torch.Tensor:
        """Teacher states (or clean estimates) at grid indices tgt, flattened [B, J, D], on the compute
        device in float32 or better, wherever and however they are stored."""
        store = self.teacher.states if which == "states" else self.teacher.x0
        rows = store[:, tgt.to(store.device)]
        dtype = torch.promote_types(rows.dtype, torch.float32)
        return rows.to(device=self.device, dtype=dtype).reshape(rows.shape[0], len(tgt), -1)

    def layer_store(self, name: str, shape: torch.Size) -> torch.Tensor:
        """A [B, N+1, D] store of DP states, in the chosen storage (float32 or better: states stay exact)."""
        dtype = self.start.dtype
        if self.storage == "memory":
            return torch.zeros(shape, dtype=dtype, device=self.device)
        return allocate(tuple(shape), dtype, self.device, self.storage, self.storage_dir, f"dp-{name}")

    def after_layer(self, k: int, payload: dict[str, Any]) -> None:
        if self.checkpointer is not None:
            self.checkpointer.save(f"layer-{k:04d}", {"k": k, "nfe": self.nfe, **payload})
        if self.callback is not None:
            self.callback("layer", k, self.steps)

    def predict(self, flat_states: torch.Tensor, t: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Clean estimates of flattened states [R, D] of samples `rows` at times t [R]."""
        x = flat_states.reshape((flat_states.shape[0],) + self.sample_shape)
        self.nfe += flat_states.shape[0]
        return _predict_chunked(self.model, x, t, self.cond, self.max_batch, rows).reshape(flat_states.shape[0], -1)


def _rows(store: torch.Tensor, grid: torch.Tensor, device: torch.device, dtype: torch.dtype | None = None):
    """store[b, grid[b, j]] for every (b, j) ([B, J] grid indices), or store[:, grid] for a 1-d grid:
    a [B, J, D] block on the compute device, wherever the store lives."""
    if grid.dim() == 1:
        out = store[:, grid.to(store.device)]
    else:
        b = torch.arange(store.shape[0], device=store.device)[:, None].expand(grid.shape)
        out = store[b, grid.to(store.device)]
    return out.to(device=device, dtype=dtype or out.dtype)


def _source_estimates(ctx: _Context, layer: _Layer, src: torch.Tensor, label: str) -> torch.Tensor:
    """The store [B, N+1, D] holding x0 at every source cell: the re-ranking's cache where it evaluated them
    already, else batched model calls over blocks of sources."""
    if layer.x0_cache is not None:
        return layer.x0_cache
    batch = layer.states.shape[0]
    store = ctx.layer_store("x0-src", layer.states.shape)
    chunk = ctx.chunk or len(src)
    try:
        for lo in range(0, len(src), chunk):
            block = src[lo:lo + chunk]
            states = _rows(layer.states, block, ctx.device).reshape(batch * len(block), -1)
            rows = torch.arange(batch, device=ctx.device).repeat_interleave(len(block))
            x0 = ctx.predict(states, ctx.times[block].repeat(batch), rows).reshape(batch, len(block), -1)
            store[:, block.to(store.device)] = x0.to(store.device, store.dtype)
    except OptimalStepsError as exc:
        raise OptimalStepsError(f"search {label}: {exc}") from None
    return store


def _layer_costs(ctx: _Context, layer: _Layer, src: torch.Tensor, x0_store: torch.Tensor, tgt: torch.Tensor,
                 coefficient_solver: str):
    """Coefficients [B, S, J] of every (source, target) step, the stores of the vectors they multiply
    (indexed by grid point), and the xt cost [B, S, J] of every step (inf where not allowed)."""
    t_src = ctx.times[src][None, :, None]
    t_tgt = ctx.times[tgt][None, None, :]
    t_prev = layer.t_prev[:, src][..., None] if layer.x0_prev is not None else None
    if t_prev is not None and torch.isnan(t_prev).all():
        t_prev = None
    if t_prev is not None:
        t_prev = torch.where(torch.isnan(t_prev), t_src.expand_as(t_prev), t_prev)
    coeffs = list(update_coefficients(coefficient_solver, ctx.process, t_src, t_tgt, t_prev))
    batch = layer.states.shape[0]
    coeffs = [c.expand(batch, len(src), len(tgt)) if c.shape[0] == 1 else c for c in coeffs]
    stores = [layer.states, x0_store]
    if layer.x0_prev is not None and t_prev is not None:
        stores.append(layer.x0_prev)
    else:
        coeffs = coeffs[:2]
    dt = ctx.cost_dtype
    # blocks of sources x targets bound the wide (cost dtype) copies to chunk * B * D each
    chunk = ctx.chunk or max(len(tgt), len(src))
    cost = torch.empty((batch, len(src), len(tgt)), dtype=dt, device=ctx.device)
    for lo in range(0, len(tgt), chunk):
        targets = ctx.view(ctx.teacher_rows(tgt[lo:lo + chunk])).to(dt)
        targets_sq = (targets * targets).sum(-1)
        for so in range(0, len(src), chunk):
            wide = [ctx.view(_rows(store, src[so:so + chunk], ctx.device, dt)) for store in stores]
            cost[:, so:so + chunk, lo:lo + chunk] = _pair_costs(
                [c[:, so:so + chunk, lo:lo + chunk].to(dt) for c in coeffs], wide, targets, targets_sq)
    allowed = (src[:, None] < tgt[None, :]) & layer.valid[src][:, None]
    cost = torch.where(allowed[None], cost, torch.full_like(cost, math.inf))
    return coeffs, stores, cost


def _materialise(coeffs: list[torch.Tensor], vectors: list[torch.Tensor], winner: torch.Tensor) -> torch.Tensor:
    """The states [B, J, D] stepped from the winning sources: `vectors` are the winners' rows [B, J, D],
    `winner` [B, J] their positions among the layer's sources (the coefficients' dimension 1)."""
    out = None
    for c, v in zip(coeffs, vectors):
        term = c.gather(1, winner[:, None, :]).squeeze(1).to(v.dtype)[..., None] * v
        out = term if out is None else out + term
    return out


def _exact_costs(ctx: _Context, states: torch.Tensor, tgt: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Realised cost [B, J] of states [B, J, D] at targets, and the model's x0 there if the cost needed it."""
    batch = states.shape[0]
    if ctx.cost == "xt":
        diff = ctx.view(states).to(ctx.cost_dtype) - ctx.view(ctx.teacher_rows(tgt)).to(ctx.cost_dtype)
        return diff.pow(2).mean(-1), None
    # x0 cost: the model's clean estimate at the candidate against the teacher's at the same grid point;
    # at the clean end the state is its own clean estimate
    inner = tgt < len(ctx.times) - 1
    x0 = states.clone()
    if bool(inner.any()):
        jj = inner.nonzero().squeeze(1)
        flat = states[:, jj].reshape(batch * len(jj), -1)
        rows = torch.arange(batch, device=states.device).repeat_interleave(len(jj))
        x0[:, jj] = ctx.predict(flat, ctx.times[tgt[jj]].repeat(batch), rows).reshape(batch, len(jj), -1)
    teacher_x0 = ctx.teacher_rows(tgt, "x0")
    diff = ctx.view(x0).to(ctx.cost_dtype) - ctx.view(teacher_x0).to(ctx.cost_dtype)
    return diff.pow(2).mean(-1), x0


def _heun_correct(ctx: _Context, x: torch.Tensor, x0: torch.Tensor, t_src: torch.Tensor, tgt: torch.Tensor,
                  predicted: torch.Tensor) -> torch.Tensor:
    """Heun's corrector for the predicted states [B, J, D] stepped from (x, x0) at times t_src [B, J]; the
    step into the clean end stays Euler."""
    batch = predicted.shape[0]
    inner = tgt < len(ctx.times) - 1
    if not bool(inner.any()):
        return predicted
    jj = inner.nonzero().squeeze(1)
    pred = predicted[:, jj]
    flat = pred.reshape(batch * len(jj), -1)
    rows = torch.arange(batch, device=flat.device).repeat_interleave(len(jj))
    x0_pred = ctx.predict(flat, ctx.times[tgt[jj]].repeat(batch), rows).reshape(batch, len(jj), -1)
    t = t_src[:, jj]
    t_next = ctx.times[tgt[jj]][None].expand_as(t)
    a_x, a_x0, a_pred, a_x0p = (c.to(pred.dtype)[..., None] for c in heun_coefficients(ctx.process, t, t_next))
    out = predicted.clone()
    out[:, jj] = a_x * x[:, jj] + a_x0 * x0[:, jj] + a_pred * pred + a_x0p * x0_pred
    return out


def _choose(ctx: _Context, cost: torch.Tensor) -> torch.Tensor:
    """Per-cell ranking of sources [B, S, J] -> [B, K, J] best first (shared across samples when joint)."""
    batch = cost.shape[0]
    k = min(ctx.candidates if (ctx.cost == "x0" or ctx.solver.corrector) else 1, cost.shape[1])
    scores = cost if ctx.per_sample else ctx.sample_mean(cost)[None]
    order = torch.topk(scores, k, dim=1, largest=False).indices  # ties keep the lower index first
    return order.expand(batch, -1, -1) if order.shape[0] == 1 else order


def _exact_dp(ctx: _Context):
    """The DP with exactly-k-step cells, one state per cell, starting from the real initial state at the
    start (or, with `free_start`, from the same state placed at any grid point that leaves room for M steps)."""
    batch = ctx.start.shape[0]
    n_points = len(ctx.times)
    n, m = n_points - 1, ctx.steps
    device = ctx.device
    flat_start = ctx.start.reshape(batch, -1)
    shape = torch.Size((batch, n_points, flat_start.shape[1]))
    states = ctx.layer_store("states-0", shape)
    starts = n - m + 1 if ctx.free_start else 1
    states[:, :starts] = flat_start.to(states.device)[:, None]
    valid = torch.zeros(n_points, dtype=torch.bool, device=device)
    valid[:starts] = True
    layer = _Layer(states, ctx.layer_store("x0-prev-0", shape) if ctx.solver.multistep else None,
                   torch.full((batch, n_points), math.nan, dtype=torch.float64, device=device), None, valid)
    table_shape = (batch, m + 1, n_points) if ctx.per_sample else (m + 1, n_points)
    cost_table = torch.full(table_shape, math.inf, dtype=torch.float64)
    traces = torch.full((batch, m + 1, n_points), -1, dtype=torch.long)
    cost_table[..., 0, :starts] = 0.0
    done = 0
    if ctx.checkpointer is not None:
        done, saved = ctx.checkpointer.latest_layer(m)
        if saved is not None:
            layer = _Layer(**{key: (value.to(device) if isinstance(value, torch.Tensor) and
                                    (ctx.storage == "memory" or value.dim() < 3) else value)
                              for key, value in saved["layer"].items()})
            cost_table, traces, ctx.nfe = saved["cost_table"], saved["traces"], int(saved["nfe"])
    for k in tqdm(range(done + 1, m + 1), desc="search", disable=not ctx.progress, leave=False,
                  initial=done, total=m):
        # a source must be reachable in k-1 steps and leave room for the remaining ones
        src = torch.arange(k - 1, n - m + k, device=device)
        src = src[layer.valid[src]]
        tgt = torch.arange(k, n - m + k + 1, device=device) if k < m else torch.tensor([n], device=device)
        if ctx.cells is not None:
            tgt = tgt[ctx.cells[k, tgt]]
        layer = _advance(ctx, layer, src, tgt, f"layer {k}", cost_table, traces, k)
        ctx.after_layer(k, {"layer": {key: (value.cpu() if isinstance(value, torch.Tensor) else value)
                                      for key, value in vars(layer).items()},
                            "cost_table": cost_table, "traces": traces})
    return traces if ctx.per_sample else traces[0], cost_table, ctx.nfe


def _advance(ctx: _Context, layer: _Layer, src: torch.Tensor, tgt: torch.Tensor, label: str,
             cost_table: torch.Tensor, traces: torch.Tensor, k: int) -> _Layer:
    """One DP layer: every source state takes one step to every later target; each target cell keeps its
    best. Cells are built in blocks of targets, so only a block of states is ever on the compute device."""
    x0_store = _source_estimates(ctx, layer, src, label)
    coefficient_solver = "euler" if ctx.solver.corrector else ctx.solver.name
    coeffs, stores, cost = _layer_costs(ctx, layer, src, x0_store, tgt, coefficient_solver)
    ranking = _choose(ctx, cost)  # [B, K, J] positions among the sources, best first
    new = _Layer(ctx.layer_store(f"states-{k % 2}", layer.states.shape),
                 ctx.layer_store(f"x0-prev-{k % 2}", layer.states.shape) if layer.x0_prev is not None else None,
                 torch.full_like(layer.t_prev, math.nan),
                 ctx.layer_store(f"x0-cache-{k % 2}", layer.states.shape) if ctx.cost == "x0" else None,
                 torch.zeros_like(layer.valid))
    chunk = ctx.chunk or len(tgt)
    for lo in range(0, len(tgt), chunk):
        block = tgt[lo:lo + chunk]
        best = None  # (score, cost, position, state, x0 at the state, source x0)
        try:
            for r in range(ranking.shape[1]):
                winner = ranking[:, r, lo:lo + chunk]  # [B, Jc]
                grid = src[winner]
                rows = [_rows(store, grid, ctx.device) for store in stores]
                state = _materialise([c[..., lo:lo + chunk] for c in coeffs], rows, winner)
                if ctx.solver.corrector:
                    state = _heun_correct(ctx, rows[0], rows[1], ctx.times[grid], block, state)
                realised, x0_here = _exact_costs(ctx, state, block)
                feasible = torch.isfinite(cost[..., lo:lo + chunk].gather(1, winner[:, None, :]).squeeze(1))
                realised = torch.where(feasible, realised, torch.full_like(realised, math.inf))
                # joint: a candidate is judged by its mean over all samples (of all ranks)
                score = realised if ctx.per_sample else ctx.sample_mean(realised)[None].expand_as(realised)
                candidate = (score, realised, winner, state, x0_here, rows[1])
                if best is None:
                    best = candidate
                    continue
                better = score < best[0]
                best = tuple(None if old is None else
                             torch.where(better.reshape(better.shape + (1,) * (old.dim() - 2)), cand, old)
                             for cand, old in zip(candidate, best))
        except OptimalStepsError as exc:
            raise OptimalStepsError(f"search {label}: {exc}") from None
        score, realised, winner, state, x0_here, source_x0 = best
        where = block.to(new.states.device)
        new.states[:, where] = state.to(new.states.device, new.states.dtype)
        new.valid[block] = torch.isfinite(score).any(0)
        grid = src[winner]
        traces[:, k, block.cpu()] = grid.cpu()
        if ctx.per_sample:
            cost_table[:, k, block.cpu()] = realised.cpu()
        else:
            cost_table[k, block.cpu()] = score[0].cpu()
        if new.x0_prev is not None:
            new.x0_prev[:, where] = source_x0.to(new.x0_prev.device, new.x0_prev.dtype)
        new.t_prev[:, block] = ctx.times[grid].to(torch.float64)
        if new.x0_cache is not None:
            # the next layer's sources need exactly these estimates: reuse them instead of calling again
            new.x0_cache[:, where] = x0_here.to(new.x0_cache.device, new.x0_cache.dtype)
    return new


def _reference_dp(ctx: _Context):
    """The released code's semantics, per sample: every layer may start from the raw initial state placed at
    any grid point, cells keep the best of "at most k" steps (layers copy the previous one), and a candidate
    replaces a cell only when strictly better."""
    batch = ctx.start.shape[0]
    n_points = len(ctx.times)
    n, m = n_points - 1, ctx.steps
    device = ctx.device
    flat_start = ctx.start.reshape(batch, 1, -1)
    states = flat_start.expand(batch, n_points, flat_start.shape[-1]).clone()
    best = torch.full((batch, n_points), math.inf, dtype=torch.float64)
    trace = torch.zeros((batch, n_points), dtype=torch.long)  # untouched cells point at the start index
    cost_table = torch.full((batch, m + 1, n_points), math.inf, dtype=torch.float64)
    traces = torch.zeros((batch, m + 1, n_points), dtype=torch.long)
    done = 0
    if ctx.checkpointer is not None:
        done, saved = ctx.checkpointer.latest_layer(m)
        if saved is not None:
            states, best, trace = saved["states"].to(device), saved["best"], saved["trace"]
            cost_table, traces, ctx.nfe = saved["cost_table"], saved["traces"], int(saved["nfe"])
    src = torch.arange(0, n, device=device)
    tgt = torch.arange(1, n + 1, device=device)
    for k in tqdm(range(done + 1, m + 1), desc="search (reference)", disable=not ctx.progress, leave=False,
                  initial=done, total=m):
        layer = _Layer(states, None, torch.full((batch, n_points), math.nan, dtype=torch.float64), None,
                       torch.ones(n_points, dtype=torch.bool, device=device))
        x0_store = _source_estimates(ctx, layer, src, f"layer {k}")
        coeffs, stores, cost = _layer_costs(ctx, layer, src, x0_store, tgt, "euler")
        winner = cost.argmin(1)  # [B, J]; the lowest (noisiest) index wins ties, as in the released loop
        state = _materialise(coeffs, [_rows(store, src[winner], device) for store in stores], winner)
        realised, _ = _exact_costs(ctx, state, tgt)
        better = realised.cpu() < best[:, tgt]
        new_states = states.clone()
        new_states[:, tgt] = torch.where(better[..., None].to(device), state.to(states.dtype), states[:, tgt])
        best[:, tgt] = torch.where(better, realised.cpu(), best[:, tgt])
        trace[:, tgt] = torch.where(better, src[winner].cpu(), trace[:, tgt])
        states = new_states
        states[:, 0] = flat_start[:, 0]  # the start cell is never a target: it keeps the raw initial state
        cost_table[:, k] = best
        traces[:, k] = trace
        ctx.after_layer(k, {"states": states.cpu(), "best": best, "trace": trace, "cost_table": cost_table,
                            "traces": traces})
    return traces, cost_table, ctx.nfe


def _trace(trace: torch.Tensor, steps: int, n: int, reference: bool, free_start: bool = False) -> list[int]:
    """Grid indices start -> clean end, traced back from cell (steps, n) through `trace` [M+1, N+1]."""
    path = [n]
    for k in range(steps, 0, -1):
        path.append(int(trace[k, path[-1]]))
    path.reverse()
    if not reference and ((path[0] != 0 and not free_start) or any(b <= a for a, b in zip(path, path[1:]))):
        raise RuntimeError(f"internal error: traced path {path} is not a valid {steps}-step path")
    return path


def _median(per_sample: list[list[int]]) -> list[int]:
    """Per-position median of index lists (lower middle pair averaged down for even counts); stays strictly
    increasing because every order statistic of strictly increasing sequences is."""
    table = torch.tensor(per_sample, dtype=torch.long).sort(dim=0).values
    count = table.shape[0]
    if count % 2:
        return table[count // 2].tolist()
    return ((table[count // 2 - 1] + table[count // 2]) // 2).tolist()


def _reference_median(per_sample: list[list[int]]) -> list[int]:
    """The released code's `(l[n//2] + l[n//2 - 1]) // 2` on its own index order (clean end = 0), for any n."""
    n = max(max(p) for p in per_sample)
    theirs = torch.tensor([[n - i for i in p] for p in per_sample], dtype=torch.long).sort(dim=0).values
    count = theirs.shape[0]
    mid = (theirs[count // 2] + theirs[count // 2 - 1]) // 2
    return [n - int(v) for v in mid]


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
