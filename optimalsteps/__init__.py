"""optimalsteps: optimal few-step sampling schedules for diffusion and flow-matching models.

The front door: `search` (the OSS search, optionally refined), `sample`, `compare`, `make_schedule`,
`load_model`, `draw_noise` and `Schedule`. The wings below (core, testbeds, optimize, evaluation,
integrations, cli) are described in docs/architecture.md.
"""

from .core.version import __version__
from .core.errors import OptimalStepsError
from .core.models import CFGModel, draw_noise, predict_x0
from .core.processes import DiscreteDDPM, NoiseProcess, convert_prediction, convert_state, convert_times, get_process
from .core.schedules import CLOSED_FORMS, Schedule, closed_form
from .core.solvers import SOLVERS, SampleResult, sample, solver_step
from .testbeds.mixture import GaussianMixture
from .testbeds.registry import load_model
from .optimize.calibration import AmplitudeCalibration
from .optimize.search import SearchResult
from .evaluation.baselines import make_schedule
from .evaluation.baselines import oss_search as search
from .evaluation.compare import compare

__all__ = [
    "AmplitudeCalibration",
    "CFGModel",
    "CLOSED_FORMS",
    "DiscreteDDPM",
    "GaussianMixture",
    "NoiseProcess",
    "OptimalStepsError",
    "SOLVERS",
    "SampleResult",
    "Schedule",
    "SearchResult",
    "__version__",
    "closed_form",
    "compare",
    "convert_prediction",
    "convert_state",
    "convert_times",
    "draw_noise",
    "get_process",
    "load_model",
    "make_schedule",
    "predict_x0",
    "sample",
    "search",
    "solver_step",
]
