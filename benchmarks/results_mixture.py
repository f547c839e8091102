"""The compare table on the exact Gaussian-mixture model, in all three processes: writes docs/results-mixture.md.

For flow, vp and ve, `optimalsteps.evaluation.compare` searches every searched schedule on 8 search noises, then
evaluates all schedules, with euler and dpmpp2m at 3..10 steps, on 1024 fresh noises against the 200-step
teacher on the same noise, the exact ODE solution and 1024 true data samples.

Run: python benchmarks/results_mixture.py [--quick] [--out DIR] [--doc docs/results-mixture.md] [--force]
(--out also keeps each process's full compare report: results.json/.csv/.md and plots.)
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from optimalsteps import __version__
from optimalsteps.evaluation.compare import compare, write_report
from optimalsteps.core.errors import OptimalStepsError
from optimalsteps.evaluation.metrics import mse
from optimalsteps.testbeds.mixture import GaussianMixture
from optimalsteps.core.models import draw_noise
from optimalsteps.core.io import check_writable, write_text
from optimalsteps.core.schedules import Schedule
from optimalsteps.core.models import default_teacher_grid
from optimalsteps.core.solvers import sample

CLOSED_AND_TABLES = ["uniform", "logsnr", "karras", "shift", "beta", "kl-optimal", "cosine", "ays-sd15"]
SEARCHED = ["oss", "gits", "boss", "dm"]
FLOW_TABLES = ["oss-flux", "oss-chroma"]  # the OSS authors' flow-model tables (their levels exceed vp / ve ranges)


def settings(quick: bool) -> dict:
    if quick:
        return dict(dim=8, components=4, samples=4, eval_samples=128, teacher_steps=60, steps=[3, 5])
    return dict(dim=32, components=8, samples=8, eval_samples=1024, teacher_steps=200, steps=list(range(3, 11)))


def run(process: str, cfg: dict, out: Path | None) -> tuple[list[dict], dict]:
    """(rows, reference) of one process's comparison; with `out`, its full report is kept under out/process."""
    model = GaussianMixture.random(dim=cfg["dim"], components=cfg["components"], seed=0, process=process)
    model.spec = f"gmm:dim={cfg['dim']},components={cfg['components']},seed=0,process={process}"
    names = SEARCHED + CLOSED_AND_TABLES + (FLOW_TABLES if process == "flow" else [])
    started = time.perf_counter()
    result = compare(model, steps=cfg["steps"], solvers=["euler", "dpmpp2m"], schedules=names, samples=cfg["samples"],
                     eval_samples=cfg["eval_samples"], seed=0, teacher_steps=cfg["teacher_steps"], progress=True)
    result.reference["search_noise_check"] = search_noise_check(model, result.rows, cfg)
    result.reference["elapsed_seconds"] = round(time.perf_counter() - started, 1)
    result.reference["benchmark"] = cfg
    if out is not None:
        write_report(result, out / process, overwrite=True)
    return result.rows, result.reference


def search_noise_check(model, rows: list[dict], cfg: dict) -> list[dict]:
    """Every schedule's MSE against the teacher on the search noise itself: tells a search that overfits its
    noise (wins there, loses on fresh noise) from one that does not find the best schedule even there."""
    noise = draw_noise(model, cfg["samples"], 0)  # the noise compare searched on (its seed 0)
    teacher = default_teacher_grid(model.process, cfg["teacher_steps"])
    out = []
    for solver in dict.fromkeys(r["solver"] for r in rows):
        target = sample(model, noise, teacher, solver).samples
        for m in sorted({r["steps"] for r in rows}):
            block = [r for r in rows if r["solver"] == solver and r["steps"] == m]
            errors = {r["schedule"]: mse(sample(model, noise, Schedule(r["times"], model.process), solver).samples,
                                         target) for r in block}
            out.append({"solver": solver, "steps": m, "search_noise": errors,
                        "fresh_noise": {r["schedule"]: r["mse"] for r in block}})
    return out


def load(directory: Path, process: str) -> tuple[list[dict], dict]:
    """A kept report (--out of an earlier run): re-render the document without recomputing."""
    return (json.loads((directory / process / "results.json").read_text()),
            json.loads((directory / process / "reference.json").read_text()))


