"""optimalsteps: optimal few-step sampling schedules for diffusion and flow-matching models."""

__version__ = "0.1.0"

from .core.errors import OptimalStepsError
from .testbeds.mixture import GaussianMixture
from .core.models import CFGModel, draw_noise, load_model, predict_x0
from .core.processes import DiscreteDDPM, NoiseProcess, convert_prediction, convert_state, convert_times, get_process
from .core.schedules import CLOSED_FORMS, Schedule, closed_form
from .optimize.search import SearchResult, search
from .optimize.calibration import AmplitudeCalibration
from .core.solvers import SOLVERS, SampleResult, sample, solver_step

__all__ = [
    "AmplitudeCalibration",
    "SearchResult",
    "search",
    "CFGModel",
    "CLOSED_FORMS",
    "DiscreteDDPM",
    "GaussianMixture",
    "NoiseProcess",
    "OptimalStepsError",
    "SOLVERS",
    "SampleResult",
    "Schedule",
    "closed_form",
    "convert_prediction",
    "convert_state",
    "convert_times",
    "draw_noise",
    "get_process",
    "load_model",
    "predict_x0",
    "sample",
    "solver_step",
]
