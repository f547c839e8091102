"""A DP over the teacher grid that keeps the `width` best histories per cell: an optimiser for multistep solvers.

Cell (k, j) holds up to `width` partial schedules that reach grid point j in exactly k steps, each with
its own per-sample states (and, for DPM-Solver++(2M), the previous clean estimate and its time), ranked
by an objective (optimize/objectives.py) of the per-sample errors against the teacher at j. With width
1 this is the plain DP of optimize/search.py (one state per cell); a history that is worse now but
better later survives as long as it is among the `width` best of its cell, so once the width reaches
the number of paths into a cell the DP enumerates every schedule and is exact for any solver.

Heun needs a model call at each candidate target: per cell the `candidates * width` best pairs by the
Euler predictor's objective are corrected and scored exactly (the plain DP's re-ranking at width 1).

UniPC carries one more thing per entry: the pending UniC correction of its state (`unic_correction`'s
base and weight). Each layer completes it with the estimate the layer evaluates anyway, steps from the
corrected state, and stores the new entries' corrections; ranking is on the predicted state at the
target, the state `sample`'s trajectory holds there (the corrector needs the model's next call).

Steps go through core/solvers.py's step functions, the ones `sample` uses, so the score of a
path is the score `sample` realises on the same grid.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Optional, Sequence

import torch

from ..core.errors import OptimalStepsError
from ..core.models import model_process
from ..core.solvers import (combine, corrected_start, get_solver, heun_coefficients, unic_correction,
                            update_coefficients)
from .objectives import aggregate, check_objective
from .teacher import predict_chunked

BLOCK_ELEMENTS = 1 << 23  # float64 elements per temporary block of candidate states (64 MiB)


@dataclass
class BeamResult:
    indices: list[int]  # teacher-grid indices of the best schedule, start -> clean end
    score: float  # its objective on the search samples
    errors: torch.Tensor  # [B] its per-sample final errors against the teacher's end, float64
    finalists: list[tuple[list[int], float]]  # the `width` best complete schedules and their scores
    nfe: int  # model evaluations of the DP (teacher excluded), counted per sample state (all samples)
    peak_vectors: int  # most sample vectors (states, clean estimates) held at once: memory / (D * itemsize)


@dataclass
class _Beam:
    paths: torch.Tensor  # [E, k+1] grid positions of each partial schedule
    x: torch.Tensor  # [E, B, D] its per-sample states
    x0_prev: Optional[torch.Tensor]  # [E, B, D] the clean estimate its last step used (multistep)
    t_prev: torch.Tensor  # [E] float64, the time of that estimate (nan: none yet)
    # UniPC: the pending UniC correction (base [E, B, D], weight [E] float64) of x; None before the first step
    correction: Optional[tuple[torch.Tensor, torch.Tensor]] = None


def beam_dp(model: Any, teacher_states: torch.Tensor, times: torch.Tensor, steps: int, solver: str = "euler",
            objective: str = "mse", width: int = 1, grid: Optional[Sequence[int]] = None, free_start: bool = False,
            cond: dict | None = None, candidates: int = 4, max_batch: int = 4096) -> BeamResult:
    """The `steps`-step schedule on `grid` (teacher indices including 0 and N; default all) that minimises
    `objective` of the final per-sample errors, keeping `width` histories per cell.

    `teacher_states` [B, N+1, ...] is the teacher trajectory (optimize/search.py run_teacher) and `times`
    [N+1] its grid; the start state is the teacher's first. `free_start`: the first step may start from
    that state placed at any grid point leaving room for the remaining steps."""
    solver_def = get_solver(solver)
    check_objective(objective)
    positions = _check_grid(grid, len(times) - 1)
    if not isinstance(width, int) or width < 1 or not isinstance(candidates, int) or candidates < 1:
        raise OptimalStepsError(f"width and candidates must be whole numbers >= 1, got {width} and {candidates}")
    n = len(positions) - 1
    if not 1 <= steps <= n:
        raise OptimalStepsError(f"steps must be between 1 and the grid's {n} intervals, got {steps}")
    batch = teacher_states.shape[0]
    dtype = torch.promote_types(teacher_states.dtype, torch.float32)
    targets = teacher_states[:, positions].to(dtype).reshape(batch, n + 1, -1)
    t = times.to(torch.float64)[positions].cpu()
    starts = n - steps + 1 if free_start else 1
    start = targets[:, 0]
    beam = _Beam(torch.arange(starts)[:, None], start[None].expand(starts, -1, -1).clone(),
                 torch.zeros_like(start)[None].expand(starts, -1, -1).clone() if solver_def.multistep else None,
                 torch.full((starts,), math.nan, dtype=torch.float64))
    run = _Run(model, solver_def, t, targets, objective, width, candidates, cond, max_batch,
               tuple(teacher_states.shape[2:]))
    for k in range(1, steps + 1):
        tgt = list(range(k, n - steps + k + 1)) if k < steps else [n]
        beam = _layer(run, beam, tgt)
        run.peak = max(run.peak, beam.x.shape[0] * batch * _vectors_per_entry(beam))
    errors = _final_errors(run, beam)
    scores = aggregate(errors, objective)
    order = torch.argsort(scores, stable=True)
    finalists = [([positions[p] for p in beam.paths[e].tolist()], float(scores[e])) for e in order.tolist()]
    best = int(order[0])
    return BeamResult(finalists[0][0], finalists[0][1], errors[best], finalists, run.nfe, run.peak)


def _check_grid(grid: Optional[Sequence[int]], n: int) -> list[int]:
    if grid is None:
        return list(range(n + 1))
    positions = sorted({int(g) for g in grid})
    if positions[0] != 0 or positions[-1] != n:
        raise OptimalStepsError(f"a DP grid must contain the teacher's first (0) and last ({n}) index")
    return positions


@dataclass
class _Run:
    model: Any
    solver: Any
    t: torch.Tensor  # [n+1] float64 times of the grid
    targets: torch.Tensor  # [B, n+1, D] the teacher at the grid
    objective: str
    width: int
    candidates: int
    cond: dict | None
    max_batch: int
    sample_shape: tuple[int, ...]
    nfe: int = 0
    peak: int = 0

    def predict(self, states: torch.Tensor, times: torch.Tensor) -> torch.Tensor:
        """Clean estimates of per-sample states [E, B, D] at times [E] (every sample of an entry shares it)."""
        entries, batch, dim = states.shape
        flat = states.reshape(entries * batch, *self.sample_shape)
        tt = times.repeat_interleave(batch)
        rows = torch.arange(batch).repeat(entries)
        self.nfe += flat.shape[0]
        return predict_chunked(self.model, flat, tt, self.cond, self.max_batch, rows).reshape(entries, batch, dim)


def _coefficients(run: _Run, beam: _Beam, src: torch.Tensor, tgt: torch.Tensor) -> list[torch.Tensor]:
    """Predictor coefficients [P] (c_x, c_x0, c_prev) of steps from entries `src` to grid positions `tgt`."""
    name = "euler" if run.solver.corrector else run.solver.name
    t_prev = beam.t_prev[src] if beam.x0_prev is not None else None
    return list(update_coefficients(name, model_process(run.model), run.t[beam.paths[src, -1]], run.t[tgt], t_prev))


def _step(run: _Run, beam: _Beam, x0: torch.Tensor, src: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
    """Predicted states [P, B, D] of the steps from entries `src` [P] to grid positions `tgt` [P]."""
    x = beam.x[src]
    x0_prev = beam.x0_prev[src] if beam.x0_prev is not None else None
    return combine(_coefficients(run, beam, src, tgt), (x, x0[src], x0_prev), x)


def _correct(run: _Run, beam: _Beam, x0: torch.Tensor, src: torch.Tensor, tgt: torch.Tensor,
             predicted: torch.Tensor) -> torch.Tensor:
    """Heun's corrected states for predictions [P, B, D] at inner grid positions `tgt` (one model call each)."""
    x0_pred = run.predict(predicted, run.t[tgt])
    coeffs = heun_coefficients(model_process(run.model), run.t[beam.paths[src, -1]], run.t[tgt])
    return combine(coeffs, (beam.x[src], x0[src], predicted, x0_pred), predicted)