def fmt(value: float | None) -> str:
    if value is None:
        return "–"
    return f"{value:.3g}" if abs(value) >= 1e-3 else f"{value:.2e}"


def pivot(rows: list[dict], key: str, better=min) -> list[str]:
    """Schedules x step counts of one metric; the best of each column in bold."""
    steps = sorted({r["steps"] for r in rows})
    names = list(dict.fromkeys(r["schedule"] for r in rows))
    value = {(r["schedule"], r["steps"]): r[key] for r in rows}
    best = {m: better(value[(n, m)] for n in names if value.get((n, m)) is not None) for m in steps}
    lines = ["| schedule | " + " | ".join(f"{m}" for m in steps) + " |", "|---|" + "---:|" * len(steps)]
    for n in names:
        cells = []
        for m in steps:
            v = value.get((n, m))
            cells.append(f"**{fmt(v)}**" if v is not None and v == best[m] else fmt(v))
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    return lines


def overfit_section(results: dict, samples: int) -> list[str]:
    """OSS against the best other schedule on the search noise and on fresh noise."""
    ratios = sorted(check["search_noise"][n] / check["fresh_noise"][n] for _, ref in results.values()
                    for check in ref.get("search_noise_check", []) for n in check["search_noise"])
    if not ratios:
        return []
    lines = ["### On the search noise itself", "",
             f"The same schedules scored against the teacher on the search noise itself (the {samples} noises OSS, "
             "GITS and BOSS searched on). So few samples make these numbers noisy: a schedule's error there is "
             f"{ratios[0]:.2f} to {ratios[-1]:.2f} times its error on fresh noise (median "
             f"{ratios[len(ratios) // 2]:.2f}). Where OSS loses even on its own search noise, a schedule "
             "its dynamic programme did not reach fits that noise better: one off the teacher grid, or one the "
             "DP's single state per cell pruned away (the likely case for dpmpp2m, whose step depends on the "
             "previous one). Where it wins there but loses on fresh noise, it fitted its few search samples.", "",
             "| process | solver | steps | OSS, search noise | best other, search noise | OSS, fresh | "
             "best other, fresh |", "|---|---|---:|---:|---|---:|---|"]
    for process, (_, ref) in results.items():
        for check in ref.get("search_noise_check", []):
            cells = []
            for key in ("search_noise", "fresh_noise"):
                errors = check[key]
                name, best = min(((n, v) for n, v in errors.items() if n != "oss"), key=lambda kv: kv[1])
                oss = errors["oss"]
                cells += [f"**{fmt(oss)}**" if oss <= best else fmt(oss),
                          f"{name} " + (f"**{fmt(best)}**" if best < oss else fmt(best))]
            lines.append(f"| {process} | {check['solver']} | {check['steps']} | " + " | ".join(cells) + " |")
    return lines + [""]


def distribution_table(rows: list[dict], ref: dict, steps: list[int]) -> list[str]:
    """SW2, MMD² and NLL of every schedule and solver at a few step counts, the best SW2 / MMD² in bold."""
    lines = [f"### Distribution metrics at {' and '.join(str(m) for m in steps)} steps", "",
             f"Against {ref['eval_samples']} true data samples; two independent data sets are "
             f"SW2 {fmt(ref['floor']['sw2'])} / MMD² {fmt(ref['floor']['mmd'])} apart and the data's own NLL is "
             f"{fmt(ref['floor']['nll'])}. A NLL below the data's means samples bunched towards the modes, not "
             "better samples.", "",
             "| schedule | solver | steps | SW2 | MMD² | NLL |", "|---|---|---:|---:|---:|---:|"]
    for m in steps:
        for solver in dict.fromkeys(r["solver"] for r in rows):
            block = [r for r in rows if r["steps"] == m and r["solver"] == solver]
            best = {key: min(r[key] for r in block) for key in ("sw2", "mmd")}
            for r in block:
                cells = [f"**{fmt(r[k])}**" if k in best and r[k] == best[k] else fmt(r[k]) for k in ("sw2", "mmd", "nll")]
                lines.append(f"| {r['schedule']} | {solver} | {m} | " + " | ".join(cells) + " |")
    return lines + [""]


