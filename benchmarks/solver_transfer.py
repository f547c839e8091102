"""Schedule transfer between solvers: how a schedule searched for one solver does when run with another.

For each model (the exact Gaussian mixture in flow, vp and ve, and the trained digits-flow net), OSS
searches an M-step schedule for each of euler, heun, dpmpp2m and unipc (joint DP on the search noise,
against that solver's own teacher), then every schedule, and the process's default closed form (uniform
for flow / vp, Karras for ve), runs with every solver on held-out noise. Each cell is the mean per-sample
PSNR (dB) and the mean MSE against one reference on the same noise, the same for every solver: the exact
ODE solution for the mixtures, a long UniPC run for the digits net (its own distance to a run of half as
many steps is printed). PSNR's data range is the reference's spread.

Prints the markdown of the section "Schedule transfer between solvers" of docs/results-mixture.md and
docs/results-digits.md.

Run: nice -n 10 python benchmarks/solver_transfer.py [--quick] [--models flow,vp,ve,digits-flow]
"""

from __future__ import annotations

import argparse
import time

import torch

from optimalsteps.core.models import default_teacher_grid, draw_noise
from optimalsteps.core.schedules import Schedule
from optimalsteps.core.solvers import nfe_per_trajectory, sample
from optimalsteps.evaluation.metrics import mse, psnr
from optimalsteps import search
from optimalsteps.testbeds.registry import load_model

SOLVERS = ("euler", "heun", "dpmpp2m", "unipc")
MIXTURE = "gmm:dim={dim},components={components},seed=0,process={process}"


def settings(quick: bool) -> dict:
    if quick:
        return dict(dim=8, components=4, samples=4, eval_samples=128, teacher_steps=40, steps=[4],
                    digits_samples=4, digits_steps=[4], digits_teacher_steps=30, reference_steps=60)
    return dict(dim=32, components=8, samples=32, eval_samples=1024, teacher_steps=200, steps=[4, 8],
                digits_samples=16, digits_steps=[6], digits_teacher_steps=60, reference_steps=100)


