"""The validated choice: build many candidate schedules cheaply, keep the one that wins on noise no search saw.

`validated_search` runs the teacher once on the search noise and once on a validation set (its own noise,
drawn from the seed), then builds candidates and scores each on validation with the objective:

1. the DP on the full teacher grid (`objective`, width 1, fixed start): the plain DP's cost, made robust;
2. the closed forms at their defaults, DM and the published tables (no model calls to make);
3. the parametric families of optimize/families.py fitted on the search samples (with up to 40 % of what
   the budget has left);
4. DP variants on a coarser sub-grid of the same teacher run: the other objective, a free start, and the
   width-K beam (optimize/beam.py), the grid as fine as the remaining budget allows.

Every model call is counted against a budget of `budget` (default 2) times the plain DP's on the same
settings (its teacher plus its DP); a candidate that does not fit is skipped, so the bound holds by
construction. The validation set takes VALIDATION_SHARE of what is left after the full-grid DP.
Refinement of the DP's schedule (optimize/refine.py) is a candidate only when the caller grants it model
calls of its own (`refine_nfe`, on top of the budget).

The winner has the lowest validation objective among the candidates that pass every guard: the worst tenth
of its errors within TAIL_SLACK of the best baseline's (the fixed schedule with the lowest objective), its
far tail (beyond the 99th percentile) within TAIL_SLACK of uniform's or the best baseline's, whichever is
larger, and its sliced W2 to true data (when the model offers data samples) within DATA_SLACK of the
closest fixed schedule's. The best baseline and uniform stay eligible, so the winner is never worse on
validation than either; metadata `selection` records every candidate's scores, guard ratios and failures.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

from ..core.distances import sliced_wasserstein
from ..core.dm import dm
from ..core.errors import OptimalStepsError
from ..core.models import index_cond, model_process
from ..core.schedules import CLOSED_FORMS, Schedule, check_steps
from ..core.solvers import get_solver, nfe_per_trajectory, sample
from ..core.tables import table_schedule
from .beam import beam_dp, beam_model_calls
from .families import FAMILIES, fit_family
from .objectives import OBJECTIVES, aggregate, check_objective, per_sample_error
from .refine import refine_schedule
from .result import SearchResult
from .teacher import amplitude_statistics, run_teacher

VALIDATION_SEED_OFFSET = 7_919  # validation noise seed = search seed + this
DEFAULT_WIDTH = 4
DEFAULT_BUDGET = 2.0
FIT_EVALUATIONS = 10  # samplings of the search noise per family, at most
MIN_FIT_EVALUATIONS = 3
FIT_SHARE = 0.4
TAIL_SLACK = 1.1  # a candidate's tails may be this much worse than the best baseline's and uniform's
DATA_SLACK = 1.05  # a candidate's distance to the data may be this much more than the closest fixed schedule's
TAIL_LEVEL = 0.99  # the tail guard against uniform looks at this quantile of the validation errors ...
MIN_TAIL_COUNT = 2  # ... as the mean of the errors beyond it, at least this many (robust on few samples)
VALIDATION_SHARE = 0.5  # of the budget left after the main DP, for the validation set by default
MAX_VALIDATION = 1024
DATA_SAMPLES = 4096  # true data samples the data guard compares with (no model calls)
TABLE_NAMES = ("ays-sd15", "ays-sdxl", "oss-flux", "oss-chroma")


@dataclass
class Candidate:
    name: str
    schedule: Schedule
    nfe: int  # model calls spent making it (search samples), teacher excluded
    indices: Optional[list[int]] = None  # teacher-grid indices, for DP schedules
    search_score: Optional[float] = None
    validation: dict[str, float] = field(default_factory=dict)


@dataclass
class _Budget:
    limit: int
    spent: int = 0

    def fits(self, calls: int) -> bool:
        return self.spent + calls <= self.limit

    def spend(self, calls: int) -> None:
        self.spent += calls


def plain_dp_calls(batch: int, teacher_steps: int, steps: int, solver: str, candidates: int = 4) -> int:
    """Model calls of the plain DP (optimize/search.py, method="dp") with its teacher, on `batch` samples."""
    return batch * (nfe_per_trajectory(solver, teacher_steps) +
                    beam_model_calls(teacher_steps + 1, steps, solver, 1, candidates))


def validation_noise(noise: torch.Tensor, count: int, seed: int) -> torch.Tensor:
    """`count` fresh standard normal draws shaped like the search noise, from the seed (drawn on the CPU)."""
    generator = torch.Generator().manual_seed(int(seed) + VALIDATION_SEED_OFFSET)
    fresh = torch.randn((count,) + tuple(noise.shape[1:]), generator=generator, dtype=torch.float64)
    return fresh.to(dtype=noise.dtype, device=noise.device)


def validated_search(model: Any, noise: torch.Tensor, steps: int, teacher: Schedule, solver: str = "euler",
                     cond: dict | None = None, objective: str = "log", width: int = DEFAULT_WIDTH,
                     validation_samples: int | None = None, seed: int | None = None, candidates: int = 4,
                     budget: float = DEFAULT_BUDGET, max_batch: int = 4096, progress: bool = False,
                     callback: Optional[Callable[[str, int, int], None]] = None, refine_nfe: int | None = None):
    """The validated schedule as an optimize.search.SearchResult (see the module docstring). `refine_nfe`:
    model calls granted to refining the DP's schedule off the grid, on top of the budget (default: none)."""
    started = time.perf_counter()
    check_objective(objective)
    steps, solver = check_steps(steps), get_solver(solver).name
    if not isinstance(width, int) or width < 1:
        raise OptimalStepsError(f"width must be a whole number >= 1, got {width}")
    if not (budget >= 1.0 and math.isfinite(budget)):
        raise OptimalStepsError(f"the budget must be a finite factor >= 1 of the plain DP's model calls, got {budget}")
    batch, n = noise.shape[0], teacher.steps
    if validation_samples is not None and validation_samples < 1:
        raise OptimalStepsError(f"validation_samples must be at least 1, got {validation_samples}")
    if refine_nfe is not None and (isinstance(refine_nfe, bool) or int(refine_nfe) != refine_nfe or refine_nfe < 1):
        raise OptimalStepsError(f"refine_nfe must be a whole number >= 1 of model calls, got {refine_nfe!r}")
    seed = 0 if seed is None else int(seed)
    plain = plain_dp_calls(batch, n, steps, solver, candidates)
    money = _Budget(int(budget * plain))

    search_teacher = run_teacher(model, noise, teacher, solver, cond, progress, max_batch, keep_x0=False)
    money.spend(search_teacher.nfe * batch)
    if callback is not None:
        callback("teacher", n, n)
    main = beam_dp(model, search_teacher.states, teacher.times, steps, solver, objective, 1, cond=cond,
                   candidates=candidates, max_batch=max_batch)
    money.spend(main.nfe)
    pool = [_dp_candidate(f"dp-{objective}", main, teacher, solver)]

    # the validation set: as many as asked, by default as many as VALIDATION_SHARE of the budget left pays
    # for (a teacher run and every candidate's sampling each), at least the old 8 to 32; never past the budget
    fixed = _fixed_schedules(model_process(model), steps, solver)
    count = _validation_size(validation_samples, money.limit - money.spent, batch, n, steps, solver, len(fixed))
    val_noise = validation_noise(noise, count, seed)
    val_cond = index_cond(cond, torch.arange(count) % batch)
    val_teacher = run_teacher(model, val_noise, teacher, solver, val_cond, False, max_batch, keep_x0=False)
    money.spend(val_teacher.nfe * count)
    per_eval = count * nfe_per_trajectory(solver, steps)
    money.spend(per_eval)  # the main DP's validation

    pool += _fixed_candidates(fixed, money, per_eval)
    # the families get at most FIT_SHARE of what is left, the DP variants the rest
    share = FIT_SHARE * (money.limit - money.spent) / len(FAMILIES) - per_eval
    evaluations = min(FIT_EVALUATIONS, int(share // (batch * nfe_per_trajectory(solver, steps))))
    fit_cost = batch * nfe_per_trajectory(solver, steps) * evaluations
    teacher_end = search_teacher.states[:, -1]
    for name in FAMILIES:
        if evaluations < MIN_FIT_EVALUATIONS or not money.fits(fit_cost + per_eval):
            break
        try:
            fit = fit_family(name, model, noise, teacher_end, steps, solver, objective, evaluations,
                             cond)
        except OptimalStepsError:
            money.spend(fit_cost + per_eval)  # counted as planned: the bound stays an upper bound
            continue
        money.spend(fit.nfe + per_eval)
        pool.append(Candidate(f"fit-{name}", fit.schedule, fit.nfe, search_score=fit.score))
    pool += _variant_candidates(model, search_teacher.states, teacher, steps, solver, objective, width, cond,
                                candidates, max_batch, money, per_eval)
    refined = None if refine_nfe is None else _refined_candidate(model, noise, pool[0], solver, teacher_end, cond,
                                                                 int(refine_nfe) - per_eval, max_batch)
    pool += [] if refined is None else [refined]
    refine_spent = 0 if refined is None else refined.nfe + per_eval

    val_end = val_teacher.states[:, -1]
    data = data_reference(model, seed)
    for c in pool:
        out = sample(model, val_noise, c.schedule, solver=solver, cond=val_cond).samples
        c.validation = _scores(per_sample_error(out, val_end), objective)
        c.validation["data"] = None if data is None else data_distance(model, out, data)
    winner = _choose(pool)
    amplitude = amplitude_statistics(search_teacher.states)
    schedule = _winner_schedule(winner, pool, teacher, amplitude, {
        "model": getattr(model, "spec", type(model).__name__), "nfe": money.spent + refine_spent,
        "search_nfe": money.spent + refine_spent, "refine_nfe": refine_spent, "plain_dp_nfe": plain,
        "budget_nfe": money.limit, "teacher_nfe": search_teacher.nfe * batch,
        "teacher_steps": n, "teacher_grid": teacher.metadata.get("baseline", "custom"), "solver": solver,
        "samples": batch, "seed": seed, "steps": steps, "objective": objective, "width": width,
        "validation_samples": count, "validation_seed": seed + VALIDATION_SEED_OFFSET,
        "search_seconds": round(time.perf_counter() - started, 4)})
    teacher_out = search_teacher.states[:, -1].to(dtype=torch.promote_types(noise.dtype, torch.float32))
    return SearchResult(schedule, list(winner.indices or []), None, None, torch.empty(0), float(
        winner.validation["score"]), money.spent + refine_spent, search_teacher.nfe * batch, time.perf_counter() - started,
        teacher, teacher_out, amplitude)


def _choose(pool: list[Candidate]) -> Candidate:
    """The lowest validation objective among the candidates that pass every guard (`GUARD_LIMITS`); the
    best baseline (the fixed schedule with the lowest objective) and uniform stay eligible whatever their
    guards say, so the winner is never worse on validation than either. The first on ties: the DP, then the
    simplest. Each candidate's guard ratios and failed guards are recorded in its `validation` scores."""
    fixed = [c for c in pool if c.nfe == 0 and c.indices is None]
    best = min(fixed, key=lambda c: c.validation["score"]) if fixed else None
    uniform_run = next((c for c in fixed if c.name == "uniform"), None)
    references = _guard_references(fixed, best, uniform_run)
    for c in pool:
        ratios = _guard_ratios(c.validation, references)
        failed = [name for name, ratio in ratios.items() if ratio > GUARD_LIMITS[name]]
        c.validation.update({f"{name}_ratio": ratio for name, ratio in ratios.items()})
        c.validation["failed"] = failed
        c.validation["eligible"] = not failed or c is best or c is uniform_run
    return min((c for c in pool if c.validation["eligible"]), key=lambda c: c.validation["score"])


# a candidate is ineligible when one of these ratios (its score over the guard's reference) exceeds its limit
GUARD_LIMITS = {"tail_best": TAIL_SLACK, "tail_uniform": TAIL_SLACK, "data": DATA_SLACK}


def _guard_references(fixed: list[Candidate], best: Optional[Candidate],
                      uniform_run: Optional[Candidate]) -> dict[str, float]:
    """What the guards compare with: the best baseline's worst tenth, uniform's far tail (or the best
    baseline's, if larger), the data distance of the fixed schedule closest to the data (each absent when
    there is nothing to compare with)."""
    out = {}
    if best is not None:
        out["tail_best"] = best.validation["tail"]
    if uniform_run is not None:
        # where the best baseline breaks more samples than uniform already, holding candidates to uniform's
        # tail only hands the win to that baseline (eligible anyway), which is no better in the tail and
        # farther from the data (measured: docs/search.md); its far tail is then the reference
        out["tail_uniform"] = max(uniform_run.validation["far_tail"],
                                  best.validation["far_tail"] if best is not None else 0.0)
    distances = [c.validation["data"] for c in fixed if c.validation.get("data") is not None]
    if distances:
        out["data"] = min(distances)
    return out


def _guard_ratios(scores: dict[str, Any], references: dict[str, float]) -> dict[str, float]:
    """The ratios of a candidate's validation scores to the guards' references (1 = as good)."""
    out = {}
    if "tail_best" in references:  # the tail objective is a log: the ratio is exp of the difference
        out["tail_best"] = math.exp(min(scores["tail"] - references["tail_best"], 700.0))
    if "tail_uniform" in references:
        out["tail_uniform"] = _ratio(scores["far_tail"], references["tail_uniform"])
    if "data" in references and scores.get("data") is not None:
        out["data"] = _ratio(scores["data"], references["data"])
    return out


def _ratio(value: float, reference: float) -> float:
    if reference > 0:
        return value / reference
    return 1.0 if value <= reference else math.inf


def far_tail(errors: torch.Tensor) -> float:
    """The mean of the errors beyond the TAIL_LEVEL quantile, at least MIN_TAIL_COUNT of them: a p99 that
    does not hang on a single sample when the validation set holds only a hundred or so."""
    count = max(MIN_TAIL_COUNT, math.ceil(round((1.0 - TAIL_LEVEL) * errors.shape[-1], 9)))  # 0.01 * 300 is 3
    return float(torch.topk(errors, min(count, errors.shape[-1])).values.mean())


def data_reference(model: Any, seed: int) -> Optional[torch.Tensor]:
    """True data samples to measure distances to (in the model's classifier features when it has them), or
    None when the model offers no data samples. Drawing them costs no model calls."""
    if not callable(getattr(model, "data_samples", None)):
        return None
    data = model.data_samples(DATA_SAMPLES, torch.Generator().manual_seed(int(seed) + VALIDATION_SEED_OFFSET))
    return model.features(data) if callable(getattr(model, "features", None)) else data


def data_distance(model: Any, samples: torch.Tensor, data: torch.Tensor) -> float:
    """Sliced W2 between the samples (in the model's classifier features when it has them) and `data`."""
    features = model.features(samples) if callable(getattr(model, "features", None)) else samples
    return sliced_wasserstein(features, data)


def _scores(errors: torch.Tensor, objective: str) -> dict[str, float]:
    """Validation scores of per-sample errors [V]: the objective that decides, and every objective beside it."""
    out = {"score": float(aggregate(errors, objective))}
    out.update({name: float(aggregate(errors, name)) for name in OBJECTIVES})
    out["p90"] = float(torch.quantile(errors, 0.9))
    out["p99"] = float(torch.quantile(errors, 0.99))
    out["far_tail"] = far_tail(errors)
    return out


def _dp_candidate(name: str, result: Any, teacher: Schedule, solver: str) -> Candidate:
    indices = result.indices
    metadata: dict[str, Any] = {"teacher_indices": list(indices)}
    if indices[0] != 0:
        # a free start: the first step starts from sigma(t_start) * noise placed at a later grid time
        metadata["noise_scale_time"] = float(teacher.times[0])
    schedule = Schedule(teacher.times[indices], teacher.process, solver=solver, metadata=metadata)
    return Candidate(name, schedule, result.nfe, list(indices), result.score)


def _fixed_schedules(process: Any, steps: int, solver: str) -> list[tuple[str, Schedule]]:
    """The closed forms at their defaults, DM and the published tables (those this process reaches)."""
    makers = [(name, lambda name=name: CLOSED_FORMS[name](process, steps)) for name in CLOSED_FORMS]
    makers.append(("dm", lambda: dm(process, steps, solver=solver)))
    makers += [(name, lambda name=name: table_schedule(name, process, steps)) for name in TABLE_NAMES]
    out = []
    for name, make in makers:
        try:
            out.append((name, make()))
        except OptimalStepsError:  # e.g. a table whose noise levels this process does not reach
            continue
    return out


def _fixed_candidates(fixed: list[tuple[str, Schedule]], money: _Budget, per_eval: int) -> list[Candidate]:
    """The fixed schedules as candidates, as far as the budget evaluates them."""
    out = []
    for name, schedule in fixed:
        if not money.fits(per_eval):
            break
        money.spend(per_eval)
        out.append(Candidate(name, schedule, 0))
    return out


def _validation_size(asked: int | None, left: int, batch: int, teacher_steps: int, steps: int, solver: str,
                     fixed: int) -> int:
    """The validation set: `asked`, else `validation_count` for a pool with `fixed` fixed schedules; never more
    than the `left` model calls pay a teacher run and one sampling for."""
    teacher_nfe, student_nfe = nfe_per_trajectory(solver, teacher_steps), nfe_per_trajectory(solver, steps)
    count = asked or validation_count(left, batch, teacher_nfe, student_nfe, 1 + fixed + len(FAMILIES) + 3)
    return max(1, min(count, left // (teacher_nfe + student_nfe)))


def _variants(objective: str, width: int) -> list[tuple[str, str, int, bool]]:
    """The DP variants (name, objective, width, free start): the other objective, a free start, the beam."""
    other = "mse" if objective != "mse" else "log"
    out = [(f"dp-{other}", other, 1, False), (f"dp-{objective}-free", objective, 1, True)]
    if width > 1:
        out.append((f"dp-{objective}-w{width}", objective, width, False))
    return out


def _affordable_variants(variants: list, n: int, steps: int, solver: str, candidates: int, left: int, batch: int,
                         per_eval: int) -> tuple[list, Optional[int]]:
    """The variants `left` calls pay for, the last dropped until they fit, and their sub-grid's points."""
    while variants:
        points = _grid_points(n, steps, solver, variants, candidates, left, batch, per_eval)
        if points is not None:
            return variants, points
        variants = variants[:-1]
    return [], None


def validated_plan(batch: int, teacher_steps: int, steps: int, solver: str, width: int,
                   candidates: int) -> tuple[int, list[tuple[int, int]]]:
    """(validation samples, (grid points, width) of each DP variant) of `validated_search` with these settings
    and its default validation set, following its budget (for optimize/memory.py's estimate). The validation
    set is sized for the fewest fixed schedules the pool can have (no published table reaching the process),
    so it is the largest drawn; fixed candidates and family fits are not subtracted from what the variants
    get, so their grid is an upper bound of the one that runs."""
    left = int(DEFAULT_BUDGET * plain_dp_calls(batch, teacher_steps, steps, solver, candidates))
    left -= plain_dp_calls(batch, teacher_steps, steps, solver, candidates)
    count = _validation_size(None, left, batch, teacher_steps, steps, solver, len(CLOSED_FORMS) + 1)
    per_eval = count * nfe_per_trajectory(solver, steps)
    left -= count * nfe_per_trajectory(solver, teacher_steps) + per_eval
    variants, points = _affordable_variants(_variants("log", width), teacher_steps, steps, solver, candidates, left,
                                            batch, per_eval)
    return count, [(points, w) for _, _, w, _ in variants]


def validation_count(left: int, batch: int, teacher_nfe: int, student_nfe: int, candidates: int) -> int:
    """The default validation set size: VALIDATION_SHARE of the `left` model calls, each sample costing a
    teacher run and `candidates` samplings; at least max(8, min(2 B, 32)), at most MAX_VALIDATION."""
    affordable = int(VALIDATION_SHARE * left) // (teacher_nfe + candidates * student_nfe)
    return min(MAX_VALIDATION, max(8, min(2 * batch, 32), affordable))


def _refined_candidate(model: Any, noise: torch.Tensor, start: Candidate, solver: str, teacher_end: torch.Tensor,
                       cond: dict | None, calls: int, max_batch: int) -> Optional[Candidate]:
    """The DP's schedule refined off the grid (optimize/refine.py) within `calls` model calls; None when
    refinement refuses (a budget too small for one pass, a model with discrete timesteps)."""
    if calls < 1:
        return None
    result = refine_schedule(model, noise, {start.name: start.schedule}, solver, teacher_end, calls, cond,
                             max_batch=max_batch, warn=False)
    if result.stopped == "refused":
        return None
    schedule = result.schedule
    schedule.metadata.pop("teacher_indices", None)  # off the grid now
    return Candidate(f"{start.name}-refined", schedule, result.nfe, search_score=result.error_after)


def _variant_candidates(model: Any, states: torch.Tensor, teacher: Schedule, steps: int, solver: str,
                        objective: str, width: int, cond: dict | None, candidates: int, max_batch: int,
                        money: _Budget, per_eval: int) -> list[Candidate]:
    """The DP's other settings on the finest sub-grid of the teacher's that the remaining budget pays for."""
    batch, n = states.shape[0], teacher.steps
    variants, points = _affordable_variants(_variants(objective, width), n, steps, solver, candidates,
                                            money.limit - money.spent, batch, per_eval)
    out = []
    if not variants:
        return out
    grid = sorted({round(i * n / (points - 1)) for i in range(points)})
    for name, obj, w, free in variants:
        result = beam_dp(model, states, teacher.times, steps, solver, obj, w, grid, free, cond, candidates, max_batch)
        money.spend(result.nfe + per_eval)
        out.append(_dp_candidate(f"{name}@{len(grid)}" if len(grid) < n + 1 else name, result, teacher, solver))
    return out


def _grid_points(n: int, steps: int, solver: str, variants: list, candidates: int, left: int, batch: int,
                 per_eval: int) -> Optional[int]:
    """The most grid points (at most n + 1, at least steps + 2) whose variants all fit in `left` calls."""
    def cost(points: int) -> int:
        return sum(batch * beam_model_calls(points, steps, solver, w, candidates, free) + per_eval
                   for _, _, w, free in variants)

    lo, hi = steps + 2, n + 1
    if lo > hi or cost(lo) > left:
        return None
    while lo < hi:  # the cost grows with the grid: bisect for the largest that fits
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if cost(mid) <= left else (lo, mid - 1)
    return lo


def _winner_schedule(winner: Candidate, pool: list[Candidate], teacher: Schedule, amplitude: dict,
                     settings: dict[str, Any]) -> Schedule:
    """The winner with the search settings and every candidate's validation scores in its metadata."""
    metadata = {key: value for key, value in winner.schedule.metadata.items() if key != "teacher_indices"}
    grid = teacher.times.tolist()
    nearest = [min(range(len(grid)), key=lambda i: abs(grid[i] - t)) for t in winner.schedule.times.tolist()[:-1]]
    metadata.update(settings)
    metadata.update({
        "method": "oss", "selection_method": "validated", "winner": winner.name,
        "teacher_indices": winner.indices,
        "selection": [{"name": c.name, "search_nfe": c.nfe, "search_score": c.search_score, **c.validation}
                      for c in pool],
        "calibration": {"q05": [amplitude["q05"][i] for i in nearest], "q95": [amplitude["q95"][i] for i in nearest]},
    })
    return Schedule(winner.schedule.times.clone(), winner.schedule.process, solver=settings["solver"],
                    metadata=metadata)


def selection_table(schedule: Schedule) -> str:
    """The candidates' validation scores of a validated schedule as a small text table: the winner marked
    `*`, a candidate a guard ruled out `-` with the guards it failed; the guard columns are ratios to the
    guards' references (the best baseline's worst tenth, uniform's far tail, the closest data distance)."""
    rows = schedule.metadata.get("selection")
    if not rows:
        return ""
    objective = schedule.metadata.get("objective", "log")
    lines = [f"{'candidate':<22} {'validation ' + objective:>16} {'mse':>10} {'p99':>10} {'tail/best':>10} "
             f"{'tail/unif':>10} {'data':>10} {'data/best':>10} {'search NFE':>11}  failed"]
    for row in sorted(rows, key=lambda r: r["score"]):
        mark = " *" if row["name"] == schedule.metadata.get("winner") else "" if row.get("eligible", True) else " -"
        lines.append(f"{row['name'] + mark:<22} {row['score']:>16.4g} {row['mse']:>10.3g} {row['p99']:>10.3g} "
                     f"{_cell(row.get('tail_best_ratio'))} {_cell(row.get('tail_uniform_ratio'))} "
                     f"{_cell(row.get('data'))} {_cell(row.get('data_ratio'))} {row['search_nfe']:>11}  "
                     f"{','.join(row.get('failed', []))}".rstrip())
    return "\n".join(lines)


def _cell(value: Optional[float]) -> str:
    return f"{'–':>10}" if value is None else f"{value:>10.3g}"


METHODS = ("validated", "dp")


def search_hook(method: str, model: Any, noise: torch.Tensor, steps: int, teacher: Schedule, solver: str,
                cond: dict | None, objective: str | None, width: int | None, free_start: bool, seed: int | None,
                candidates: int, max_batch: int, progress: bool, callback: Any, dp_only: list[str],
                refine_calls: int | None = None):
    """search() for method "validated", or "dp" with a non-default objective or width (the beam DP on the
    full grid); `dp_only` names the options given that only the plain DP takes; `refine_calls` (validated
    only) grants refinement of the DP's schedule that many model calls, as one more candidate."""
    if method not in METHODS:
        raise OptimalStepsError(f"unknown method {method!r}; known: {', '.join(METHODS)}")
    if method == "validated" and free_start:
        dp_only = dp_only + ["free_start (the validated search tries a free start itself)"]
    if dp_only:
        what = "method='validated'" if method == "validated" else "the DP with an objective or width"
        raise OptimalStepsError(f"{what} does not take {', '.join(dp_only)}: use method='dp' with the mse "
                                "objective and width 1 for those")
    if method == "validated":
        return validated_search(model, noise, steps, teacher, solver, cond, objective or "log",
                                DEFAULT_WIDTH if width is None else width, seed=seed, candidates=candidates,
                                max_batch=max_batch, progress=progress, callback=callback, refine_nfe=refine_calls)
    return _beam_search_result(model, noise, steps, teacher, solver, cond, objective or "mse", width or 1,
                               free_start, seed, candidates, max_batch)


def _beam_search_result(model: Any, noise: torch.Tensor, steps: int, teacher: Schedule, solver: str,
                        cond: dict | None, objective: str, width: int, free_start: bool, seed: int | None,
                        candidates: int, max_batch: int):
    """The beam DP on the full teacher grid as a SearchResult."""
    started = time.perf_counter()
    check_objective(objective)
    batch = noise.shape[0]
    run = run_teacher(model, noise, teacher, solver, cond, False, max_batch, keep_x0=False)
    result = beam_dp(model, run.states, teacher.times, steps, solver, objective, width, None, free_start, cond,
                     candidates, max_batch)
    found = _dp_candidate(f"dp-{objective}", result, teacher, solver)
    amplitude = amplitude_statistics(run.states)
    nfe = run.nfe * batch + result.nfe
    found.schedule.metadata.update({
        "method": "oss", "selection_method": "dp", "model": getattr(model, "spec", type(model).__name__),
        "nfe": nfe, "search_nfe": nfe, "teacher_nfe": run.nfe * batch, "teacher_steps": teacher.steps,
        "solver": solver, "samples": batch, "seed": seed, "steps": steps, "objective": objective, "width": width,
        "free_start": free_start, "dp_cost": result.score, "peak_vectors": result.peak_vectors,
        "search_seconds": round(time.perf_counter() - started, 4),
        "calibration": {key: [amplitude[key][i] for i in result.indices[:-1]] for key in ("q05", "q95")}})
    out = run.states[:, -1].to(dtype=torch.promote_types(noise.dtype, torch.float32))
    return SearchResult(found.schedule, list(result.indices), None, None, torch.empty(0), result.score, nfe,
                        run.nfe * batch, time.perf_counter() - started, teacher, out, amplitude)
