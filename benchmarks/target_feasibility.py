"""Can any schedule meet issue 12's three targets at once? An oracle that searches on the evaluation noise itself.

For each mixture cell (bed, solver, steps) the baselines are scored exactly as benchmarks/quality_targets.py
scores them (`compare` with the same search and evaluation noise, teacher, data and PSNR range), which fixes
the three limits: PSNR >= the best baseline's - 0.1 dB, sliced W2 to data <= 1.05x the best baseline's, p99
per-sample error <= 1.1x uniform's. Then schedules are searched *on the 1,024 evaluation noises themselves*
(an oracle no real search can be: it fits the very noise it is judged on):

- the DP on the evaluation noise's own teacher trajectories (objectives `log` and `mse`), all 1,024 samples,
  on every second point of the 200-step teacher grid (the full grid costs four times the CPU time);
- blends t = a t_dp + (1 - a) t_safe of that DP's schedule with each baseline meeting the p99 target;
- Nelder-Mead from the most promising of these and of the baselines, over the step sizes (a softmax of free
  logits, so every schedule stays monotone), minimising -PSNR plus a steep penalty for each missed limit.

With `--fit-seed S` the oracle fits on another draw of as many noises (seed S, its own teacher, data and
limits from the baselines scored there) and its schedule is then judged on the evaluation noise: what a search
with 1,024 validation samples and this much fitting could at best reach, out of sample.

A cell where even this oracle meets no combination of targets has no schedule that does (as far as a local
search finds), so no choice among candidates can. Per cell it prints the limits, the oracle's best schedule's
PSNR / data / p99 and its marks, and the *frontier*: the best PSNR among the schedules it evaluated that meet
the p99 and data limits. Model calls are cheap on the exact mixture; the cost is CPU time (about 1-2 min per
cell on one core).

`--step-saving M,...` asks the same of the step-saving aim (4x: dpmpp2m at 5 steps as close to the exact ODE
solution as uniform Euler at 20): per process, the PSNR to the exact solution of the default (validated)
schedule, the plain DP and the DP fitted on the evaluation noise (the first 256 noises, every second grid point)
at each of those step counts.

Run: nice -n 10 python benchmarks/target_feasibility.py [--beds gmm-flow,gmm-vp,gmm-ve] [--seeds 0] [--dims 32]
     [--solvers euler,heun,dpmpp2m] [--steps 4,8] [--polish 150] [--rows FILE.json] [--report A.json,...]
     [--fit-seed 7] [--defaults ROWS.json,...] [--step-saving 4,5,6]
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from scipy.optimize import minimize

from optimalsteps.core.models import draw_noise, model_process, model_teacher_grid
from optimalsteps.core.schedules import Schedule
from optimalsteps.core.solvers import sample
from optimalsteps.evaluation.compare import EVAL_SEED_OFFSET, compare
from optimalsteps.evaluation.metrics import error_quantiles, psnr, sliced_wasserstein
from optimalsteps.optimize.beam import beam_dp
from optimalsteps.optimize.search import search
from optimalsteps.optimize.teacher import run_teacher
from optimalsteps.testbeds.mixture import GaussianMixture
from quality_targets import BASELINES, FLOW_TABLES, step_saving_setup, cells as target_checks  # the sibling script's

PENALTY = 200.0  # dB per unit of log-ratio by which a limit is missed: feasibility first, then PSNR
BLENDS = (0.2, 0.4, 0.6, 0.8)
DP_STRIDE = 2
TARGETS = ("psnr", "data", "p99")


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--beds", default="gmm-flow,gmm-vp,gmm-ve")
    p.add_argument("--seeds", default="0")
    p.add_argument("--dims", default="32")
    p.add_argument("--solvers", default="euler,heun,dpmpp2m")
    p.add_argument("--steps", default="4,8")
    p.add_argument("--samples", type=int, default=16, help="search samples of the baselines that search (gits, boss)")
    p.add_argument("--eval-samples", type=int, default=1024)
    p.add_argument("--teacher-steps", type=int, default=200)
    p.add_argument("--polish", type=int, default=150, help="Nelder-Mead evaluations per start (two starts)")
    p.add_argument("--rows", default=None, help="JSON file the cells accumulate in (done cells are skipped)")
    p.add_argument("--report", default=None, help="only report the cells of these JSON files (comma-separated)")
    p.add_argument("--fit-seed", type=int, default=None, help="fit on this noise seed's draw instead and judge "
                   "the schedule found on the evaluation noise (an upper bound for a search with that many samples)")
    p.add_argument("--defaults", default=None, help="quality_targets.py rows files (comma-separated): show the "
                   "default schedule's marks in the same cells")
    p.add_argument("--step-saving", default=None, help="only the step-saving check at these dpmpp2m step counts")
    return p.parse_args()


class Cell:
    """One (model, solver, steps) cell on one noise set: its noise, teacher, data and the three limits."""

    def __init__(self, model, solver: str, steps: int, noise_seed: int, args: argparse.Namespace):
        self.model, self.solver, self.steps = model, solver, steps
        self.process = model_process(model)
        self.noise = draw_noise(model, args.eval_samples, noise_seed)
        # compare's references: the first of two data draws from the noise seed + 1, its spread as the PSNR range
        self.data = model.data_samples(args.eval_samples, torch.Generator().manual_seed(noise_seed + 1))
        self.data_range = float(self.data.max() - self.data.min())
        self.grid = model_teacher_grid(model, args.teacher_steps)
        self.teacher = run_teacher(model, self.noise, self.grid, solver, keep_x0=False).states
        self.reference = self.teacher[:, -1]
        self.limits = {"psnr": -math.inf, "data": math.inf, "p99": math.inf}  # none until set_limits
        self.evaluated: list[dict] = []

    def set_limits(self, rows: list[dict]) -> None:
        """The three limits from the baselines' scores (compare's rows: schedule, psnr, sw2, mse_p99); the
        schedules scored so far are judged again against them."""
        by = {r["schedule"]: r for r in rows}
        best_psnr = max(rows, key=lambda r: r["psnr"])
        best_data = min(rows, key=lambda r: r["sw2"])
        self.limits = {"psnr": best_psnr["psnr"] - 0.1, "data": 1.05 * best_data["sw2"],
                       "p99": 1.1 * by["uniform"]["mse_p99"]}
        self.best = {"psnr": (best_psnr["schedule"], best_psnr["psnr"]), "data": (best_data["schedule"],
                     best_data["sw2"]), "uniform_p99": by["uniform"]["mse_p99"]}
        for row in self.evaluated:
            self._judge(row)

    def score_baselines(self, baselines: dict[str, list[float]], set_limits: bool = False) -> list[dict]:
        """The baselines scored on this cell's noise; `set_limits`: the limits come from these scores (no
        compare run for this noise)."""
        rows = [self.score(times, name) for name, times in baselines.items()]
        if set_limits:
            self.set_limits([{"schedule": r["name"], "psnr": r["psnr"], "sw2": r["data"], "mse_p99": r["p99"]}
                             for r in rows])
        return rows

    def score(self, times, name: str) -> dict:
        """PSNR / data / p99 of a schedule on this cell's noise, as compare scores them, judged on the limits."""
        schedule = Schedule(torch.as_tensor(np.asarray(times), dtype=torch.float64), self.process)
        out = sample(self.model, self.noise, schedule, solver=self.solver).samples
        row = {"name": name, "times": [float(t) for t in schedule.times],
               "psnr": psnr(out, self.reference, self.data_range), "data": sliced_wasserstein(out, self.data),
               "p99": error_quantiles(out, self.reference, (0.99,))[0]}
        self._judge(row)
        self.evaluated.append(row)
        return row

    def _judge(self, row: dict) -> None:
        """Which limits a scored schedule meets, and its loss: -PSNR plus PENALTY per missed limit."""
        row["ok"] = {"psnr": row["psnr"] >= self.limits["psnr"], "data": row["data"] <= self.limits["data"],
                     "p99": row["p99"] <= self.limits["p99"]}
        missed = [row[k] / self.limits[k] for k in ("data", "p99") if row[k] > self.limits[k]]
        row["loss"] = -row["psnr"] + PENALTY * sum(math.log(ratio) for ratio in missed)