def _layer(run: _Run, beam: _Beam, tgt: list[int]) -> _Beam:
    """One step: every entry to every later target; each target keeps the `width` best new entries."""
    n = run.targets.shape[1] - 1
    x0 = run.predict(beam.x, run.t[beam.paths[:, -1]])
    if beam.correction is not None:  # UniPC: every entry steps from its corrected state
        beam = replace(beam, x=corrected_start(beam.x, x0, beam.correction), correction=None)
    scores = _predictor_scores(run, beam, x0, tgt)  # [E, J]
    chosen_src, chosen_tgt, chosen_states = [], [], []
    for jj, j in enumerate(tgt):
        order = torch.argsort(scores[:, jj], stable=True)  # entries are in grid order: ties keep the earlier source
        order = order[torch.isfinite(scores[order, jj])]
        if len(order) == 0:
            continue
        corrector = run.solver.corrector and j < n
        pick = order[:run.candidates * run.width] if corrector else order[:run.width]
        target = torch.full((len(pick),), j, dtype=torch.long)
        states = _step(run, beam, x0, pick, target)
        if corrector:
            states = _correct(run, beam, x0, pick, target, states)
            exact = aggregate(_errors(states, run.targets[:, j]), run.objective)
            keep = torch.argsort(exact, stable=True)[:run.width]
            pick, states = pick[keep], states[keep]
        chosen_src.append(pick)
        chosen_tgt.append(torch.full((len(pick),), j, dtype=torch.long))
        chosen_states.append(states)
    if not chosen_src:
        raise OptimalStepsError("the DP found no finite path: the model's estimates are not finite on this grid")
    src, where = torch.cat(chosen_src), torch.cat(chosen_tgt)
    correction = None
    if run.solver.source_corrector and max(tgt) < n:  # no step follows the clean end: nothing to correct there
        correction = _pending_correction(run, beam, x0, src, where)
    return _Beam(torch.cat([beam.paths[src], where[:, None]], dim=1), torch.cat(chosen_states),
                 x0[src] if beam.x0_prev is not None else None, run.t[beam.paths[src, -1]], correction)


