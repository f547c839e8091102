"""`optimalsteps.diffusers`: the stable public name of the diffusers integration, which lives in
`optimalsteps.integrations.diffusers`. Importing it needs the `diffusers` extra."""

from .integrations.diffusers import (SettingsWarning, load_diffusers_model, load_pipeline,  # noqa: F401
                                     pipeline_family, pipeline_kwargs, pipeline_schedule, pipeline_teacher,
                                     sample_pipeline, search_pipeline)