def strided(teacher_steps: int) -> list[int]:
    """Every DP_STRIDE-th point of the teacher grid and its clean end: the oracle's DP grid."""
    return list(range(0, teacher_steps, DP_STRIDE)) + [teacher_steps]


def _logits(times: list[float], t0: float, t1: float) -> np.ndarray:
    steps = np.diff((np.asarray(times, dtype=np.float64) - t0) / (t1 - t0))
    return np.log(np.clip(steps, 1e-9, None))


def _times(logits: np.ndarray, t0: float, t1: float) -> np.ndarray:
    w = np.exp(logits - logits.max())
    return t0 + (t1 - t0) * np.concatenate([[0.0], np.cumsum(w) / w.sum()])


def oracle(cell: Cell, baselines: list[dict], polish: int) -> None:
    """Every schedule the oracle tries is scored into cell.evaluated (`baselines`: their rows, scored there)."""
    dps = {}
    for objective in ("log", "mse"):
        found = beam_dp(cell.model, cell.teacher, cell.grid.times, cell.steps, cell.solver, objective, 1,
                        grid=strided(cell.grid.steps))
        dps[objective] = cell.grid.times[found.indices].tolist()
        cell.score(dps[objective], f"eval-dp-{objective}")
    safe = [r for r in baselines if r["ok"]["p99"]]
    for r in safe:
        for a in BLENDS:
            mixed = a * np.asarray(dps["log"]) + (1 - a) * np.asarray(r["times"])
            cell.score(mixed, f"blend({a}, {r['name']})")
    t0, t1 = float(cell.grid.times[0]), float(cell.grid.times[-1])
    starts = sorted(cell.evaluated, key=lambda r: r["loss"])[:2]
    for start in starts:
        minimize(lambda z: cell.score(_times(z, t0, t1), f"polish({start['name']})")["loss"],
                 _logits(start["times"], t0, t1), method="Nelder-Mead",
                 options={"maxfev": polish, "xatol": 1e-5, "fatol": 1e-4})


