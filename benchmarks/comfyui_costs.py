"""ComfyUI node pack: model calls of a search, and ComfyUI's dpmpp_2m vs the log-SNR dpmpp2m on flow.

Part 1 runs the search node through the test stand-in for ComfyUI (tests/comfy_stub) and counts guided
model calls (each one call of ComfyUI's model at one sigma on a batch of search_samples latents; with
cfg != 1 ComfyUI runs the network on cond and uncond in it). Part 2 compares the two second-order
multistep solvers against the exact ODE solution of a 24-D flow Gaussian mixture.

    PYTHONPATH=$PWD nice -n 10 python benchmarks/comfyui_costs.py
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "comfy_stub"))


def call_counts() -> None:
    import folder_paths
    from stub_models import NEGATIVE, POSITIVE, StubModelPatcher

    from comfyui_optimalsteps import nodes

    folder_paths.output_directory = tempfile.mkdtemp()
    print("| sampler | steps M | teacher N | guided model calls | formula |")
    print("|---|---|---|---|---|")
    for sampler in ("euler", "dpmpp_2m", "heun"):
        for steps, teacher in ((4, 40), (8, 100), (10, 200)):
            model = StubModelPatcher("flow", shift=3.0)
            out = nodes.search_schedule(model, POSITIVE, NEGATIVE, {"samples": torch.zeros(1, 2, 1, 3)}, 1.0,
                                        sampler, steps, teacher, 2, 0)
            width = teacher - steps + 1
            if sampler == "heun":
                formula = (2 * teacher - 1) + 1 + width * (2 + (steps - 2) * 5)
            else:
                formula = teacher + 1 + (steps - 1) * width
            print(f"| {sampler} | {steps} | {teacher} | {out.calls} | {formula} |")


def dpmpp_variants() -> None:
    from optimalsteps import GaussianMixture, sample
    from optimalsteps.core.processes import FLOW
    from optimalsteps.core.schedules import shift, uniform

    model = GaussianMixture.random(dim=24, components=8, seed=0, process="flow")
    noise = torch.randn(256, 24, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    exact = model.exact_solution(noise)
    print("\n| schedule | steps | dpmpp2m (log-SNR) MSE | dpmpp2m-sigma (ComfyUI dpmpp_2m) MSE |")
    print("|---|---|---|---|")
    for name, make in (("uniform", lambda m: uniform(FLOW, m)), ("SD3 shift 3", lambda m: shift(FLOW, m, 3.0))):
        for steps in (6, 10):
            errors = [float((sample(model, noise, make(steps), solver=s).samples - exact).pow(2).mean())
                      for s in ("dpmpp2m", "dpmpp2m-sigma")]
            print(f"| {name} | {steps} | {errors[0]:.4f} | {errors[1]:.4f} |")


if __name__ == "__main__":
    torch.set_num_threads(1)
    call_counts()
    dpmpp_variants()
