"""optimalsteps: optimal few-step sampling schedules for diffusion and flow-matching models."""

__version__ = "0.1.0"

from .errors import OptimalStepsError
from .mixture import GaussianMixture
from .models import CFGModel, draw_noise, load_model, predict_x0
from .processes import DiscreteDDPM, NoiseProcess, convert_prediction, convert_state, convert_times, get_process
from .schedules import CLOSED_FORMS, Schedule, closed_form
from .search import SearchResult, search
from .calibration import AmplitudeCalibration
from .solvers import SOLVERS, SampleResult, sample, solver_step

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