def summary(cell: Cell, bed: str) -> dict:
    best = min(cell.evaluated, key=lambda r: r["loss"])
    safe = [r for r in cell.evaluated if r["ok"]["data"] and r["ok"]["p99"]]
    frontier = max(safe, key=lambda r: r["psnr"]) if safe else None
    pairs = {f"{a}+{b}": any(r["ok"][a] and r["ok"][b] for r in cell.evaluated)
             for a, b in (("psnr", "data"), ("psnr", "p99"), ("data", "p99"))}
    return {"bed": bed, "solver": cell.solver, "steps": cell.steps, "limits": cell.limits, "best_baselines": cell.best,
            "oracle": {k: best[k] for k in ("name", "psnr", "data", "p99", "ok", "times")},
            "frontier": None if frontier is None else {k: frontier[k] for k in ("name", "psnr", "data", "p99", "times")},
            "pairs": pairs, "evaluated": len(cell.evaluated)}


def run_bed(bed: str, model, args: argparse.Namespace, done: set) -> list[dict]:
    process = model_process(model).name
    names = BASELINES + (FLOW_TABLES if process == "flow" else [])
    steps = [int(s) for s in args.steps.split(",")]
    out = []
    for solver in args.solvers.split(","):
        todo = [m for m in steps if (bed, solver, m) not in done]
        if not todo:
            continue
        rows = compare(model, steps=todo, solvers=[solver], schedules=names, samples=args.samples,
                       eval_samples=args.eval_samples, seed=0, teacher_steps=args.teacher_steps).rows
        for m in todo:
            started = time.perf_counter()
            group = [r for r in rows if r["steps"] == m]
            baselines = {r["schedule"]: r["times"] for r in group}
            cell = Cell(model, solver, m, EVAL_SEED_OFFSET, args)  # compare's evaluation noise for seed 0
            cell.set_limits(group)
            if args.fit_seed is None:
                oracle(cell, cell.score_baselines(baselines), args.polish)
                out.append(summary(cell, bed))
            else:  # fitted on other noise, judged on the evaluation noise: what a search could at best reach
                fit = Cell(model, solver, m, args.fit_seed, args)
                oracle(fit, fit.score_baselines(baselines, set_limits=True), args.polish)
                out.append(summary(fit, bed))
                chosen = fit_choice(out[-1])
                held = cell.score(chosen["times"], chosen["name"])
                out[-1]["held"] = {k: held[k] for k in ("name", "psnr", "data", "p99", "ok")}
                out[-1]["held_limits"] = cell.limits
            print(line(out[-1]) + f"  ({time.perf_counter() - started:.0f}s)", flush=True)
    return out


