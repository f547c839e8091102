"""`optimalsteps demo`: search OSS schedules for a built-in digits model and compare them with the baselines.

It writes a report folder a person reads first: `report.md` (what was done, the headline, the image grid
of teacher / OSS / baselines at the smallest step count, the tables), beside the `compare` outputs
(`results.json`, `results.csv`, `results.md`, plots).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Sequence

from .compare import compare, markdown_table, report_paths, selection_sections, write_report
from ..core.errors import OptimalStepsError
from ..core.io import check_writable, write_text
from ..testbeds.registry import load_model

DEFAULT_MODEL = "digits-flow"
DEMO_SCHEDULES = ("oss", "uniform", "karras", "logsnr", "shift", "kl-optimal", "gits", "dm")


def run_demo(out_dir: str | Path = "optimalsteps-demo", model_spec: str = DEFAULT_MODEL,
             steps: Sequence[int] = (5, 10), solvers: Sequence[str] = ("euler", "dpmpp2m"),
             schedules: Sequence[str] = DEMO_SCHEDULES, samples: int = 16, eval_samples: int = 256,
             teacher_steps: int = 200, seed: int = 0, overwrite: bool = False, progress: bool = True) -> Path:
    """Run the demo and write its report folder; returns the path of report.md."""
    out_dir = Path(out_dir)
    for path in report_paths(out_dir) + [out_dir / "report.md"]:
        check_writable(path, overwrite)
    started = time.perf_counter()
    model = load_model(model_spec)
    result = compare(model, steps=list(steps), solvers=list(solvers), schedules=list(schedules), samples=samples,
                     eval_samples=eval_samples, seed=seed, teacher_steps=teacher_steps, progress=progress)
    written = write_report(result, out_dir, overwrite=overwrite)
    seconds = time.perf_counter() - started
    report = out_dir / "report.md"
    write_text(report, demo_report(result.rows, model_spec, [p.name for p in written], samples, eval_samples,
                                   teacher_steps, seconds), overwrite)
    return report


def _headline(rows: list[dict]) -> list[str]:
    """One sentence per (solver, steps): OSS against the best other schedule by mean per-sample PSNR to the teacher,
    with the tail (99th-percentile error) and the mode-change rate beside it."""
    lines = []
    for solver in dict.fromkeys(r["solver"] for r in rows):
        for steps in sorted({r["steps"] for r in rows if r["solver"] == solver}):
            group = [r for r in rows if r["solver"] == solver and r["steps"] == steps and r["psnr"] is not None]
            oss = next((r for r in group if r["schedule"] == "oss"), None)
            others = [r for r in group if r["schedule"] != "oss"]
            if oss is None or not others:
                continue
            best = max(others, key=lambda r: r["psnr"])
            verdict = "beats" if oss["psnr"] > best["psnr"] else "does not beat"
            lines.append(f"- {solver}, {steps} steps: OSS MSE {oss['mse']:.4g} (PSNR {oss['psnr']:.2f} dB, p99 error "
                         f"{oss['mse_p99']:.3g}, mode change {_rate(oss)}) {verdict} the best baseline by PSNR, "
                         f"`{best['schedule']}` at {best['psnr']:.2f} dB (MSE {best['mse']:.4g}, p99 error "
                         f"{best['mse_p99']:.3g}, mode change {_rate(best)}).")
    return lines


def _rate(row: dict) -> str:
    return "–" if row.get("mode_change") is None else f"{100 * row['mode_change']:.1f} %"


def demo_report(rows: list[dict], model_spec: str, files: list[str], samples: int, eval_samples: int,
                teacher_steps: int, seconds: float) -> str:
    smallest = min(r["steps"] for r in rows)
    solvers = list(dict.fromkeys(r["solver"] for r in rows))
    grids = [f"samples_{solver}_{smallest}.png" for solver in solvers if f"samples_{solver}_{smallest}.png" in files]
    parts = [
        "# optimalsteps demo", "",
        f"Model `{model_spec}`. OSS schedules were searched on {samples} noise samples against a "
        f"{teacher_steps}-step teacher, then every schedule was run on {eval_samples} fresh noise samples that no "
        "search saw, and compared with the teacher on the same noise. "
        f"Total time {seconds:.0f} s.", "",
        "## Headline", "", *_headline(rows), "",
    ]
    if grids:
        parts += [f"## Samples at {smallest} steps", "",
                  "Top row: the teacher; then one row per schedule, on the same noise.", ""]
        parts += [f"![{g}]({g})" for g in grids] + [""]
    for name in ("schedules.png", "error_vs_nfe.png"):
        if name in files:
            parts += [f"![{name}]({name})", ""]
    for solver in solvers:
        parts += [f"## {solver}", "", markdown_table([r for r in rows if r["solver"] == solver]), ""]
    parts += selection_sections(rows)
    parts += ["MSE, PSNR and the per-sample error quantiles are against the teacher on the same noise; mode change is "
              "the fraction of samples the classifier labels differently from the teacher's; SW2, MMD² and FD (Fréchet distance in the "
              "features of a classifier trained on the same digits) against held-out real images. The full "
              "tables are in `results.md`, `results.csv` and `results.json`.", ""]
    return "\n".join(parts)


def check_demo_args(steps: Sequence[int], samples: int, eval_samples: int) -> None:
    if not steps or min(steps) < 1:
        raise OptimalStepsError("demo steps must be whole numbers >= 1")
    if samples < 1 or eval_samples < 1:
        raise OptimalStepsError("demo needs at least one search and one evaluation sample")