def _pending_correction(run: _Run, beam: _Beam, x0: torch.Tensor, src: torch.Tensor,
                        tgt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """UniPC's UniC correction at grid positions `tgt` [P] of the steps from entries `src` [P] (whose states
    are already corrected), as `solver_step` leaves it pending: completed by the next layer's estimates."""
    return unic_correction(model_process(run.model), beam.x[src], x0[src], beam.x0_prev[src],
                           run.t[beam.paths[src, -1]], run.t[tgt], beam.t_prev[src])


def _vectors_per_entry(beam: _Beam) -> int:
    """Sample vectors an entry holds: its state and clean estimate, the previous estimate, UniPC's base."""
    return 2 + (beam.x0_prev is not None) + (beam.correction is not None)


def _errors(states: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample mean squared error [P, B] of states [P, B, D] against one target [B, D], float64."""
    return (states.to(torch.float64) - target.to(torch.float64)).pow(2).mean(-1)


def _predictor_scores(run: _Run, beam: _Beam, x0: torch.Tensor, tgt: list[int]) -> torch.Tensor:
    """Objective [E, J] of the (predictor) step from every entry to every target; inf where not forward."""
    entries, batch, dim = beam.x.shape
    pos = beam.paths[:, -1]
    tgt_t = torch.tensor(tgt, dtype=torch.long)
    scores = torch.full((entries, len(tgt)), math.inf, dtype=torch.float64)
    block = max(1, BLOCK_ELEMENTS // max(1, len(tgt) * batch * dim))
    for lo in range(0, entries, block):
        src = torch.arange(lo, min(lo + block, entries))
        pairs_src = src.repeat_interleave(len(tgt))
        pairs_tgt = tgt_t.repeat(len(src))
        states = _step(run, beam, x0, pairs_src, pairs_tgt)  # [P, B, D]
        err = (states.to(torch.float64) - run.targets[:, pairs_tgt].transpose(0, 1).to(torch.float64)).pow(2).mean(-1)
        score = aggregate(err, run.objective).reshape(len(src), len(tgt))
        forward = pos[src][:, None] < tgt_t[None, :]
        scores[src] = torch.where(forward & torch.isfinite(score), score, torch.full_like(score, math.inf))
    return scores


def _final_errors(run: _Run, beam: _Beam) -> torch.Tensor:
    """Per-sample errors [E, B] of the complete schedules against the teacher's end."""
    return _errors(beam.x, run.targets[:, -1])


def beam_model_calls(points: int, steps: int, solver: str = "euler", width: int = 1, candidates: int = 4,
                     free_start: bool = False) -> int:
    """Model calls per search sample of `beam_dp` on a grid of `points` points (an upper bound for heun; exact
    for euler and dpmpp2m when every cell is reachable)."""
    solver_def = get_solver(solver)
    n, total = points - 1, 0
    entries = n - steps + 1 if free_start else 1
    for k in range(1, steps + 1):
        total += entries  # one model call per entry's state
        cells = n - steps + 1 if k < steps else 1
        sources = entries
        entries = min(width * cells, sum(min(width, _paths_into(k, j, n, steps, free_start))
                                         for j in range(k, k + cells)))
        if solver_def.corrector and k < steps:
            total += cells * min(candidates * width, sources)
    return total


def _paths_into(k: int, j: int, n: int, steps: int, free_start: bool) -> int:
    """How many k-step partial schedules reach grid position j (an upper bound of the entries a cell can hold)."""
    if not free_start:
        return math.comb(j - 1, k - 1) if j >= k else 0
    return sum(math.comb(j - s - 1, k - 1) for s in range(0, min(j, n - steps + 1)) if j - s >= k)