def fit_choice(c: dict) -> dict:
    """The schedule the oracle found on its noise: the best PSNR meeting all three there, else the least loss."""
    return c["frontier"] if all_three(c) else c["oracle"]


def marks(ok: dict) -> str:
    return "".join("✓" if ok[k] else "✗" for k in TARGETS)


def all_three(c: dict) -> bool:
    """Some schedule met all three: the best PSNR among those meeting data and p99 also meets the PSNR limit."""
    return c["frontier"] is not None and c["frontier"]["psnr"] >= c["limits"]["psnr"]


def line(c: dict, default: str | None = None) -> str:
    lim, f = c["limits"], c["frontier"]
    # the schedule shown: the frontier's when it meets all three, else the one with the least penalised loss
    shown = dict(f, ok={"psnr": True, "data": True, "p99": True}) if all_three(c) else c["oracle"]
    front = "none" if f is None else f"{f['psnr']:.2f} ({f['name']})"
    return (f"| {c['bed']} | {c['solver']} | {c['steps']} | {lim['psnr']:.2f} / {lim['data']:.3g} / {lim['p99']:.3g} "
            f"| {shown['psnr']:.2f} / {shown['data']:.3g} / {shown['p99']:.3g} | {marks(shown['ok'])} | {front} "
            f"| {' '.join('✓' if v else '✗' for v in c['pairs'].values())} |"
            + ("" if "held" not in c else f" {marks(c['held']['ok'])} |")
            + ("" if default is None else f" {default} |"))


def default_marks(paths: str | None) -> dict[tuple, str]:
    """The default schedule's target marks per cell, from benchmarks/quality_targets.py rows files."""
    if not paths:
        return {}
    rows = [r for f in paths.split(",") for r in json.loads(Path(f).read_text())]
    return {(c["bed"], c["solver"], c["steps"]): marks({k: c[f"{k}_ok"] for k in TARGETS}) for c in target_checks(rows)}


def report(cells: list[dict], defaults: dict[tuple, str] | None = None) -> str:
    defaults = defaults or {}
    held = all("held" in c for c in cells) and bool(cells)
    shown = {(c["bed"], c["solver"], c["steps"]): defaults.get((c["bed"], c["solver"], c["steps"]), "–")
             for c in cells} if defaults else {}
    lines = ["| bed | solver | M | limits: PSNR >= / data <= / p99 <= | oracle's best: PSNR / data / p99 | marks "
             "| frontier: best PSNR meeting data and p99 | pairs met (PSNR+data, PSNR+p99, data+p99) |"
             + (" its schedule on the evaluation noise |" if held else "") + (" default |" if defaults else ""),
             "|---|---|---:|---|---|---|---|---|" + ("---|" if held else "") + ("---|" if defaults else "")]
    lines += [line(c, shown.get((c["bed"], c["solver"], c["steps"]))) for c in cells]
    total = len(cells)
    lines.append("")
    if held:
        lines.append(f"- fitted on other noise (its limits from the baselines there), the oracle's schedule meets all "
                     f"three on the evaluation noise in {sum(all(c['held']['ok'].values()) for c in cells)} of "
                     f"{total} cells (PSNR {sum(c['held']['ok']['psnr'] for c in cells)}, data "
                     f"{sum(c['held']['ok']['data'] for c in cells)}, p99 {sum(c['held']['ok']['p99'] for c in cells)})")
    if defaults:
        met = [k for k, v in shown.items() if v == "✓✓✓"]
        met_by_oracle = (lambda c: all(c["held"]["ok"].values())) if held else all_three
        others = sum(met_by_oracle(c) for c in cells if (c["bed"], c["solver"], c["steps"]) not in met)
        lines.append(f"- the default (quality_targets.py's run) meets all three in {len(met)} of these {total} cells; "
                     f"the oracle{' (on the evaluation noise)' if held else ''} meets them in {others} of the others")
    lines.append(f"- some schedule the oracle tried meets all three targets: {sum(map(all_three, cells))} of {total} cells")
    for pair in ("psnr+data", "psnr+p99", "data+p99"):
        lines.append(f"- some schedule it tried meets {pair.replace('+', ' and ')}: "
                     f"{sum(c['pairs'][pair] for c in cells)} of {total} cells")
    return "\n".join(lines)


