"""OptimalSteps for ComfyUI: search an optimal few-step schedule on the loaded model, load saved ones.

Classic node API (NODE_CLASS_MAPPINGS), loaded by every ComfyUI version. Needs the `optimalsteps`
package (`pip install optimalsteps`). Set OPTIMALSTEPS_KSAMPLER_SCHEDULERS=1 to also list saved schedules
in the KSampler scheduler menu (off by default).
"""

import logging
import os

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS, register_schedulers

if os.environ.get("OPTIMALSTEPS_KSAMPLER_SCHEDULERS", "").strip().lower() in ("1", "true", "yes", "on"):
    try:
        register_schedulers()
    except Exception as exc:  # never keep ComfyUI from starting over an optional menu entry
        logging.getLogger("optimalsteps").warning("OptimalSteps: scheduler names not registered: %s", exc)

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
