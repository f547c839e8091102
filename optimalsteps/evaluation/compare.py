"""The compare harness: named schedules side by side, evaluated on noise the searches never saw.

`compare(model, steps=[...], solvers=[...], schedules=[...])` searches every searched schedule on the
search noise, then samples every (schedule, solver, steps) on fresh evaluation noise and scores it against
the teacher on that same noise, the exact ODE solution (where the model has one) and true data samples.
`write_report(result, out_dir)` writes results.json / .csv / .md and, with matplotlib, PNG plots.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from tqdm.auto import tqdm

from .baselines import SOLVER_SPECIFIC, check_name, make_schedules
from ..core.checks import as_noise, check_int, check_seed
from ..core.errors import OptimalStepsError
from .metrics import (error_quantiles, frechet_distance, mixture_nll, mmd, mode_change_rate, mse, psnr,
                      sliced_wasserstein)
from ..core.io import check_writable, write_bytes
from ..core.models import draw_noise, is_broadcast, model_process, model_teacher_grid
from ..core.schedules import Schedule, check_steps
from ..core.solvers import get_solver, sample

DEFAULT_SCHEDULES = ("oss", "uniform", "logsnr", "karras", "kl-optimal", "gits", "dm", "boss")
# the OSS search refined off the grid, with the coarse-to-fine DP (optimalsteps.refine), or with a free first
# step start (docs/search.md), under their own names
SEARCH_VARIANTS = {"oss-refined": {"refine": True, "method": "dp"}, "oss-fast": {"coarse_to_fine": True, "method": "dp"},
                   "oss-free": {"free_start": True, "method": "dp"}, "oss-dp": {"method": "dp"}}
EVAL_SEED_OFFSET = 1_000_003  # evaluation noise seed = search seed + this, unless given

# every row carries all of these keys; a metric that does not apply is None
ROW_KEYS = ("schedule", "solver", "steps", "nfe", "mse", "psnr", "mse_median", "mse_p90", "mse_p99", "mode_change",
            "mse_exact", "sw2", "mmd", "nll", "fd", "search_seconds", "sample_seconds", "process", "times",
            "selection")
# quality metrics and which direction is better (marked in results.md)
BETTER = {"mse": min, "psnr": max, "mse_median": min, "mse_p90": min, "mse_p99": min, "mode_change": min,
          "mse_exact": min, "sw2": min, "mmd": min, "nll": min, "fd": min}
REPORT_FILES = ("results.json", "results.csv", "results.md", "reference.json")


@dataclass
class CompareResult:
    rows: list[dict[str, Any]]
    reference: dict[str, Any]  # settings, the teacher's own scores per solver, data-vs-data floors
    samples: dict[tuple[str, str, int], torch.Tensor] = field(default_factory=dict)  # first eval outputs per row
    teacher_samples: dict[str, torch.Tensor] = field(default_factory=dict)
    sample_shape: tuple[int, ...] = ()


def compare(model: Any, steps: Sequence[int], solvers: Sequence[str] = ("euler",),
            schedules: Sequence[str] = DEFAULT_SCHEDULES, samples: int = 8, eval_samples: int = 512, seed: int = 0,
            eval_seed: int | None = None, teacher_steps: int = 200, cond: dict | None = None,
            eval_cond: dict | None = None, noise: torch.Tensor | None = None, eval_noise: torch.Tensor | None = None,
            options: dict[str, dict[str, Any]] | None = None, data_range: float | None = None, keep: int = 8,
            max_batch: int = 4096, progress: bool = False,
            make: Callable[..., dict[int, Schedule]] = make_schedules) -> CompareResult:
    """Compare named schedules (`optimalsteps.baselines.schedule_names()`) for `model`.

    - search noise: `noise`, else `samples` draws from `seed`; `cond` its per-sample conditions;
    - evaluation noise: `eval_noise`, else `eval_samples` draws from `eval_seed` (default seed + 1000003);
      `eval_cond` its conditions (conditions broadcast from one row are reused);
    - the teacher: `teacher_steps` steps of each solver on `model_teacher_grid` (the grid searches distil), on the
      evaluation noise; `options` maps a schedule name to its options (e.g. {"oss": {"cost": "x0"}});
    - `make` builds the schedules of a name, as `make_schedules` (a model whose schedules obey a constraint,
      such as Wan 2.2's two experts, passes its own).
    Rows carry ROW_KEYS; PSNR uses `data_range` (default: the model's `data_range`, else the spread of the
    true data samples, else of the teacher's outputs)."""
    process = model_process(model)
    if isinstance(steps, (str, int)) or isinstance(solvers, str) or isinstance(schedules, str):
        raise OptimalStepsError("compare takes lists of step counts, solvers and schedule names")
    teacher_steps = check_steps(teacher_steps)
    steps, solvers, names, options = _check_compare_inputs(steps, solvers, schedules, teacher_steps, options)
    noise = as_noise(noise, model, "search noise") if noise is not None else draw_noise(model, samples, seed)
    eval_seed = check_seed(seed) + EVAL_SEED_OFFSET if eval_seed is None else check_seed(eval_seed, "eval_seed")
    eval_noise = as_noise(eval_noise, model, "evaluation noise") if eval_noise is not None else \
        draw_noise(model, eval_samples, eval_seed)
    check_int(max_batch, "max_batch")
    eval_cond = _eval_conditions(cond, eval_cond, eval_noise.shape[0])

    jobs = len(solvers) + sum(len(solvers) if _solver_specific(n) else 1 for n in names) + \
        len(names) * len(solvers) * len(steps) + 1
    bar = tqdm(total=jobs, desc="compare", disable=not progress)
    try:
        bar.set_postfix_str("references")
        targets = _references(model, eval_noise, eval_seed, data_range)
        bar.update(1)
        teacher = model_teacher_grid(model, teacher_steps)
        reference = {"model": getattr(model, "spec", type(model).__name__), "process": process.name,
                     "teacher_steps": teacher_steps, "teacher_grid": teacher.metadata.get("baseline"),
                     "search_samples": int(noise.shape[0]), "seed": seed, "eval_samples": int(eval_noise.shape[0]),
                     "eval_seed": eval_seed, "data_range": targets.data_range, "floor": targets.floor, "teacher": {}}
        result = CompareResult([], reference, sample_shape=tuple(eval_noise.shape[1:]))
        teachers = _teacher_runs(model, eval_noise, teacher, solvers, eval_cond, max_batch, keep, targets, result,
                                 bar)
        made = _make_all(model, process, names, solvers, steps, noise, cond, teacher_steps, max_batch, options, bar,
                         make)
        for name in names:
            for solver in solvers:
                for m in steps:
                    bar.set_postfix_str(f"{name} / {solver} / {m} steps")
                    schedule = made[(name, solver if _solver_specific(name) else None)][m]
                    out, row = _row(model, eval_noise, schedule, name, solver, m, eval_cond, max_batch,
                                    teachers[solver], targets)
                    result.rows.append(row)
                    result.samples[(name, solver, m)] = out[:keep].clone()
                    bar.update(1)
    finally:
        bar.close()
    return result


def _teacher_runs(model: Any, eval_noise: torch.Tensor, teacher: Schedule, solvers: list[str], eval_cond: dict | None,
                  max_batch: int, keep: int, targets: "_Targets", result: CompareResult, bar: Any) -> dict:
    """Each solver's teacher on the evaluation noise (recorded in the result's reference)."""
    teachers = {}
    for solver in solvers:
        bar.set_postfix_str(f"teacher ({solver})")
        out, seconds, nfe = _sample(model, eval_noise, teacher, solver, eval_cond, max_batch)
        teachers[solver] = out
        if targets.data_range is None:  # no data to tell the range: the teacher's outputs set it
            targets.data_range = result.reference["data_range"] = float(out.max() - out.min()) or 1.0
        result.teacher_samples[solver] = out[:keep].clone()
        scores = _distribution_scores(model, out, targets)
        result.reference["teacher"][solver] = {"nfe": nfe, "sample_seconds": round(seconds, 4), **scores}
        bar.update(1)
    return teachers


def _make_all(model: Any, process: Any, names: list[str], solvers: list[str], steps: list[int], noise: torch.Tensor,
              cond: dict | None, teacher_steps: int, max_batch: int, options: dict, bar: Any,
              make: Callable[..., dict[int, Schedule]]) -> dict:
    """Every compared schedule: {(name, solver or None): {steps: Schedule}}."""
    made: dict[tuple[str, str | None], dict[int, Schedule]] = {}
    for name in names:
        # the OSS search distils the same teacher the evaluation uses; GITS and BOSS keep their papers' grids
        extra = {"teacher_steps": teacher_steps, "max_batch": max_batch} if name == "oss" else {}
        if name in SEARCH_VARIANTS:
            extra = {"teacher_steps": teacher_steps, "max_batch": max_batch, **SEARCH_VARIANTS[name]}
        for solver in (solvers if _solver_specific(name) else [None]):
            bar.set_postfix_str(f"schedule {name}" + (f" ({solver})" if solver else ""))
            made[(name, solver)] = make("oss" if name in SEARCH_VARIANTS else name, process, steps, model=model,
                                        noise=noise, cond=cond, solver=solver or "euler",
                                        **{**extra, **options.get(name, {})})
            bar.update(1)
    return made


def _row(model: Any, eval_noise: torch.Tensor, schedule: Schedule, name: str, solver: str, steps: int,
         eval_cond: dict | None, max_batch: int, teacher_out: torch.Tensor, targets: "_Targets"):
    """(the outputs, the result row) of one schedule run with one solver on the evaluation noise."""
    out, seconds, nfe = _sample(model, eval_noise, schedule, solver, eval_cond, max_batch)
    median, p90, p99 = error_quantiles(out, teacher_out)
    row = {"schedule": name, "solver": solver, "steps": steps, "nfe": nfe, "mse": mse(out, teacher_out),
           "psnr": psnr(out, teacher_out, targets.data_range), "mse_median": median, "mse_p90": p90, "mse_p99": p99,
           "mode_change": mode_change_rate(model, out, teacher_out), "selection": _selection(schedule),
           **_distribution_scores(model, out, targets), "search_seconds": schedule.metadata.get("search_seconds"),
           "sample_seconds": round(seconds, 4), "process": model_process(model).name,
           "times": [float(v) for v in schedule.times.tolist()]}
    return out, {key: row.get(key) for key in ROW_KEYS}


def _check_compare_inputs(steps: Sequence[int], solvers: Sequence[str], schedules: Sequence[str], teacher_steps: int,
                          options: dict[str, dict[str, Any]] | None):
    """(step counts, solver names, schedule names, options), checked."""
    steps = sorted({check_steps(s) for s in steps})
    if not steps:
        raise OptimalStepsError("compare needs at least one step count")
    too_many = [s for s in steps if s >= teacher_steps]
    if too_many:
        raise OptimalStepsError(f"step counts {too_many} are not fewer than the teacher's {teacher_steps} steps")
    solvers = list(dict.fromkeys(get_solver(s).name for s in solvers))
    names = list(dict.fromkeys(n if n in SEARCH_VARIANTS else check_name(n) for n in schedules))
    if not solvers or not names:
        raise OptimalStepsError("compare needs at least one solver and one schedule")
    options = options or {}
    strays = sorted(set(options) - set(names))
    if strays:
        raise OptimalStepsError(f"options given for schedules not compared: {', '.join(strays)}")
    return steps, solvers, names, options


def _selection(schedule: Schedule) -> list[dict] | None:
    """A validated schedule's candidates and their validation scores (optimize/select.py), else None."""
    rows = schedule.metadata.get("selection")
    if not rows:
        return None
    keys = ("name", "score", "mse", "p99", "far_tail", "tail_uniform_ratio", "data", "data_ratio", "eligible",
            "failed", "search_nfe")
    winner = schedule.metadata.get("winner")
    return [{**{k: r.get(k) for k in keys}, "won": r["name"] == winner} for r in rows]


def _solver_specific(name: str) -> bool:
    return name in SOLVER_SPECIFIC or name in SEARCH_VARIANTS


def _eval_conditions(cond: dict | None, eval_cond: dict | None, count: int) -> dict | None:
    if eval_cond is not None or not cond:
        return eval_cond
    per_sample = [k for k, v in cond.items() if not is_broadcast(v)]
    if per_sample:
        raise OptimalStepsError(f"per-sample conditions ({', '.join(per_sample)}) need eval_cond for the "
                                f"{count} evaluation samples")
    return cond


@dataclass
class _Targets:
    exact: torch.Tensor | None  # the exact ODE solution on the evaluation noise
    data: torch.Tensor | None  # true data samples
    data_range: float | None
    floor: dict[str, Any]  # scores of a second, independent set of true data samples
    data_features: torch.Tensor | None = None


def _references(model: Any, eval_noise: torch.Tensor, eval_seed: int, data_range: float | None) -> _Targets:
    exact = model.exact_solution(eval_noise) if callable(getattr(model, "exact_solution", None)) else None
    data = floor_set = None
    if callable(getattr(model, "data_samples", None)):
        generator = torch.Generator().manual_seed(eval_seed + 1)
        data = model.data_samples(eval_noise.shape[0], generator)
        floor_set = model.data_samples(eval_noise.shape[0], generator)
    if data_range is None:
        data_range = getattr(model, "data_range", None)
    if data_range is None and data is not None:
        data_range = float(data.max() - data.min())
    targets = _Targets(exact, data, None if data_range is None else float(data_range), {})
    if floor_set is not None:
        targets.floor = {"sw2": sliced_wasserstein(floor_set, data), "mmd": mmd(floor_set, data),
                         "nll": mixture_nll(model, floor_set) if hasattr(model, "log_prob") else None}
        if callable(getattr(model, "features", None)):
            # a Frechet distance in the features of a classifier trained on the same data (models that have one)
            targets.data_features = model.features(data)
            targets.floor["fd"] = frechet_distance(model.features(floor_set), targets.data_features)
    return targets


def _sample(model: Any, noise: torch.Tensor, schedule: Schedule, solver: str, cond: dict | None,
            max_batch: int) -> tuple[torch.Tensor, float, int]:
    """Samples on the schedule in chunks of at most max_batch: (samples, seconds, NFE per sample)."""
    result = sample(model, noise, schedule, solver=solver, cond=cond, max_batch=max_batch)
    return result.samples, result.seconds, result.nfe


def _distribution_scores(model: Any, out: torch.Tensor, targets: _Targets) -> dict[str, float | None]:
    return {"mse_exact": mse(out, targets.exact) if targets.exact is not None else None,
            "sw2": sliced_wasserstein(out, targets.data) if targets.data is not None else None,
            "mmd": mmd(out, targets.data) if targets.data is not None else None,
            "nll": mixture_nll(model, out) if hasattr(model, "log_prob") else None,
            "fd": (frechet_distance(model.features(out), targets.data_features)
                   if targets.data_features is not None else None)}


# ------------------------------------------------------------------------------------- the report


def report_paths(out_dir: str | Path) -> list[Path]:
    """The table files write_report always writes (plots come on top)."""
    return [Path(out_dir) / name for name in REPORT_FILES]


def write_report(result: CompareResult | Sequence[dict], out_dir: str | Path, overwrite: bool = False) -> list[Path]:
    """Write results.json (the rows), results.csv, results.md, reference.json and, if matplotlib is
    installed, schedules.png, error_vs_nfe.png and for image models samples_SOLVER_STEPS.png. Returns the paths."""
    if not isinstance(result, CompareResult):
        result = CompareResult([dict(r) for r in result], {})
    rows = result.rows
    if not rows:
        raise OptimalStepsError("no rows to report")
    plots = _plots(result)
    files = [("results.json", (json.dumps(rows, indent=1) + "\n").encode()),
             ("results.csv", _csv(rows).encode()),
             ("results.md", markdown_report(result, plot_names=[name for name, _ in plots]
                                            if plots is not None else None).encode()),
             ("reference.json", (json.dumps(result.reference, indent=1) + "\n").encode())]
    return write_together(Path(out_dir), files + list(plots or []), overwrite)


def write_together(directory: Path, files: list[tuple[str, bytes]], overwrite: bool = False) -> list[Path]:
    """Write a report's files as one: into a staging folder beside `directory`, then moved in (a new folder
    is renamed into place whole). Every target is checked first, so a refusal touches nothing, and a kill
    leaves either the old files or the new ones, never half a report."""
    targets = [directory / name for name, _ in files]
    if directory.exists() and not directory.is_dir():
        raise OptimalStepsError(f"{directory} is a file, not a folder for the report")
    for target in targets:
        if target.is_dir():
            raise OptimalStepsError(f"{directory} holds a folder {target.name} where a result file goes")
        check_writable(target, overwrite)
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = directory.parent / f".{directory.name}.{os.getpid()}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        for name, data in files:
            write_bytes(staging / name, data, overwrite=True)
        if not directory.exists():
            os.replace(staging, directory)
        else:
            for name, _ in files:
                os.replace(staging / name, directory / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return targets


def _csv(rows: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(ROW_KEYS), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (" ".join(f"{v:.6g}" for v in row[k]) if k == "times" else
                             json.dumps(row[k]) if k == "selection" and row.get(k) else
                             "" if row.get(k) is None else row[k]) for k in ROW_KEYS})
    return buffer.getvalue()


def _fmt(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e5):
            return f"{value:.3e}"
        return f"{value:.4g}"
    return str(value)


def best_in_group(rows: list[dict], key: str) -> set[int]:
    """Indices of the rows with the best value of `key` (ties all marked); None values never win."""
    values = [(i, r[key]) for i, r in enumerate(rows) if r.get(key) is not None and not math.isnan(r[key])]
    if len(values) < 2:
        return set()
    best = BETTER[key](v for _, v in values)
    return {i for i, v in values if v == best}


def markdown_table(rows: list[dict], group_keys: tuple[str, ...] = ("solver", "steps")) -> str:
    """One table, rows grouped by (solver, steps); the best quality value of each group in bold."""
    columns = ["steps", "schedule", "nfe", "mse", "psnr", "mse_median", "mse_p90", "mse_p99", "mode_change",
               "mse_exact", "sw2", "mmd", "nll", "fd", "search_seconds", "sample_seconds"]
    # a column no row has a value for (FD on a mixture, NLL on images) is left out
    columns = [c for c in columns if c not in BETTER or any(row.get(c) is not None for row in rows)]
    titles = {"nfe": "NFE", "mse": "MSE", "psnr": "PSNR dB", "mse_median": "median err", "mse_p90": "p90 err",
              "mse_p99": "p99 err", "mode_change": "mode change", "mse_exact": "MSE exact", "sw2": "SW2", "mmd": "MMD²",
              "nll": "NLL", "fd": "FD", "search_seconds": "search s", "sample_seconds": "sample s"}
    lines = ["| " + " | ".join(titles.get(c, c) for c in columns) + " |",
             "|" + "|".join("---" if c in ("schedule",) else "---:" for c in columns) + "|"]
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault(tuple(row[k] for k in group_keys), []).append(row)
    for group in groups.values():
        marks = {key: best_in_group(group, key) for key in BETTER}
        for i, row in enumerate(group):
            cells = []
            for c in columns:
                text = _fmt(row.get(c))
                cells.append(f"**{text}**" if c in BETTER and i in marks[c] else text)
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown_report(result: CompareResult, plot_names: list[str] | None = None) -> str:
    ref = result.reference
    parts = ["# Schedule comparison", ""]
    if ref:
        parts += [f"Model `{ref['model']}` ({ref['process']}). Teacher: {ref['teacher_steps']} steps of each solver on "
                  f"the {ref['teacher_grid']} grid. Searched schedules used {ref['search_samples']} search samples "
                  f"(seed {ref['seed']}); every schedule is evaluated on {ref['eval_samples']} fresh noise samples "
                  f"(seed {ref['eval_seed']}) that no search saw.", ""]
    parts += ["Columns: MSE and PSNR against the teacher on the same noise"
              + (f" (PSNR data range {_fmt(ref.get('data_range'))})" if ref else "")
              + "; median / p90 / p99 err the quantiles of the per-sample error against the teacher; mode change "
              "the fraction of samples whose mode (a mixture's most likely component, a digit model's class) "
              "differs from the teacher's"
              + "; MSE exact against the exact ODE solution; SW2 (sliced Wasserstein-2, 256 directions) and MMD² "
              "(unbiased, RBF kernel, median-distance bandwidth of the data) against true data samples; NLL the "
              "exact mean negative log-likelihood under the data density; FD the Frechet distance in the features "
              "of a classifier trained on the same data (image models); search and sampling wall time in "
              "seconds. – means the metric does not apply. **Bold**: the best value of its (solver, steps) "
              "block.", ""]
    if ref.get("teacher"):
        parts += ["## Reference levels", "",
                  "| set | NFE | MSE exact | SW2 | MMD² | NLL | FD |", "|---|---:|---:|---:|---:|---:|---:|"]
        for solver, scores in ref["teacher"].items():
            parts.append(f"| teacher ({solver}) | {scores['nfe']} | {_fmt(scores['mse_exact'])} "
                         f"| {_fmt(scores['sw2'])} | {_fmt(scores['mmd'])} | {_fmt(scores['nll'])} "
                         f"| {_fmt(scores.get('fd'))} |")
        if ref.get("floor"):
            floor = ref["floor"]
            parts.append(f"| independent data samples | – | – | {_fmt(floor['sw2'])} | {_fmt(floor['mmd'])} "
                         f"| {_fmt(floor['nll'])} | {_fmt(floor.get('fd'))} |")
        parts += ["", "Distances below the data-vs-data floor are sampling noise, not differences.", ""]
    for solver in dict.fromkeys(r["solver"] for r in result.rows):
        parts += [f"## {solver}", "", markdown_table([r for r in result.rows if r["solver"] == solver]), ""]
    parts += selection_sections(result.rows)
    if plot_names is None:
        parts += ["Plots skipped: matplotlib is not installed (pip install optimalsteps[plot]).", ""]
    elif plot_names:
        parts += ["## Plots", ""] + [f"![{name}]({name})" for name in plot_names] + [""]
    return "\n".join(parts)


def selection_sections(rows: list[dict]) -> list[str]:
    """Each validated schedule's candidates with their validation scores and guard ratios (the winner bold;
    a candidate a guard ruled out lists the guards it failed)."""
    parts = []
    for row in rows:
        if not row.get("selection"):
            continue
        ranked = sorted(row["selection"], key=lambda c: c["score"])
        parts += [f"### Candidates of {row['schedule']} ({row['solver']}, {row['steps']} steps), on validation", "",
                  "| candidate | objective | MSE | p99 err | far tail / uniform | data / closest | failed | search NFE |",
                  "|---|---:|---:|---:|---:|---:|---|---:|"]
        parts += [f"| {'**' + c['name'] + '**' if c.get('won') else c['name']} | {_fmt(c['score'])} | {_fmt(c['mse'])} "
                  f"| {_fmt(c['p99'])} | {_fmt(c.get('tail_uniform_ratio'))} | {_fmt(c.get('data_ratio'))} "
                  f"| {', '.join(c.get('failed') or []) or '–'} | {c['search_nfe']} |" for c in ranked]
        parts.append("")
    return parts


# ------------------------------------------------------------------------------------------ plots


def _plots(result: CompareResult) -> list[tuple[str, bytes]] | None:
    """(file name, PNG bytes) of each plot, or None without matplotlib."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return None

    def png(figure: Any) -> bytes:
        buffer = io.BytesIO()
        FigureCanvasAgg(figure).print_png(buffer)
        return buffer.getvalue()

    out = [("schedules.png", png(_schedule_figure(Figure, result.rows))),
           ("error_vs_nfe.png", png(_error_figure(Figure, result.rows)))]
    if len(result.sample_shape) == 3 and result.samples:
        for solver, steps in dict.fromkeys((k[1], k[2]) for k in result.samples):
            figure = _grid_figure(Figure, result, solver, steps)
            out.append((f"samples_{solver}_{steps}.png", png(figure)))
    return out


def _schedule_figure(Figure: Any, rows: list[dict]) -> Any:
    """Native time against step index, one axis per step count, one line per distinct schedule."""
    step_counts = sorted({r["steps"] for r in rows})
    cols = min(4, len(step_counts))
    nrows = math.ceil(len(step_counts) / cols)
    figure = Figure(figsize=(4.2 * cols, 3.4 * nrows), layout="constrained")
    axes = figure.subplots(nrows, cols, squeeze=False).ravel()
    process = rows[0].get("process") or ""
    for ax, m in zip(axes, step_counts):
        lines: dict[tuple, list[str]] = {}
        for r in rows:
            if r["steps"] == m:
                lines.setdefault((r["schedule"], tuple(round(v, 10) for v in r["times"])), []).append(r["solver"])
        for (name, times), solvers in lines.items():
            # a solver-specific schedule (oss, dm) gets one line per solver
            several = sum(1 for other, _ in lines if other == name) > 1
            label = f"{name} ({', '.join(solvers)})" if several else name
            ax.plot(range(m + 1), times, marker="o", markersize=3, linewidth=1, label=label)
        ax.set_title(f"{m} steps")
        ax.set_xlabel("step")
        ax.set_ylabel(f"time ({process})")
        if process.startswith("ve"):
            ax.set_yscale("symlog", linthresh=1e-2)
        ax.legend(fontsize=6)
    for ax in axes[len(step_counts):]:
        ax.set_visible(False)
    return figure


def _error_figure(Figure: Any, rows: list[dict]) -> Any:
    """MSE against the teacher (and the exact solution where known) vs NFE, one column per solver."""
    from matplotlib.ticker import MaxNLocator

    solvers = list(dict.fromkeys(r["solver"] for r in rows))
    keys = ["mse"] + (["mse_exact"] if any(r["mse_exact"] is not None for r in rows) else [])
    figure = Figure(figsize=(4.6 * len(solvers), 3.6 * len(keys)), layout="constrained")
    axes = figure.subplots(len(keys), len(solvers), squeeze=False)
    for col, solver in enumerate(solvers):
        for row_i, key in enumerate(keys):
            ax = axes[row_i][col]
            for name in dict.fromkeys(r["schedule"] for r in rows):
                points = sorted((r["nfe"], r[key]) for r in rows
                                if r["solver"] == solver and r["schedule"] == name and r[key] is not None)
                if points:
                    ax.plot(*zip(*points), marker="o", markersize=3, linewidth=1, label=name)
            ax.set_yscale("log")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_xlabel("NFE")
            ax.set_ylabel("MSE vs teacher" if key == "mse" else "MSE vs exact solution")
            ax.set_title(solver)
            ax.legend(fontsize=6)
    return figure


def _grid_figure(Figure: Any, result: CompareResult, solver: str, steps: int) -> Any:
    """The first evaluation samples of each schedule (rows), the teacher's on top, for image models."""
    names = [n for (n, s, m) in result.samples if s == solver and m == steps]
    sets = [("teacher", result.teacher_samples.get(solver))] + [(n, result.samples[(n, solver, steps)]) for n in names]
    sets = [(n, x) for n, x in sets if x is not None]
    everything = torch.cat([x for _, x in sets])
    lo, hi = float(everything.min()), float(everything.max())
    count = max(x.shape[0] for _, x in sets)
    figure = Figure(figsize=(1.1 * count + 1.2, 1.1 * len(sets)), layout="constrained")
    axes = figure.subplots(len(sets), count, squeeze=False)
    for r, (name, images) in enumerate(sets):
        for c in range(count):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c < images.shape[0]:
                img = ((images[c].to(torch.float32) - lo) / max(hi - lo, 1e-12)).clamp(0, 1)
                if img.shape[0] == 1:
                    ax.imshow(img[0].numpy(), cmap="gray", vmin=0, vmax=1)
                else:
                    ax.imshow(img[:3].permute(1, 2, 0).numpy())
            if c == 0:
                ax.set_ylabel(name, fontsize=7)
    figure.suptitle(f"{solver}, {steps} steps", fontsize=9)
    return figure