def step_saving(args: argparse.Namespace) -> str:
    """Per process and step count: dpmpp2m PSNR to the exact solution of the default, the plain DP and the DP
    fitted on the evaluation noise, against uniform Euler at 20 steps (quality_targets.py's step saving)."""
    lines = ["| process | uniform euler 20 steps | steps | default (its winner) | plain DP | DP fitted on the evaluation noise |",
             "|---|---:|---:|---|---:|---:|"]
    dim = int(args.dims.split(",")[0])
    for process in (b[4:] for b in args.beds.split(",")):
        model, noise, evaluation, exact, data_range, goal = step_saving_setup(process, dim, args)

        def score(schedule) -> float:
            return psnr(sample(model, evaluation, schedule, "dpmpp2m").samples, exact, data_range)

        grid = model_teacher_grid(model, args.teacher_steps)
        fitted_on = run_teacher(model, evaluation[:256], grid, "dpmpp2m", keep_x0=False).states
        for steps in (int(m) for m in args.step_saving.split(",")):
            default = search(model, noise, steps, args.teacher_steps, "dpmpp2m", seed=0).schedule
            plain = search(model, noise, steps, args.teacher_steps, "dpmpp2m", seed=0, method="dp").schedule
            found = beam_dp(model, fitted_on, grid.times, steps, "dpmpp2m", "log", 1, grid=strided(grid.steps))
            oracle_schedule = Schedule(grid.times[found.indices], model_process(model))
            lines.append(f"| {process} (dim {dim}) | {goal:.2f} | {steps} | {score(default):.2f} "
                         f"({default.metadata.get('winner')}) | {score(plain):.2f} | {score(oracle_schedule):.2f} |")
            print(lines[-1], flush=True)
    return "\n".join(lines)


def main() -> None:
    args = parse()
    torch.set_num_threads(1)
    if args.step_saving:
        print(step_saving(args))
        return
    if args.report:
        cells = [c for f in args.report.split(",") for c in json.loads(Path(f).read_text())]
        print(report(cells, default_marks(args.defaults)))
        return
    path = Path(args.rows) if args.rows else None
    cells = json.loads(path.read_text()) if path is not None and path.exists() else []
    done = {(c["bed"], c["solver"], c["steps"]) for c in cells}
    for seed in (int(s) for s in args.seeds.split(",")):
        for dim in (int(d) for d in args.dims.split(",")):
            for process in (b[4:] for b in args.beds.split(",")):
                model = GaussianMixture.random(dim=dim, components=8, seed=100 + seed, process=process)
                model.spec = f"gmm:dim={dim},components=8,seed={100 + seed},process={process}"
                cells += run_bed(f"gmm-{process}-d{dim}-s{seed}", model, args, done)
                if path is not None:
                    path.write_text(json.dumps(cells, indent=0) + "\n")
    print(report(cells, default_marks(args.defaults)))


if __name__ == "__main__":
    main()
