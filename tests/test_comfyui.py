"""The ComfyUI node pack and its library side, through a stand-in for ComfyUI (tests/comfy_stub)."""

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

STUB = Path(__file__).parent / "comfy_stub"
sys.path.insert(0, str(STUB))

import comfy.model_management as mm  # noqa: E402  (the stand-in)
import comfy.samplers  # noqa: E402
import comfy.utils  # noqa: E402
import folder_paths  # noqa: E402
from stub_models import NEGATIVE, POSITIVE, StubModelPatcher  # noqa: E402

from comfyui_optimalsteps import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS, nodes  # noqa: E402
from optimalsteps import GaussianMixture, OptimalStepsError, Schedule, sample  # noqa: E402
from optimalsteps.core.processes import FLOW  # noqa: E402
from optimalsteps.core.schedules import karras, logsnr  # noqa: E402
from optimalsteps.integrations import comfyui as oc  # noqa: E402
from optimalsteps.optimize.teacher import run_teacher  # noqa: E402

F32 = torch.finfo(torch.float32).eps
KINDS = {"flow": {"shift": 3.0}, "eps": {}, "v": {}}
LATENT = {"samples": torch.zeros(1, 2, 1, 3)}  # six numbers per sample: the mixture's dimension


@pytest.fixture(autouse=True)
def output_dir(tmp_path):
    folder_paths.output_directory = str(tmp_path)
    mm.interrupt_current_processing(False)
    comfy.utils.set_progress_bar_global_hook(None)
    yield tmp_path


def guided(model, cfg):
    """ComfyUI's guided model as the node sees it: the stand-in's CFGGuider with its conds set."""
    guider = comfy.samplers.CFGGuider(model)
    guider.set_conds(POSITIVE, NEGATIVE)
    guider.set_cfg(cfg)
    return guider


def comfy_run(model, sampler_name, sigmas, noise, cfg):
    """The stand-in's SamplerCustomAdvanced: guider + KSAMPLER(sample_<name>) on unit noise, empty latent."""
    return guided(model, cfg).sample(noise, torch.zeros_like(noise), comfy.samplers.sampler_object(sampler_name),
                                     sigmas.to(torch.float32), seed=0)


def library_run(model, solver, sigmas, noise, cfg):
    """The library's sampler on ComfyUI's guided model, started from ComfyUI's own first state."""
    guider = guided(model, cfg)
    guider.inner_model, guider.conds = model.model, dict(guider.original_conds)
    convention = oc.sigma_convention(model.get_model_object("model_sampling"))
    denoiser = oc.ComfyDenoiser(guider, convention)
    first = float(sigmas[0])
    start = noise * oc.comfy_start_scale(convention, first)
    schedule = Schedule.from_sigmas(sigmas.double(), convention.process)
    return sample(denoiser, oc.search_noise(start, first), schedule, solver=solver).samples


def sigma_grid(convention, steps):
    if convention.family == "flow":
        return logsnr(FLOW, steps, sigma_min=0.02).to_sigmas()
    return karras(convention.process, steps, sigma_min=convention.sigma_min,
                  sigma_max=convention.sigma_max).to_sigmas()


def tolerance(reference: torch.Tensor, steps: int) -> float:
    """float32 rounding, accumulated over the steps, at the size of the numbers involved."""
    return F32 * 8 * steps * float(reference.abs().max().clamp(min=1.0))


# ------------------------------------------------------------------------------ solver cross-checks


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("sampler_name", list(oc.SAMPLER_SOLVERS))
def test_library_solvers_match_comfyui_samplers(kind, sampler_name):
    model = StubModelPatcher(kind, **KINDS[kind])
    convention = oc.sigma_convention(model.get_model_object("model_sampling"))
    noise = torch.randn(5, 2, 1, 3, generator=torch.Generator().manual_seed(3))
    sigmas = sigma_grid(convention, 7)
    expected = comfy_run(model, sampler_name, sigmas, noise, cfg=2.5)
    got = library_run(model, oc.solver_for_sampler(sampler_name), sigmas, noise, cfg=2.5)
    assert (got - expected).abs().max() <= tolerance(expected, 7)


