"""The supported pipeline families, in the order they are tried. A new family is one module under
`families/` and one line here."""

from __future__ import annotations

from typing import Any

from ...core.errors import OptimalStepsError
from .family import Family, components_of
from .families.auraflow import AuraFlow
from .families.chroma import Chroma
from .families.cogview4 import CogView4
from .families.dit import DiT
from .families.flux import Flux
from .families.flux2 import Flux2
from .families.hidream import HiDream
from .families.hunyuanvideo15 import HunyuanVideo15, HunyuanVideo15I2V
from .families.lumina2 import Lumina2
from .families.ltx2 import LTX2
from .families.qwenimage import QwenImage
from .families.qwenimage_edit import QwenImageEdit
from .families.sana import Sana
from .families.sd import SD, SDXL
from .families.sd3 import SD3
from .families.wan import Wan, WanI2V, WanVACE
from .families.zimage import ZImage

FAMILIES: tuple[Family, ...] = (
    Flux(), SD3(), SD(), SDXL(), DiT(), Wan(), WanI2V(), WanVACE(),
    QwenImageEdit(), QwenImage(), Flux2(), Chroma(), ZImage(), AuraFlow(), Lumina2(), Sana(), HunyuanVideo15(),
    CogView4(), HiDream(), HunyuanVideo15I2V(), LTX2(),
)


def supported() -> str:
    return "; ".join(family.label for family in FAMILIES)


def family_from_components(components: dict[str, set[str]], pipeline: str) -> Family:
    for family in FAMILIES:
        if family.matches(components):
            return family
    raise OptimalStepsError(f"{pipeline} is not supported; supported families: {supported()}")


def family_of(pipe: Any) -> Family:
    """The family of a pipeline, recognised by its denoiser (and components), so subclasses and variants of a
    supported pipeline are recognised too; refuses any other in one line naming the supported families."""
    family = family_from_components(components_of(pipe), type(pipe).__name__).variant(pipe)
    family.check_scheduler(pipe)
    return family


def pipeline_family(pipe: Any) -> str:
    """The family name ("flux", "sd3", "sd", "sdxl", "dit", "wan", "qwenimage", ...) of a supported pipeline."""
    return family_of(pipe).name


def family_from_index(index: dict) -> Family:
    """The family a diffusers `model_index.json` declares, from its component classes, before weights load."""
    components = {name: {value[1]} if isinstance(value, list) and len(value) == 2 and value[1] else set()
                  for name, value in index.items() if not name.startswith("_") and isinstance(value, list)}
    return family_from_components(components, str(index.get("_class_name")))
