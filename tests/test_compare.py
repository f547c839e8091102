"""The compare harness end to end on a small mixture: rows, metrics, files, bad input."""

import csv
import json
import math
import sys

import pytest
import torch

from optimalsteps.cli import main
from optimalsteps.evaluation.compare import ROW_KEYS, compare, write_report
from optimalsteps.core.errors import OptimalStepsError
from optimalsteps.evaluation.metrics import mse
from optimalsteps.testbeds.mixture import GaussianMixture
from optimalsteps.core.models import draw_noise
from optimalsteps.core.models import default_teacher_grid
from optimalsteps.optimize.options import DPOptions
from optimalsteps.core.solvers import sample

QUALITY = ("mse", "psnr", "mse_exact", "sw2", "mmd", "nll")


@pytest.fixture(scope="module")
def mixture():
    return GaussianMixture.random(dim=3, components=2, seed=2, process="flow")


@pytest.fixture(scope="module")
def result(mixture):
    return compare(mixture, steps=[2, 3], solvers=["euler", "dpmpp2m"], schedules=["oss", "uniform", "gits", "dm"],
                   samples=2, eval_samples=16, seed=0, teacher_steps=10)


def test_every_row_has_every_metric(result):
    assert len(result.rows) == 4 * 2 * 2
    for row in result.rows:
        assert tuple(row) == ROW_KEYS
        for key in QUALITY + ("nfe", "sample_seconds"):
            assert row[key] is not None and math.isfinite(row[key]), (row["schedule"], key)
        assert row["nfe"] == row["steps"]
        assert len(row["times"]) == row["steps"] + 1 and row["process"] == "flow"
        assert (row["search_seconds"] is None) == (row["schedule"] == "uniform")
    # the search is distilled from the same teacher the evaluation uses
    assert {r["schedule"]: r for r in result.rows if r["steps"] == 3}["oss"]["mse"] > 0


def test_evaluation_uses_fresh_noise_against_the_teacher_on_it(mixture, result):
    ref = result.reference
    assert ref["eval_seed"] != ref["seed"] and ref["eval_samples"] == 16 and ref["search_samples"] == 2
    eval_noise = draw_noise(mixture, 16, ref["eval_seed"])
    teacher = sample(mixture, eval_noise, default_teacher_grid(mixture.process, 10), "euler").samples
    row = next(r for r in result.rows if r["schedule"] == "uniform" and r["solver"] == "euler" and r["steps"] == 3)
    uniform = sample(mixture, eval_noise, torch.tensor(row["times"], dtype=torch.float64), "euler").samples
    assert row["mse"] == pytest.approx(mse(uniform, teacher), rel=1e-9)
    assert ref["teacher"]["euler"]["nfe"] == 10 and ref["floor"]["sw2"] > 0