def test_comfyui_dpmpp_2m_on_flow_is_not_the_log_snr_dpmpp2m():
    model = StubModelPatcher("flow", shift=3.0)
    noise = torch.randn(5, 2, 1, 3, generator=torch.Generator().manual_seed(3))
    sigmas = sigma_grid(oc.sigma_convention(model.model.model_sampling), 6)
    expected = comfy_run(model, "dpmpp_2m", sigmas, noise, cfg=1.0)
    log_snr = library_run(model, "dpmpp2m", sigmas, noise, cfg=1.0)
    assert (log_snr - expected).abs().max() > 100 * tolerance(expected, 6)


@pytest.mark.parametrize("kind", ["eps", "v"])
def test_dpmpp2m_sigma_is_dpmpp2m_off_flow(kind):
    model = StubModelPatcher(kind)
    noise = torch.randn(4, 2, 1, 3, generator=torch.Generator().manual_seed(1))
    sigmas = sigma_grid(oc.sigma_convention(model.model.model_sampling), 6)
    a = library_run(model, "dpmpp2m", sigmas, noise, cfg=1.0)
    b = library_run(model, "dpmpp2m-sigma", sigmas, noise, cfg=1.0)
    assert (a - b).abs().max() <= tolerance(a, 6)


def test_dpmpp2m_sigma_is_second_order_on_flow():
    model = GaussianMixture.random(dim=3, components=3, seed=1, process="flow")
    noise = torch.randn(12, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    exact = model.exact_solution(noise)
    errors = [(sample(model, noise, logsnr(FLOW, n, sigma_min=1e-3), solver="dpmpp2m-sigma").samples - exact)
              .pow(2).mean().sqrt().item() for n in (24, 48, 96)]
    orders = [math.log2(errors[i] / errors[i + 1]) for i in range(2)]
    assert all(abs(o - 2.0) < 0.35 for o in orders), (errors, orders)


# ------------------------------------------------------------------------------ the search node


def test_node_declarations():
    assert set(NODE_CLASS_MAPPINGS) == {"OptimalStepsSearch", "OptimalStepsLoadSchedule"}
    assert set(NODE_DISPLAY_NAME_MAPPINGS) == set(NODE_CLASS_MAPPINGS)
    for cls in NODE_CLASS_MAPPINGS.values():
        spec = cls.INPUT_TYPES()
        assert set(spec) <= {"required", "optional"}
        for name, declared in {**spec["required"], **spec.get("optional", {})}.items():
            assert isinstance(declared, tuple) and 1 <= len(declared) <= 2, name
            kind = declared[0]
            assert isinstance(kind, (str, list)) and (kind if isinstance(kind, list) else [kind]), name
            if len(declared) == 2:
                assert isinstance(declared[1], dict)
        assert cls.RETURN_TYPES == ("SIGMAS", "STRING") and len(cls.RETURN_NAMES) == 2
        assert callable(getattr(cls(), cls.FUNCTION))
        assert cls.CATEGORY == "sampling/custom_sampling/schedulers"
    required = NODE_CLASS_MAPPINGS["OptimalStepsSearch"].INPUT_TYPES()["required"]
    assert [required[k][0] for k in ("model", "positive", "negative", "latent_image")] == \
        ["MODEL", "CONDITIONING", "CONDITIONING", "LATENT"]
    assert set(required["sampler_name"][0]) >= {"euler", "heun", "dpmpp_2m"}


def run_node_search(model, sampler_name="euler", steps=3, teacher_steps=16, cfg=2.0, samples=4, seed=7):
    return nodes.search_schedule(model, POSITIVE, NEGATIVE, LATENT, cfg, sampler_name, steps, teacher_steps,
                                 samples, seed)


@pytest.mark.parametrize("sampler_name", ["euler", "dpmpp_2m"])
def test_search_teacher_equals_library_teacher(sampler_name):
    # flow with shift 3 at cfg 1: the guided model is exactly the positive mixture
    model = StubModelPatcher("flow", shift=3.0)
    out = run_node_search(model, sampler_name, cfg=1.0)
    mixture = model.model.diffusion_model.mixtures[0]
    teacher = Schedule.from_sigmas(out.teacher_sigmas.double(), "flow")
    library = run_teacher(mixture, out.noise.reshape(4, -1).double(), teacher, oc.solver_for_sampler(sampler_name))
    final = library.states[:, -1].reshape(out.teacher_final.shape)
    assert (out.teacher_final.double() - final).abs().max() <= tolerance(final, 16)
    # the grid is the model's own (shifted) timesteps
    ms = model.model.model_sampling
    assert float(out.teacher_sigmas[8]) == pytest.approx(ms.percent_to_sigma(0.5), rel=F32 * 4)


@pytest.mark.parametrize("kind", ["eps", "v"])
def test_search_teacher_on_discrete_models_starts_where_comfyui_starts(kind):
    # the library's teacher on the model's own (unguided, cfg 1) call, started from sqrt(1 + sigma^2) noise
    model = StubModelPatcher(kind)
    out = run_node_search(model, "heun", cfg=1.0)
    convention = oc.sigma_convention(model.model.model_sampling)
    direct = oc.ComfyDenoiser(lambda x, s: model.model.apply_model(x, s, POSITIVE), convention)
    first = float(out.teacher_sigmas[0])
    assert oc.comfy_start_scale(convention, first) == pytest.approx(math.sqrt(1 + first ** 2))
    noise = out.noise * oc.comfy_start_scale(convention, first) / first
    teacher = Schedule.from_sigmas(out.teacher_sigmas.double(), convention.process)
    final = run_teacher(direct, noise, teacher, "heun").states[:, -1]
    assert (out.teacher_final - final).abs().max() <= tolerance(final, 16)
    plain = run_teacher(direct, out.noise, teacher, "heun").states[:, -1]  # sigma * noise: not ComfyUI's start
    assert (out.teacher_final - plain).abs().max() > 10 * tolerance(final, 16)


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("sampler_name", ["euler", "heun", "dpmpp_2m"])
def test_returned_sigmas_give_the_recorded_error_in_comfyui(kind, sampler_name):
    model = StubModelPatcher(kind, **KINDS[kind])
    out = run_node_search(model, sampler_name, steps=3, teacher_steps=12)
    teacher = comfy_run(model, sampler_name, out.teacher_sigmas, out.noise, cfg=2.0)
    student = comfy_run(model, sampler_name, out.sigmas, out.noise, cfg=2.0)
    assert (teacher - out.teacher_final).abs().max() <= tolerance(teacher, 12)
    error = float((student.double() - teacher.double()).pow(2).mean())
    recorded = out.result.error
    assert recorded > 0
    delta = tolerance(teacher, 12)
    assert abs(error - recorded) <= 2 * math.sqrt(recorded) * delta + delta ** 2
    # the saved file says what it was searched under
    saved = json.loads(out.path.read_text())
    under = saved["metadata"]["comfyui"]
    assert under["sampler"] == sampler_name and under["cfg"] == 2.0 and under["seed"] == 7
    assert under["shift"] == KINDS[kind].get("shift", under["shift"]) and under["latent_shape"] == [2, 1, 3]
    assert saved["solver"] == oc.solver_for_sampler(sampler_name) and saved["metadata"]["start"] == "comfyui"
    assert torch.equal(nodes.load_sigmas(model, out.path.name)[0], out.sigmas)


def test_search_node_outputs_and_progress(output_dir):
    seen = []
    comfy.utils.set_progress_bar_global_hook(lambda value, total, preview, node_id=None: seen.append((value, total)))
    model = StubModelPatcher("eps")
    sigmas, text = NODE_CLASS_MAPPINGS["OptimalStepsSearch"]().search(model, POSITIVE, NEGATIVE, LATENT, 3.0,
                                                                        "heun", 3, 10, 2, 0)
    assert sigmas.dtype == torch.float32 and len(sigmas) == 4 and float(sigmas[-1]) == 0.0
    assert torch.all(sigmas[1:] < sigmas[:-1])
    assert float(sigmas[0]) == pytest.approx(float(model.model.model_sampling.sigma_max))
    assert seen[-1] == (4, 4) and [v for v, _ in seen] == sorted(v for v, _ in seen)
    assert "heun" in text and "schedule_00001.json" in text
    # an empty latent with another channel count is fixed as SamplerCustomAdvanced does
    four_channels = {"samples": torch.zeros(1, 4, 1, 3)}
    out = nodes.search_schedule(model, POSITIVE, NEGATIVE, four_channels, 3.0, "euler", 2, 10, 2, 0, "fixed")
    assert list(out.noise.shape) == [2, 2, 1, 3]
    assert (output_dir / "optimalsteps" / "schedule_00001.json").is_file()
    NODE_CLASS_MAPPINGS["OptimalStepsSearch"]().search(model, POSITIVE, NEGATIVE, LATENT, 3.0, "euler", 2, 10, 2, 0)
    assert (output_dir / "optimalsteps" / "schedule_00002.json").is_file()  # never overwrites
    assert (output_dir / "optimalsteps" / "fixed_00001.json").is_file()


def test_interrupt_stops_the_search_between_layers(output_dir):
    def hook(value, total, preview, node_id=None):
        if value == 2:  # after the first layer: the user presses cancel
            mm.interrupt_current_processing(True)

    comfy.utils.set_progress_bar_global_hook(hook)
    model = StubModelPatcher("flow", shift=3.0)
    with pytest.raises(mm.InterruptProcessingException):
        run_node_search(model, steps=4, teacher_steps=12)
    assert model.cleanups == 1  # the guider's cleanup ran
    assert not (output_dir / "optimalsteps").exists()  # nothing half-written
    assert not mm.processing_interrupted()


def one_line_error(call, node):
    with pytest.raises(ValueError) as info:
        call()
    message = str(info.value)
    assert message.startswith(node + ": ") and "\n" not in message
    return message


def test_bad_search_inputs_give_one_line_errors():
    node = NODE_CLASS_MAPPINGS["OptimalStepsSearch"]()
    model = StubModelPatcher("flow")
    message = one_line_error(lambda: node.search(model, POSITIVE, NEGATIVE, LATENT, 1.0, "euler", 8, 8, 2, 0),
                             "OptimalStepsSearch")
    assert "teacher_steps" in message
    message = one_line_error(lambda: node.search(model, POSITIVE, NEGATIVE, LATENT, 1.0, "lms", 3, 8, 2, 0),
                             "OptimalStepsSearch")
    assert "lms" in message
    assert model.model.calls == 0  # refused before any model call


# ------------------------------------------------------------------------------ the loader


def save(output_dir, name, schedule):
    path = output_dir / "optimalsteps" / name
    schedule.save(path)
    return name


def test_loader_returns_saved_sigmas_and_comfyui_interpolation(output_dir):
    # ComfyUI's published FLUX table (10 steps, ending at flow's smallest sigma 0.001) as a saved schedule
    table = np.array([0.9968, 0.9886, 0.9819, 0.975, 0.966, 0.9471, 0.9158, 0.8287, 0.5512, 0.2808, 0.001])
    name = save(output_dir, "flux.json", Schedule.from_sigmas(np.append(table[:-1], 0.0), "flow"))
    model = StubModelPatcher("flow", shift=1.0)  # its smallest sigma is 0.001, the table's last entry
    loader = NODE_CLASS_MAPPINGS["OptimalStepsLoadSchedule"]()
    sigmas, _ = loader.load(model, name, 0, 1.0)
    assert torch.equal(sigmas, torch.tensor(np.append(table[:-1], 0.0), dtype=torch.float32))
    for steps in (6, 20, 25):
        # ComfyUI: the table interpolated linearly in log sigma onto steps + 1 points, the last set to 0
        grid = np.linspace(0, 1, len(table))
        expected = np.exp(np.interp(np.linspace(0, 1, steps + 1), grid, np.log(table[::-1])))[::-1].copy()
        expected[-1] = 0.0
        got, _ = loader.load(model, name, steps, 1.0)
        assert len(got) == steps + 1
        assert torch.allclose(got, torch.tensor(expected, dtype=torch.float32), rtol=4 * F32, atol=0)
    # denoise keeps the last round(steps * denoise) steps, as ComfyUI's schedule nodes
    full, _ = loader.load(model, name, 20, 1.0)
    part, _ = loader.load(model, name, 20, 0.45)
    assert torch.equal(part, full[-10:])
    assert len(loader.load(model, name, 20, 0.0)[0]) == 0


def test_loader_converts_to_the_models_sigma_convention(output_dir):
    model = StubModelPatcher("eps")
    convention = oc.sigma_convention(model.model.model_sampling)
    schedule = karras(convention.process, 5, sigma_min=convention.sigma_min, sigma_max=convention.sigma_max)
    name = save(output_dir, "sd.json", schedule)
    sigmas, text = nodes.load_sigmas(model, name)
    assert torch.allclose(sigmas.double(), schedule.to_sigmas(), rtol=F32, atol=0)
    assert "sqrt(1 + sigma^2)" in text  # a library search assumed sigma * noise at the largest sigma


def test_loader_refuses_what_comfyui_cannot_run(output_dir):
    loader = NODE_CLASS_MAPPINGS["OptimalStepsLoadSchedule"]()
    flow, eps = StubModelPatcher("flow", shift=3.0), StubModelPatcher("eps")
    (output_dir / "optimalsteps").mkdir(parents=True)
    (output_dir / "optimalsteps" / "broken.json").write_text("{not json")
    assert "broken.json" in one_line_error(lambda: loader.load(flow, "broken.json"), "OptimalStepsLoadSchedule")
    one_line_error(lambda: loader.load(flow, "../outside.json"), "OptimalStepsLoadSchedule")
    save(output_dir, "flow.json", Schedule([1.0, 0.5, 0.2, 0.0], "flow"))
    assert "flow model" in one_line_error(lambda: loader.load(eps, "flow.json"), "OptimalStepsLoadSchedule")
    save(output_dir, "edm.json", karras("ve", 4))
    assert "largest sigma" in one_line_error(lambda: loader.load(eps, "edm.json"), "OptimalStepsLoadSchedule")
    assert "flow model" in one_line_error(lambda: loader.load(flow, "edm.json"), "OptimalStepsLoadSchedule")
    free = Schedule([0.8, 0.5, 0.2, 0.0], "flow", metadata={"noise_scale_time": 1.0})
    save(output_dir, "free.json", free)
    assert "free start" in one_line_error(lambda: loader.load(flow, "free.json"), "OptimalStepsLoadSchedule")


def test_saved_schedules_as_ksampler_scheduler_names(output_dir):
    save(output_dir, "mine.json", Schedule([1.0, 0.7, 0.3, 0.0], "flow"))
    added = nodes.register_schedulers()
    assert added == ["optimalsteps/mine"] and "optimalsteps/mine" in comfy.samplers.KSampler.SCHEDULERS
    flow = StubModelPatcher("flow")
    sigmas = comfy.samplers.calculate_sigmas(flow.model.model_sampling, "optimalsteps/mine", 3)
    assert torch.allclose(sigmas, torch.tensor([1.0, 0.7, 0.3, 0.0]))
    assert len(comfy.samplers.calculate_sigmas(flow.model.model_sampling, "optimalsteps/mine", 6)) == 7
    with pytest.raises(ValueError, match="flow model"):
        comfy.samplers.calculate_sigmas(StubModelPatcher("eps").model.model_sampling, "optimalsteps/mine", 3)
    assert nodes.register_schedulers() == []  # registered once


def test_integration_module_never_imports_comfy():
    source = Path(oc.__file__).read_text() + Path(nodes.__file__).read_text()
    top_level = [line for line in source.splitlines() if line.startswith(("import comfy", "from comfy", "import folder"))]
    assert top_level == []


def test_example_workflow_wires_search_into_sampler_custom_advanced():
    path = Path(nodes.__file__).parent / "example_workflows" / "optimalsteps_search.json"
    workflow = json.loads(path.read_text())
    by_id = {n["id"]: n for n in workflow["nodes"]}
    types = {n["type"] for n in workflow["nodes"]}
    assert {"CheckpointLoaderSimple", "OptimalStepsSearch", "SamplerCustomAdvanced"} <= types
    links = {link[0]: link for link in workflow["links"]}
    for node in workflow["nodes"]:  # every link is declared at both ends with one type
        for slot in node.get("inputs", []):
            if slot.get("link") is not None:
                link = links[slot["link"]]
                assert link[3] == node["id"] and link[5] == slot["type"]
                assert slot["link"] in by_id[link[1]]["outputs"][link[2]]["links"]
    search = next(n for n in workflow["nodes"] if n["type"] == "OptimalStepsSearch")
    sigmas_links = search["outputs"][0]["links"]
    assert any(by_id[links[i][3]]["type"] == "SamplerCustomAdvanced" for i in sigmas_links)


def test_denoiser_calls_the_model_one_sigma_at_a_time():
    seen = []

    def denoise(x, sigma, **extra):
        seen.append((sigma.unique().tolist(), x.shape[0], extra))
        return x * sigma[:, None]

    convention = oc.SigmaConvention("flow", "CONST", 0.001, 1.0, 3.0)
    denoiser = oc.ComfyDenoiser(denoise, convention, {"seed": 5}, max_batch=2)
    x = torch.arange(10.0).reshape(5, 2)
    t = torch.tensor([0.5, 0.25, 0.5, 0.5, 0.25])
    out = denoiser(x, t)
    assert torch.equal(out, x * t[:, None])
    assert all(len(values) == 1 and rows <= 2 and extra == {"seed": 5} for values, rows, extra in seen)
    assert denoiser.calls == len(seen) == 3  # three at 0.5 in batches of two, two at 0.25


def test_unsupported_model_sampling_is_refused():
    class X0:
        pass

    class IMG_TO_IMG(X0):  # noqa: N801 (ComfyUI's class name)
        sigma_min, sigma_max = 0.03, 14.6

    with pytest.raises(OptimalStepsError, match="IMG_TO_IMG"):
        oc.sigma_convention(IMG_TO_IMG())


def test_interpolation_of_a_schedule_that_reaches_the_models_smallest_sigma():
    convention = oc.sigma_convention(StubModelPatcher("eps").model.model_sampling)
    schedule = karras(convention.process, 5, sigma_min=convention.sigma_min, sigma_max=convention.sigma_max)
    for steps in (3, 9):
        sigmas = oc.loader_sigmas(schedule, convention, steps)
        assert len(sigmas) == steps + 1 and float(sigmas[-1]) == 0.0 and torch.all(sigmas[1:] < sigmas[:-1])
        assert float(sigmas[0]) == pytest.approx(convention.sigma_max, rel=F32)
    with pytest.raises(OptimalStepsError, match="1-step"):
        oc.interpolate_sigmas(torch.tensor([1.0, 0.0]), 4, 0.001)


def test_registry_metadata():
    import tomllib

    meta = tomllib.loads((Path(nodes.__file__).parent / "pyproject.toml").read_text())
    project = meta["project"]
    assert "comfyui" not in project["name"].lower() and len(project["version"].split(".")) == 3
    assert "optimalsteps" in " ".join(project["dependencies"]) and "Repository" in project["urls"]
    assert {"PublisherId", "DisplayName", "Icon"} <= set(meta["tool"]["comfy"])