def oss_verdicts(rows: list[dict], key: str, better=min) -> tuple[int, int, list[str]]:
    """(wins, cells, lines naming each cell OSS does not win: winner, OSS's rank and ratio to the best)."""
    lines, wins, cells = [], 0, 0
    for m in sorted({r["steps"] for r in rows}):
        block = sorted((r for r in rows if r["steps"] == m), key=lambda r: r[key], reverse=better is max)
        oss = next(r for r in block if r["schedule"] == "oss")
        rank = [r["schedule"] for r in block].index("oss") + 1
        cells += 1
        if rank == 1:
            wins += 1
            continue
        ratio = oss[key] / block[0][key] if better is min else oss[key] - block[0][key]
        unit = "x the best" if better is min else "dB"
        lines.append(f"{m} steps: {block[0]['schedule']} wins ({fmt(block[0][key])}); OSS ranks {rank} of "
                     f"{len(block)} ({fmt(oss[key])}, {ratio:.2f} {unit})")
    return wins, cells, lines


def document(results: dict, cfg: dict) -> str:
    first = next(iter(results.values()))[1]
    seconds = sum(ref["elapsed_seconds"] for _, ref in results.values())
    parts = [
        "# Results on the exact Gaussian mixture",
        "",
        "Generated by `python benchmarks/results_mixture.py` (optimalsteps "
        f"{__version__}, torch {torch.__version__}, Python {platform.python_version()}, CPU, 1 thread; "
        f"{seconds / 60:.0f} min in all). Every number below comes from that script's run; nothing is edited by hand. "
        "`--out DIR` keeps each process's full compare report (results.json / .csv / .md with every metric of "
        "every row, and the plots); `--render DIR` rebuilds this page from such a report.",
        "",
        "## Setup",
        "",
        f"- Model: `GaussianMixture.random(dim={cfg['dim']}, components={cfg['components']}, seed=0)` in each process "
        "(flow, vp, ve); its posterior mean is exact, so the model itself has no error.",
        f"- Teacher: {cfg['teacher_steps']} steps of the same solver on the search's default grid (uniform time for flow "
        "and vp, Karras rho = 7 for ve), run on the evaluation noise.",
        f"- Searched schedules see only the search noise: {cfg['samples']} samples, seed 0. `oss` is this library's "
        "search (joint aggregate, xt cost) distilling that teacher; `gits` (Karras grid of 60 steps, DPM-Solver++(2M) "
        "teacher, dev metric, coeff 1.15), `boss` (uniform grid of 100, Euler teacher, squared L2) and `dm` (no "
        "model; its bound for the solver's order) use their papers' defaults.",
        f"- Evaluation: {first['eval_samples']} fresh noise samples (seed {first['eval_seed']}). MSE / PSNR against "
        "the teacher on the same noise; MSE exact against the exact probability-flow ODE solution (scipy DOP853, "
        "rtol 1e-10); SW2 (sliced Wasserstein-2) and MMD² against as many true data samples; NLL the exact mean "
        "negative log-likelihood of the samples under the data density.",
        "- The OSS authors' tables (`oss-flux`, `oss-chroma`) were made for flow models; their noise levels lie "
        "above the vp / ve processes' largest, so they run on flow only. `ays-sd15` is mapped by SNR (its first "
        "level, SD's largest sigma, becomes the process start).",
        "",
    ]
    keys = ("mse", "mse_exact", "sw2", "mmd")
    summary = ["## Where OSS wins and where it does not", "",
               f"Step counts ({cfg['steps'][0]}..{cfg['steps'][-1]}) at which `oss` has the lowest value of all "
               "schedules, per process and solver.", "",
               "| process | solver | MSE vs teacher | MSE vs exact | SW2 | MMD² |", "|---|---|---:|---:|---:|---:|"]
    losses = ["", "### Every cell where OSS does not have the lowest MSE against the teacher", ""]
    totals = {solver: [0, 0] for solver in ("euler", "dpmpp2m")}
    beaten_by: dict[str, int] = {}
    for process, (all_rows, _) in results.items():
        for solver in ("euler", "dpmpp2m"):
            rows = [r for r in all_rows if r["solver"] == solver]
            counts = []
            for key in keys:
                wins, cells, lines = oss_verdicts(rows, key)
                counts.append(f"{wins} / {cells}")
                if key == "mse":
                    totals[solver][0] += wins
                    totals[solver][1] += cells
                    if lines:
                        losses.append(f"- **{process}, {solver}**: " + "; ".join(lines))
                    for line in lines:
                        winner = line.split(": ", 1)[1].split(" wins", 1)[0]
                        beaten_by[winner] = beaten_by.get(winner, 0) + 1
            summary.append(f"| {process} | {solver} | " + " | ".join(counts) + " |")
    if len(losses) == 3:
        losses.append("- none")
    summary += ["", "In words: against the teacher it distils, OSS has the lowest error in "
                f"{totals['euler'][0]} of {totals['euler'][1]} (process, steps) cells with euler and in "
                f"{totals['dpmpp2m'][0]} of {totals['dpmpp2m'][1]} with dpmpp2m. Where it does not, the winner is "
                + ", ".join(f"{n} ({c} cells)" for n, c in sorted(beaten_by.items(), key=lambda kv: -kv[1]))
                + ". The distribution distances (SW2, MMD² against true data) rank schedules differently from the "
                "teacher error, and OSS seldom has the lowest: it is built to reproduce the teacher sample by sample, "
                "not to match the data distribution. Each section's data-vs-data floor shows how large these "
                "distances are from sampling noise alone."]
    parts += summary + losses + [""]
    parts += overfit_section(results, cfg["samples"])
    for process, (all_rows, ref) in results.items():
        elapsed = ref["elapsed_seconds"]
        parts += [f"## {process}", ""]
        parts += ["Reference levels: " + "; ".join(
            f"teacher ({s}) MSE exact {fmt(v['mse_exact'])}, SW2 {fmt(v['sw2'])}, NLL {fmt(v['nll'])}"
            for s, v in ref["teacher"].items())
                  + f"; independent true data: SW2 {fmt(ref['floor']['sw2'])}, MMD² {fmt(ref['floor']['mmd'])}, "
                    f"NLL {fmt(ref['floor']['nll'])}. Run time {elapsed / 60:.1f} min.", ""]
        for solver in ("euler", "dpmpp2m"):
            rows = [r for r in all_rows if r["solver"] == solver]
            parts += [f"### {process}, {solver}: MSE against the teacher (columns: steps = NFE)", ""]
            parts += pivot(rows, "mse") + [""]
            parts += [f"### {process}, {solver}: MSE against the exact ODE solution", ""]
            parts += pivot(rows, "mse_exact") + [""]
        parts += distribution_table(all_rows, ref, [m for m in (5, 10) if m in cfg["steps"]] or cfg["steps"][-1:])
        searched = [r for r in all_rows if r["search_seconds"] is not None]
        timing = {}
        for r in searched:
            timing.setdefault(r["schedule"], []).append(r["search_seconds"])
        parts += [f"Search time per schedule ({process}, seconds, median over step counts and solvers): "
                  + ", ".join(f"{n} {sorted(v)[len(v) // 2]:.2f}" for n, v in timing.items()), ""]
    return "\n".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, to check the script")
    parser.add_argument("--out", default=None, help="also write each process's full compare report under DIR")
    parser.add_argument("--render", default=None, metavar="DIR", help="only re-render the document from the reports "
                                                                      "an earlier run kept with --out DIR")
    parser.add_argument("--doc", default="docs/results-mixture.md")
    parser.add_argument("--force", action="store_true", help="overwrite an existing --doc")
    args = parser.parse_args()
    check_writable(args.doc, args.force)
    # one thread: the machine is shared and small-tensor work only loses to thread synchronisation
    torch.set_num_threads(1)
    cfg = settings(args.quick)
    out = Path(args.out) if args.out else None
    results = {}
    for process in ("flow", "vp", "ve"):
        try:
            results[process] = load(Path(args.render), process) if args.render else run(process, cfg, out)
        except OptimalStepsError as exc:
            raise SystemExit(f"{process}: {exc}")
    if args.render:
        cfg = results["flow"][1]["benchmark"]
    write_text(Path(args.doc), document(results, cfg) + "\n", overwrite=args.force)
    print(f"wrote {args.doc}")


if __name__ == "__main__":
    main()
