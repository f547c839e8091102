import functools
import json
import math

import pytest
import torch

from optimalsteps import GaussianMixture, OptimalStepsError, Schedule, sample
from optimalsteps import search as any_search
from optimalsteps.cli import main
from optimalsteps.optimize.objectives import aggregate, per_sample_error
from optimalsteps.core.models import default_teacher_grid
from optimalsteps.optimize.teacher import run_teacher
from optimalsteps.optimize.select import selection_table, validation_noise

plain_dp = functools.partial(any_search, method="dp")


class Counting:
    """A model that counts the states it is evaluated at (the budget is in model calls per sample state)."""

    def __init__(self, model):
        self.model, self.process, self.prediction, self.calls = model, model.process, model.prediction, 0
        self.sample_shape = model.sample_shape

    def __call__(self, x, t, **cond):
        self.calls += x.shape[0]
        return self.model(x, t, **cond)


def _model(process="flow", dim=6, seed=2):
    return GaussianMixture.random(dim=dim, components=3, seed=seed, process=process)


def _noise(count=6, dim=6, seed=0):
    return torch.randn(count, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("process,solver", [("flow", "dpmpp2m"), ("vp", "heun"), ("ve", "euler")])
def test_the_winner_is_the_best_candidate_on_validation(process, solver):
    model, noise = _model(process), _noise()
    result = any_search(model, noise, steps=4, teacher_steps=200, solver=solver, seed=5)
    meta = result.schedule.metadata
    rows = meta["selection"]
    names = [r["name"] for r in rows]
    assert {"dp-log", "uniform", "logsnr", "dm", "fit-shift"} <= set(names) and len(names) == len(set(names))
    assert meta["winner"] in names and meta["method"] == "oss" and meta["selection_method"] == "validated"
    eligible = [r for r in rows if r["eligible"]]
    fixed = [r for r in rows if r["search_nfe"] == 0 and not r["name"].startswith("dp-")]
    best_fixed = min(fixed, key=lambda r: r["score"])
    uniform_row = next(r for r in rows if r["name"] == "uniform")
    closest = min(r["data"] for r in fixed)

    def passes(r):  # the guards, from the recorded scores: tails against the best baseline and uniform, data
        return (r["tail"] <= best_fixed["tail"] + math.log(1.1) and r["far_tail"] <= 1.1 * max(uniform_row["far_tail"], best_fixed["far_tail"])
                and r["data"] <= 1.05 * closest)

    # the best baseline and uniform stay eligible; any other candidate exactly when it passes every guard
    assert best_fixed["eligible"] and uniform_row["eligible"]
    assert all(r["eligible"] == passes(r) for r in rows if r is not best_fixed and r is not uniform_row)
    assert all(bool(r["failed"]) != passes(r) for r in rows)
    won = next(r["score"] for r in rows if r["name"] == meta["winner"])
    assert won == min(r["score"] for r in eligible) and won <= min(best_fixed["score"], uniform_row["score"])
    # recompute on the validation set: the winner's score is what the schedule realises there, and no baseline
    # (recomputed the same way) is better
    val = validation_noise(noise, meta["validation_samples"], 5)
    teacher = default_teacher_grid(model.process, 200)
    reference = run_teacher(model, val, teacher, solver).states[:, -1]

    def score(schedule):
        out = sample(model, val, schedule, solver).samples
        return float(aggregate(per_sample_error(out, reference), "log"))

    won = score(result.schedule)
    assert won == pytest.approx(result.dp_cost, rel=1e-9)
    from optimalsteps.evaluation.baselines import make_schedule
    for name in ("uniform", "logsnr", "karras", "shift"):
        if next(r["eligible"] for r in rows if r["name"] == name):
            assert won <= score(make_schedule(name, model.process, 4)) + 1e-9


@pytest.mark.parametrize("solver", ["euler", "dpmpp2m", "heun"])
@pytest.mark.parametrize("samples,teacher_steps,steps", [(6, 24, 4), (3, 12, 3), (8, 40, 6)])
def test_the_whole_validated_search_costs_at_most_twice_the_plain_dp(solver, samples, teacher_steps, steps):
    noise = _noise(samples)
    counted, plain_counted = Counting(_model("vp")), Counting(_model("vp"))
    result = any_search(counted, noise, steps=steps, teacher_steps=teacher_steps, solver=solver)
    plain = plain_dp(plain_counted, noise, steps=steps, teacher_steps=teacher_steps, solver=solver)
    assert counted.calls == result.nfe + result.schedule.metadata["error_nfe"] and plain_counted.calls == plain.nfe + plain.schedule.metadata["error_nfe"]
    assert result.nfe <= 2 * plain.nfe  # the search itself; the error run after it is reporting, on both sides
    assert result.schedule.metadata["plain_dp_nfe"] == plain.nfe


def test_selection_table_marks_the_winner():
    result = any_search(_model(), _noise(), steps=3, teacher_steps=16, solver="dpmpp2m")
    table = selection_table(result.schedule).splitlines()
    assert table[0].split()[0] == "candidate" and len(table) == len(result.schedule.metadata["selection"]) + 1
    winner = result.schedule.metadata["winner"]
    marked = [line.split()[0] for line in table[1:] if line.split()[1] == "*"]
    assert marked == [winner]
    # compare's report bolds the same winner, whatever its rank by the objective alone
    from optimalsteps.evaluation.compare import _selection, selection_sections
    section = selection_sections([{"schedule": "oss", "solver": "dpmpp2m", "steps": 3,
                                   "selection": _selection(result.schedule)}])
    assert [line for line in section if "**" in line][0].startswith(f"| **{winner}** |")
    assert sum("**" in line for line in section) == 1


def test_the_metadata_survives_a_round_trip(tmp_path):
    result = any_search(_model(), _noise(), steps=3, teacher_steps=16)
    path = result.schedule.save(tmp_path / "s.json")
    again = Schedule.load(path)
    assert again.metadata["selection"] == json.loads(json.dumps(result.schedule.metadata["selection"]))
    assert torch.equal(again.times, result.schedule.times)


def test_reference_compat_stays_the_plain_reproduction():
    model, noise = _model(), _noise()
    default = any_search(model, noise, steps=3, teacher_steps=20, reference_compat=True)
    named = plain_dp(model, noise, steps=3, teacher_steps=20, reference_compat=True)
    assert default.indices == named.indices and default.schedule.metadata["method"] == "oss-reference"


def test_dp_with_an_objective_and_width_is_the_beam_on_the_full_grid():
    model, noise = _model(), _noise()
    result = any_search(model, noise, steps=3, teacher_steps=16, solver="dpmpp2m", method="dp", objective="log",
                        width=3)
    meta = result.schedule.metadata
    assert meta["objective"] == "log" and meta["width"] == 3 and len(result.indices) == 4
    teacher = default_teacher_grid(model.process, 16)
    out = sample(model, noise, Schedule(teacher.times[result.indices], model.process), "dpmpp2m").samples
    assert float(aggregate(per_sample_error(out, result.teacher_samples), "log")) == pytest.approx(result.dp_cost,
                                                                                                    rel=1e-9)


@pytest.mark.parametrize("kwargs,message", [
    ({"method": "fastest"}, "unknown method 'fastest'; known: validated, dp"),
    ({"objective": "psnr"}, "unknown objective 'psnr'"),
    ({"width": 0}, "width must be a whole number >= 1"),
    ({"method": "validated", "cost": "x0"}, "method='validated' does not take cost: use method='dp'"),
    ({"method": "validated", "free_start": True}, "does not take free_start"),
    ({"method": "dp", "width": 2, "aggregate": "median"}, "the DP with an objective or width does not take"),
])
def test_bad_input_is_one_sentence(kwargs, message):
    with pytest.raises(OptimalStepsError, match=message):
        any_search(_model(), _noise(), steps=3, teacher_steps=12, **kwargs)


def run_cli(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_method_objective_and_width(tmp_path, capsys):
    base = ["search", "--model", "gmm:dim=4,components=2", "--samples", "4", "--steps", "3", "--teacher-steps", "16"]
    code, stdout, _ = run_cli(capsys, *base, "--solver", "dpmpp2m", "--out", str(tmp_path / "v.json"))
    meta = Schedule.load(tmp_path / "v.json").metadata
    assert code == 0 and meta["selection_method"] == "validated" and f"winner: {meta['winner']}" in stdout
    assert "candidate" in stdout and "dp-log" in stdout
    code, _, _ = run_cli(capsys, *base, "--method", "dp", "--out", str(tmp_path / "d.json"))
    assert code == 0 and Schedule.load(tmp_path / "d.json").metadata["method"] == "oss"
    assert "selection" not in Schedule.load(tmp_path / "d.json").metadata
    code, _, _ = run_cli(capsys, *base, "--method", "dp", "--objective", "log", "--beam-width", "2",
                         "--out", str(tmp_path / "b.json"))
    meta = Schedule.load(tmp_path / "b.json").metadata
    assert code == 0 and meta["objective"] == "log" and meta["width"] == 2
    # a plain-DP option alone picks the plain DP; asking for both is one line of error
    code, _, _ = run_cli(capsys, *base, "--cost", "x0", "--out", str(tmp_path / "x.json"))
    assert code == 0 and Schedule.load(tmp_path / "x.json").metadata["cost"] == "x0"
    code, _, err = run_cli(capsys, *base, "--method", "validated", "--cost", "x0", "--out", str(tmp_path / "y.json"))
    assert code == 2 and "does not take cost" in err and len(err.strip().splitlines()) == 1
    code, _, err = run_cli(capsys, *base, "--objective", "best", "--out", str(tmp_path / "z.json"))
    assert code == 2 and "invalid choice: 'best'" in err


def test_the_validation_set_grows_with_the_budget_left():
    from optimalsteps.optimize.select import MAX_VALIDATION, VALIDATION_SHARE, validation_count
    # plenty left: the share of it pays for teacher + candidates on every validation sample
    left, teacher, student, candidates = 200_000, 200, 10, 20
    count = validation_count(left, 16, teacher, student, candidates)
    assert count == int(VALIDATION_SHARE * left) // (teacher + candidates * student) and count > 32
    assert validation_count(100, 16, teacher, student, candidates) == 32  # the old default is the floor
    assert validation_count(100, 2, teacher, student, candidates) == 8
    assert validation_count(10 ** 12, 16, teacher, student, candidates) == MAX_VALIDATION


def test_far_tail_is_the_mean_beyond_the_99th_percentile_with_at_least_two():
    from optimalsteps.optimize.select import far_tail
    errors = torch.arange(1, 301, dtype=torch.float64)  # 1% of 300 is 3 samples
    assert far_tail(errors) == pytest.approx((300 + 299 + 298) / 3)
    assert far_tail(torch.tensor([1.0, 5.0, 3.0], dtype=torch.float64)) == pytest.approx(4.0)


def test_the_data_guard_uses_the_one_sliced_w2():
    from optimalsteps.core.distances import sliced_wasserstein as core_sw2
    from optimalsteps.evaluation import metrics
    from optimalsteps.optimize.select import data_distance, data_reference
    assert metrics.sliced_wasserstein is core_sw2  # one implementation for the guard and the evaluation
    model = _model()
    data = data_reference(model, 3)
    assert data.shape == (4096, 6)
    again = model.data_samples(512, torch.Generator().manual_seed(99))
    far = again + 3.0
    assert data_distance(model, again, data) < data_distance(model, far, data)
    assert data_reference(Counting(_model()), 3) is None  # no data samples offered: no data guard


def test_refinement_competes_on_validation_within_its_own_budget():
    from optimalsteps.optimize.select import validated_search
    model, noise = Counting(_model("vp")), _noise()
    teacher = default_teacher_grid(model.process, 40)
    plain = validated_search(model, noise, 4, teacher, "dpmpp2m", seed=1)
    model.calls = 0
    granted = 600
    result = validated_search(model, noise, 4, teacher, "dpmpp2m", seed=1, refine_nfe=granted)
    meta = result.schedule.metadata
    rows = {r["name"]: r for r in meta["selection"]}
    assert "dp-log-refined" in rows and "dp-log-refined" not in {r["name"] for r in plain.schedule.metadata["selection"]}
    assert 0 < meta["refine_nfe"] <= granted and meta["nfe"] - meta["refine_nfe"] <= meta["budget_nfe"]
    assert model.calls == meta["nfe"]
    won = rows[meta["winner"]]
    assert won["score"] == min(r["score"] for r in rows.values() if r["eligible"])
    with pytest.raises(OptimalStepsError, match="refine_nfe must be a whole number"):
        validated_search(model, noise, 4, teacher, "dpmpp2m", refine_nfe=0)


def test_refinement_as_a_candidate_through_osteps_search_and_the_cli(tmp_path):
    """`refine` with method "validated" makes the refined DP schedule one more validated candidate, on its own
    budget (the given one, else the plain DP's calls); refine_calls outside the validated search is refused."""
    from optimalsteps.evaluation.baselines import oss_search
    from optimalsteps.optimize.search import search
    from optimalsteps.optimize.select import plain_dp_calls

    model = GaussianMixture.random(dim=8, components=3, seed=1, process="flow")
    noise = torch.randn(4, 8, generator=torch.Generator().manual_seed(0)).double()
    result = oss_search(model, noise, 4, 30, "euler", refine=True, refine_budget=500, method="validated", seed=0)
    meta = result.schedule.metadata
    assert "dp-log-refined" in {r["name"] for r in meta["selection"]}
    assert 0 < meta["refine_nfe"] <= 500 and meta["nfe"] - meta["refine_nfe"] <= meta["budget_nfe"]
    default = oss_search(model, noise, 4, 30, "euler", refine=True, method="validated", seed=0).schedule.metadata
    assert 0 < default["refine_nfe"] <= plain_dp_calls(4, 30, 4, "euler")
    with pytest.raises(OptimalStepsError, match="refine_calls makes refinement a candidate"):
        search(model, noise, 4, 30, "euler", method="dp", refine_calls=100)
    out = tmp_path / "refined.json"
    assert main(["search", "--model", "gmm:dim=8,components=3,seed=1,process=flow", "--samples", "4", "--steps", "4",
                 "--teacher-steps", "30", "--method", "validated", "--refine", "--out", str(out)]) in (0, None)
    saved = json.loads(out.read_text())
    assert "dp-log-refined" in {r["name"] for r in saved["metadata"]["selection"]}