def reference_outputs(model, noise: torch.Tensor, steps: int) -> tuple[torch.Tensor, str]:
    """The common reference on the held-out noise, and how it was made."""
    if hasattr(model, "exact_solution"):
        return model.exact_solution(noise), "the exact ODE solution (DOP853, rtol 1e-10)"
    grid = default_teacher_grid(model.process, steps)
    full = sample(model, noise, grid, "unipc").samples
    half = sample(model, noise, default_teacher_grid(model.process, steps // 2), "unipc").samples
    spread = float(full.max() - full.min())
    return full, (f"{steps}-step UniPC on the default grid (its PSNR to {steps // 2} steps: "
                  f"{psnr(half, full, spread):.1f} dB)")


def searched_schedules(model, noise: torch.Tensor, steps: int, teacher_steps: int) -> dict[str, Schedule]:
    """One OSS schedule per solver, each searched against that solver's own teacher; then the default."""
    out = {}
    for solver in SOLVERS:
        out[f"oss-{solver}"] = search(model, noise, steps=steps, teacher_steps=teacher_steps, solver=solver).schedule
    out["default"] = default_teacher_grid(model.process, steps)
    return out


def transfer_rows(model, schedules: dict[str, Schedule], noise: torch.Tensor, reference: torch.Tensor,
                  data_range: float) -> list[dict]:
    rows = []
    for name, schedule in schedules.items():
        for solver in SOLVERS:
            out = sample(model, noise, schedule, solver).samples
            rows.append({"schedule": name, "solver": solver, "psnr": psnr(out, reference, data_range),
                         "mse": mse(out, reference), "nfe": nfe_per_trajectory(solver, schedule.steps)})
    return rows


def _best(rows: list[dict], solver: str, key: str, pick) -> str:
    return pick((r for r in rows if r["solver"] == solver), key=lambda r: r[key])["schedule"]


def markdown(title: str, steps: int, rows: list[dict], schedules: dict[str, Schedule]) -> str:
    lines = [f"#### {title}, {steps} steps: mean PSNR dB / mean MSE against the reference (rows: schedule, "
             "columns: the solver that runs it; bold: the column's best of each)", "",
             "| schedule searched for | times | " + " | ".join(f"{s} (NFE {nfe_per_trajectory(s, steps)})"
                                                          for s in SOLVERS) + " |",
             "|---|---|" + "---:|" * len(SOLVERS)]
    # mean PSNR averages log errors, mean MSE the errors: the hardest samples weigh more in the MSE
    best_psnr = {s: _best(rows, s, "psnr", max) for s in SOLVERS}
    best_mse = {s: _best(rows, s, "mse", min) for s in SOLVERS}
    for name, schedule in schedules.items():
        cells = []
        for solver in SOLVERS:
            r = next(r for r in rows if r["schedule"] == name and r["solver"] == solver)
            p, m = f"{r['psnr']:.2f}", f"{r['mse']:.3g}"
            cells.append(f"{f'**{p}**' if best_psnr[solver] == name else p} / "
                         f"{f'**{m}**' if best_mse[solver] == name else m}")
        times = ", ".join(f"{t:.3g}" for t in schedule.times.tolist())
        label = name.removeprefix("oss-") if name.startswith("oss-") else "(default closed form)"
        lines.append(f"| {label} | {times} | " + " | ".join(cells) + " |")
    lines += ["", *switching_notes(rows), ""]
    return "\n".join(lines)


def switching_notes(rows: list[dict]) -> list[str]:
    """Per running solver: its own schedule against the best and worst other solver's schedule (by mean
    PSNR), and the default; MSE as a ratio to the own schedule's."""
    notes = []
    for solver in SOLVERS:
        col = {r["schedule"]: r for r in rows if r["solver"] == solver}
        own = col[f"oss-{solver}"]
        others = [k for k in col if k.startswith("oss-") and k != f"oss-{solver}"]
        best = max(others, key=lambda k: col[k]["psnr"])
        worst = min(others, key=lambda k: col[k]["psnr"])

        def versus(name: str) -> str:
            return f"{col[name]['psnr'] - own['psnr']:+.2f} dB, MSE x{col[name]['mse'] / own['mse']:.2f}"
        notes.append(f"- run with {solver}: own schedule {own['psnr']:.2f} dB (MSE {own['mse']:.3g}); best other "
                     f"{best.removeprefix('oss-')} {versus(best)}; worst other {worst.removeprefix('oss-')} "
                     f"{versus(worst)}; default {versus('default')}")
    return notes


def run_model(spec: str, title: str, steps_list: list[int], cfg: dict, teacher_steps: int, samples: int) -> str:
    started = time.perf_counter()
    model = load_model(spec)
    search_noise = draw_noise(model, samples, 0)
    eval_noise = draw_noise(model, cfg["eval_samples"], 1)  # held out: another seed than the search's
    reference, how = reference_outputs(model, eval_noise, cfg["reference_steps"])
    data_range = float(reference.max() - reference.min())
    parts = [f"### {title}", "",
             f"`{spec}`; search: {samples} noises (seed 0), {teacher_steps}-step teacher of each solver; "
             f"evaluation: {cfg['eval_samples']} held-out noises (seed 1) against {how}; PSNR range "
             f"{data_range:.3g}.", ""]
    for steps in steps_list:
        schedules = searched_schedules(model, search_noise, steps, teacher_steps)
        rows = transfer_rows(model, schedules, eval_noise, reference, data_range)
        parts.append(markdown(title, steps, rows, schedules))
    parts.append(f"<!-- {title}: {time.perf_counter() - started:.0f} s -->")
    return "\n".join(parts) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--models", default="flow,vp,ve,digits-flow")
    args = parser.parse_args()
    torch.set_num_threads(2)
    cfg = settings(args.quick)
    for name in args.models.split(","):
        if name in ("flow", "vp", "ve"):
            spec = MIXTURE.format(dim=cfg["dim"], components=cfg["components"], process=name)
            print(run_model(spec, f"mixture {name}", cfg["steps"], cfg, cfg["teacher_steps"], cfg["samples"]),
                  flush=True)
        else:
            print(run_model(name, name, cfg["digits_steps"], cfg, cfg["digits_teacher_steps"], cfg["digits_samples"]),
                  flush=True)


if __name__ == "__main__":
    main()
