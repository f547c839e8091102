"""The dynamic programs of the OSS search: the exact DP and the released code's (reference) DP.

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
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch
from tqdm.auto import tqdm

from . import distributed as dd
from .checkpoint import Checkpointer
from ..core.errors import OptimalStepsError
from ..core.models import end_of_step
from ..core.processes import NoiseProcess
from ..core.solvers import corrected_start, heun_coefficients, unic_correction, update_coefficients
from .memory import allocate
from .objectives import aggregate
from .teacher import Teacher, predict_chunked, reduce_device

COSTS = ("xt", "x0")
AGGREGATES = ("joint", "median")



@dataclass
class _Layer:
    """The DP's states after k steps: one per (sample, grid index); `valid` marks reachable cells."""

    states: torch.Tensor  # [B, N+1, D] flattened
    x0_prev: Optional[torch.Tensor]  # [B, N+1, D] the clean estimate the last step used (multistep solvers)
    t_prev: torch.Tensor  # [B, N+1] the time that estimate was made at (nan: none)
    x0_cache: Optional[torch.Tensor]  # [B, N+1, D] the model's estimate at the cell's state, if already known
    valid: torch.Tensor  # [N+1] bool
    # UniPC: the cell's pending UniC correction x_c = base + weight * x0 (weight nan: none, the first cell)
    correction_base: Optional[torch.Tensor] = None  # [B, N+1, D]
    correction_weight: Optional[torch.Tensor] = None  # [B, N+1] float64