def test_write_report_files(result, tmp_path):
    paths = write_report(result, tmp_path)
    names = {p.name for p in paths}
    assert {"results.json", "results.csv", "results.md", "reference.json", "schedules.png", "error_vs_nfe.png"} <= names
    rows = json.loads((tmp_path / "results.json").read_text())
    assert rows == json.loads(json.dumps(result.rows)) and all(tuple(r) == ROW_KEYS for r in rows)
    with open(tmp_path / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert len(table) == len(rows) and list(table[0]) == list(ROW_KEYS)
    md = (tmp_path / "results.md").read_text()
    assert "## euler" in md and "## dpmpp2m" in md and "**" in md and "Reference levels" in md
    assert (tmp_path / "schedules.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(OptimalStepsError, match="already exists"):
        write_report(result, tmp_path)
    write_report(result, tmp_path, overwrite=True)


def test_report_without_matplotlib(result, tmp_path, monkeypatch):
    for module in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, module, None)  # importing it now fails
    names = {p.name for p in write_report(result.rows, tmp_path)}
    assert names == {"results.json", "results.csv", "results.md", "reference.json"}
    assert "Plots skipped" in (tmp_path / "results.md").read_text()


class _Plain:
    """A model without an exact solution, data samples or density: those metrics must be null."""

    process = "vp"
    prediction = "x0"
    sample_shape = (2,)

    def __call__(self, x, t, **cond):
        return 0.5 * x


class _Images:
    """A mixture seen as 1x2x2 images."""

    prediction = "x0"
    sample_shape = (1, 2, 2)

    def __init__(self):
        self.inner = GaussianMixture.random(dim=4, components=2, seed=0, process="flow")
        self.process = self.inner.process

    def __call__(self, x, t, **cond):
        return self.inner(x.reshape(x.shape[0], 4), t).reshape(x.shape)

    def data_samples(self, count, generator=None):
        return self.inner.data_samples(count, generator).reshape(count, 1, 2, 2)


def test_metrics_that_do_not_apply_are_null():
    rows = compare(_Plain(), steps=[2], schedules=["uniform", "karras"], eval_samples=8, teacher_steps=6).rows
    for row in rows:
        assert tuple(row) == ROW_KEYS
        assert row["mse_exact"] is None and row["sw2"] is None and row["mmd"] is None and row["nll"] is None
        assert row["mse"] is not None and row["psnr"] is not None


def test_image_models_get_sample_grids(tmp_path):
    result = compare(_Images(), steps=[2], schedules=["uniform", "karras"], eval_samples=8, teacher_steps=6, keep=3)
    names = {p.name for p in write_report(result, tmp_path)}
    assert "samples_euler_2.png" in names
    assert result.rows[0]["sw2"] is not None and result.rows[0]["nll"] is None


def test_bad_input(mixture):
    with pytest.raises(OptimalStepsError, match="not fewer than the teacher's 10 steps"):
        compare(mixture, steps=[3, 10], schedules=["uniform"], teacher_steps=10)
    with pytest.raises(OptimalStepsError, match=">= 1"):
        compare(mixture, steps=[0], schedules=["uniform"], teacher_steps=10)
    with pytest.raises(OptimalStepsError, match=r"unknown schedule 'nope'; known: uniform"):
        compare(mixture, steps=[2], schedules=["uniform", "nope"], teacher_steps=10)
    with pytest.raises(OptimalStepsError, match="no table for model family 'flux'"):
        compare(mixture, steps=[2], schedules=["ays-flux"], teacher_steps=10)
    with pytest.raises(OptimalStepsError, match="options given for schedules not compared: karras"):
        compare(mixture, steps=[2], schedules=["uniform"], teacher_steps=10, options={"karras": {"rho": 5}})


def test_cli_compare(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["compare", "--model", "gmm:dim=2,components=2,process=ve", "--steps", "2,3", "--solvers", "euler",
            "--schedules", "uniform,karras,dm", "--eval-samples", "8", "--teacher-steps", "8",
            "--option", "karras.rho=3", "--out", str(out)]
    assert main(args) == 0
    assert "lowest MSE vs teacher" in capsys.readouterr().out
    rows = json.loads((out / "results.json").read_text())
    assert len(rows) == 6 and {r["schedule"] for r in rows} == {"uniform", "karras", "dm"}
    # an existing report is refused before any work is done
    assert main(args) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(args[:-2] + ["--steps", "9", "--out", str(tmp_path / "other")]) == 2
    assert "not fewer than the teacher's 8 steps" in capsys.readouterr().err


def test_oss_free_start_variant_is_compared_from_its_later_start():
    from optimalsteps import load_model, sample, search
    from optimalsteps.evaluation.compare import compare
    from optimalsteps.core.models import draw_noise

    model = load_model("gmm:dim=8,components=3,seed=1")
    result = compare(model, steps=[3], solvers=["euler"], schedules=["oss-free"], samples=4, eval_samples=16,
                     teacher_steps=30)
    row = result.rows[0]
    free = search(model, draw_noise(model, 4, 0), steps=3, teacher_steps=30, dp=DPOptions(free_start=True), method="dp")
    assert row["times"] == free.schedule.times.tolist()
    # evaluated as the search meant it: the noise scaled for the start time, placed at the first grid time
    eval_noise = draw_noise(model, 16, 0 + 1_000_003)
    teacher = sample(model, eval_noise, default_teacher_grid(model.process, 30))
    out = sample(model, eval_noise, free.schedule).samples
    # both sides in float64 from the same float32 outputs
    assert row["mse"] == pytest.approx(float((out.double() - teacher.samples.double()).pow(2).mean()), rel=1e-5)