def cost_view(x: torch.Tensor, cost_channels: Optional[Sequence[int]], cost_frames: Optional[Sequence[int]],
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


@dataclass
class DPContext:
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
        return dd.all_reduce_sum(local.to(reduce_device()), self.part).to(local.device)

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

    def predict(self, flat_states: torch.Tensor, t: torch.Tensor, rows: torch.Tensor,
                model: Any = None) -> torch.Tensor:
        """Clean estimates of flattened states [R, D] of samples `rows` at times t [R] (by `model`, default ctx's)."""
        x = flat_states.reshape((flat_states.shape[0],) + self.sample_shape)
        self.nfe += flat_states.shape[0]
        out = predict_chunked(model or self.model, x, t, self.cond, self.max_batch, rows)
        return out.reshape(flat_states.shape[0], -1)


def _rows(store: torch.Tensor, grid: torch.Tensor, device: torch.device, dtype: torch.dtype | None = None):
    """store[b, grid[b, j]] for every (b, j) ([B, J] grid indices), or store[:, grid] for a 1-d grid:
    a [B, J, D] block on the compute device, wherever the store lives."""
    if grid.dim() == 1:
        out = store[:, grid.to(store.device)]
    else:
        b = torch.arange(store.shape[0], device=store.device)[:, None].expand(grid.shape)
        out = store[b, grid.to(store.device)]
    return out.to(device=device, dtype=dtype or out.dtype)


def _source_estimates(ctx: DPContext, layer: _Layer, src: torch.Tensor, label: str) -> torch.Tensor:
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


def _layer_costs(ctx: DPContext, layer: _Layer, src: torch.Tensor, x0_store: torch.Tensor, tgt: torch.Tensor,
                 coefficient_solver: str, starts: Optional[torch.Tensor] = None):
    """Coefficients [B, S, J] of every (source, target) step, the stores of the vectors they multiply
    (indexed by grid point), and the xt cost [B, S, J] of every step (inf where not allowed). The steps
    start from `starts` (UniPC: the corrected states), else from the layer's states."""
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
    stores = [layer.states if starts is None else starts, x0_store]
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


def _corrected_sources(ctx: DPContext, layer: _Layer, src: torch.Tensor, x0_store: torch.Tensor) -> torch.Tensor:
    """A store [B, N+1, D] holding, at the source cells, UniPC's corrected states (the cell's pending UniC
    correction completed with the model's estimate there; the state itself where none is pending)."""
    store = ctx.layer_store("corrected", layer.states.shape)
    chunk = ctx.chunk or len(src)
    for lo in range(0, len(src), chunk):
        block = src[lo:lo + chunk]
        states = _rows(layer.states, block, ctx.device)
        weight = layer.correction_weight[:, block].to(ctx.device)
        pending = ~torch.isnan(weight)
        corrected = corrected_start(states, _rows(x0_store, block, ctx.device),
                                    (_rows(layer.correction_base, block, ctx.device),
                                     torch.where(pending, weight, torch.zeros_like(weight))))
        out = torch.where(pending[..., None], corrected, states)
        store[:, block.to(store.device)] = out.to(store.device, store.dtype)
    return store


def _store_corrections(ctx: DPContext, layer: _Layer, new: _Layer, grid: torch.Tensor, block: torch.Tensor,
                       rows: list[torch.Tensor]) -> None:
    """The new cells' pending UniC corrections, from their winning sources' corrected states, estimates and
    times (`rows`: the winners' [corrected state, x0, previous x0] rows, `grid` [B, J] their grid indices)."""
    inner = block < len(ctx.times) - 1  # no step follows the clean end: nothing to correct there
    if not bool(inner.any()):
        return
    jj = inner.nonzero().squeeze(1)
    t_from = ctx.times[grid[:, jj]].to(torch.float64)
    t = ctx.times[block[jj]].to(torch.float64)[None].expand_as(t_from)
    before = rows[2][:, jj] if len(rows) > 2 else None
    t_before = None
    if before is not None:
        b = torch.arange(grid.shape[0], device=grid.device)[:, None].expand_as(grid[:, jj])
        t_before = layer.t_prev.to(grid.device)[b, grid[:, jj]]
    base, weight = unic_correction(ctx.process, rows[0][:, jj], rows[1][:, jj], before, t_from, t, t_before)
    where = block[jj].to(new.correction_base.device)
    new.correction_base[:, where] = base.to(new.correction_base.device, new.correction_base.dtype)
    new.correction_weight[:, block[jj]] = weight.to(new.correction_weight.device, torch.float64)


def _materialise(coeffs: list[torch.Tensor], vectors: list[torch.Tensor], winner: torch.Tensor) -> torch.Tensor:
    """The states [B, J, D] stepped from the winning sources: `vectors` are the winners' rows [B, J, D],
    `winner` [B, J] their positions among the layer's sources (the coefficients' dimension 1)."""
    out = None
    for c, v in zip(coeffs, vectors):
        term = c.gather(1, winner[:, None, :]).squeeze(1).to(v.dtype)[..., None] * v
        out = term if out is None else out + term
    return out


def _exact_costs(ctx: DPContext, states: torch.Tensor, tgt: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
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


def _heun_correct(ctx: DPContext, x: torch.Tensor, x0: torch.Tensor, t_src: torch.Tensor, tgt: torch.Tensor,
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
    x0_pred = ctx.predict(flat, ctx.times[tgt[jj]].repeat(batch), rows, end_of_step(ctx.model))
    x0_pred = x0_pred.reshape(batch, len(jj), -1)
    t = t_src[:, jj]
    t_next = ctx.times[tgt[jj]][None].expand_as(t)
    a_x, a_x0, a_pred, a_x0p = (c.to(pred.dtype)[..., None] for c in heun_coefficients(ctx.process, t, t_next))
    out = predicted.clone()
    out[:, jj] = a_x * x[:, jj] + a_x0 * x0[:, jj] + a_pred * pred + a_x0p * x0_pred
    return out


def _choose(ctx: DPContext, cost: torch.Tensor) -> torch.Tensor:
    """Per-cell ranking of sources [B, S, J] -> [B, K, J] best first (shared across samples when joint)."""
    batch = cost.shape[0]
    k = min(ctx.candidates if (ctx.cost == "x0" or ctx.solver.corrector) else 1, cost.shape[1])
    scores = cost if ctx.per_sample else ctx.sample_mean(cost)[None]
    order = torch.topk(scores, k, dim=1, largest=False).indices  # ties keep the lower index first
    return order.expand(batch, -1, -1) if order.shape[0] == 1 else order


def exact_dp(ctx: DPContext):
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
    if ctx.solver.source_corrector:
        layer.correction_base = ctx.layer_store("correction-0", shape)
        layer.correction_weight = torch.full((batch, n_points), math.nan, dtype=torch.float64, device=device)
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


def _advance(ctx: DPContext, layer: _Layer, src: torch.Tensor, tgt: torch.Tensor, label: str,
             cost_table: torch.Tensor, traces: torch.Tensor, k: int) -> _Layer:
    """One DP layer: every source state takes one step to every later target; each target cell keeps its
    best. Cells are built in blocks of targets, so only a block of states is ever on the compute device."""
    x0_store = _source_estimates(ctx, layer, src, label)
    coefficient_solver = "euler" if ctx.solver.corrector else ctx.solver.name
    starts = _corrected_sources(ctx, layer, src, x0_store) if ctx.solver.source_corrector else layer.states
    coeffs, stores, cost = _layer_costs(ctx, layer, src, x0_store, tgt, coefficient_solver, starts)
    ranking = _choose(ctx, cost)  # [B, K, J] positions among the sources, best first
    new = _Layer(ctx.layer_store(f"states-{k % 2}", layer.states.shape),
                 ctx.layer_store(f"x0-prev-{k % 2}", layer.states.shape) if layer.x0_prev is not None else None,
                 torch.full_like(layer.t_prev, math.nan),
                 ctx.layer_store(f"x0-cache-{k % 2}", layer.states.shape) if ctx.cost == "x0" else None,
                 torch.zeros_like(layer.valid))
    if ctx.solver.source_corrector:
        new.correction_base = ctx.layer_store(f"correction-{k % 2}", layer.states.shape)
        new.correction_weight = torch.full_like(layer.t_prev, math.nan)
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
                extra = rows if ctx.solver.source_corrector else []  # UniPC builds the next correction from them
                candidate = (score, realised, winner, state, x0_here, rows[1], *extra)
                if best is None:
                    best = candidate
                    continue
                better = score < best[0]
                best = tuple(None if old is None else
                             torch.where(better.reshape(better.shape + (1,) * (old.dim() - 2)), cand, old)
                             for cand, old in zip(candidate, best))
        except OptimalStepsError as exc:
            raise OptimalStepsError(f"search {label}: {exc}") from None
        score, realised, winner, state, x0_here, source_x0, *rows = best
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
        if new.correction_base is not None:
            _store_corrections(ctx, layer, new, grid, block, rows)
        if new.x0_cache is not None:
            # the next layer's sources need exactly these estimates: reuse them instead of calling again
            new.x0_cache[:, where] = x0_here.to(new.x0_cache.device, new.x0_cache.dtype)
    return new


def reference_dp(ctx: DPContext):
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


def trace_path(trace: torch.Tensor, steps: int, n: int, reference: bool, free_start: bool = False) -> list[int]:
    """Grid indices start -> clean end, traced back from cell (steps, n) through `trace` [M+1, N+1]."""
    path = [n]
    for k in range(steps, 0, -1):
        path.append(int(trace[k, path[-1]]))
    path.reverse()
    if not reference and ((path[0] != 0 and not free_start) or any(b <= a for a, b in zip(path, path[1:]))):
        raise RuntimeError(f"internal error: traced path {path} is not a valid {steps}-step path")
    return path


def median_path(per_sample: list[list[int]]) -> list[int]:
    """Per-position median of index lists (lower middle pair averaged down for even counts); stays strictly
    increasing because every order statistic of strictly increasing sequences is."""
    table = torch.tensor(per_sample, dtype=torch.long).sort(dim=0).values
    count = table.shape[0]
    if count % 2:
        return table[count // 2].tolist()
    return ((table[count // 2 - 1] + table[count // 2]) // 2).tolist()


def median_candidates(per_sample: list[list[int]]) -> list[list[int]]:
    """What the median mode chooses from under an objective: the per-position median path first, then every
    distinct per-sample path (each sample's own optimum) in sample order."""
    out = [median_path(per_sample)]
    for path in per_sample:
        if list(path) not in out:
            out.append(list(path))
    return out


def choose_path(errors: torch.Tensor, objective: str) -> int:
    """The position of the candidate whose per-sample errors (row of [P, B]) have the lowest objective; the
    first on ties, so the median path wins when nothing beats it."""
    return int(torch.argmin(aggregate(errors, objective)))


def reference_median(per_sample: list[list[int]]) -> list[int]:
    """The released code's `(l[n//2] + l[n//2 - 1]) // 2` on its own index order (clean end = 0), for any n."""
    n = max(max(p) for p in per_sample)
    theirs = torch.tensor([[n - i for i in p] for p in per_sample], dtype=torch.long).sort(dim=0).values
    count = theirs.shape[0]
    mid = (theirs[count // 2] + theirs[count // 2 - 1]) // 2
    return [n - int(v) for v in mid]
