"""HiDream-I1 (HiDreamImagePipeline): latents [B, C, H, W] patched by the transformer itself, four text encoders
(two CLIP pooled, T5, the hidden states of every Llama 3 layer), the network predicts minus the velocity, CFG
batched as [negative, positive].

Its traps: the call resizes every request to the area of its default size (aspect ratio kept, multiples of
twice the VAE factor); its mu, where the scheduler shifts dynamically, comes from the transformer's largest
sequence (`transformer.max_seq`) with Flux's default constants, whatever the resolution or the scheduler's
settings; its Llama embeddings are [layers, B, tokens, dim] (kept here batch-first as a per-sample condition);
and with a UniPC scheduler it hands the scheduler only the step count, ignoring `sigmas`."""

from __future__ import annotations

import copy
import math
from typing import Any, Optional

import torch

from ....core.errors import OptimalStepsError
from ....core.processes import FLOW
from ....core.schedules import Schedule, flux_mu
from ..common import CallOptions, Guidance, PipelineModel, device_of, lora_scale, sequence_length
from ..family import Family, Request
from ..prompts import Conditioning, negatives, text_conditioning

# the embeddings a call without text encoders gives, each with its negative_ twin
EMBEDDINGS = ("pooled_prompt_embeds", "prompt_embeds_t5", "prompt_embeds_llama3")


class HiDreamModel(PipelineModel):
    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
        return -self.net(hidden_states=x.to(self.dtype), timesteps=self.flow_timestep(t),
                         encoder_hidden_states_t5=cond["prompt_embeds_t5"],
                         encoder_hidden_states_llama3=cond["prompt_embeds_llama3"].movedim(0, 1),
                         pooled_embeds=cond["pooled_prompt_embeds"], attention_kwargs=self.attention,
                         return_dict=False)[0]


def _rows(name: str, value: Any) -> int:
    """The batch size of one HiDream embedding (the Llama ones keep it in dimension 1)."""
    dims = {"pooled_prompt_embeds": 2, "prompt_embeds_t5": 3, "prompt_embeds_llama3": 4}[name.replace("negative_", "")]
    if not isinstance(value, torch.Tensor) or value.dim() != dims or not value.is_floating_point():
        layout = "[layers, B, tokens, dim]" if dims == 4 else ("[B, dim]" if dims == 2 else "[B, tokens, dim]")
        raise OptimalStepsError(f"{name} must be a floating-point tensor {layout}")
    return int(value.shape[1] if dims == 4 else value.shape[0])


class HiDream(Family):
    name = "hidream"
    label = "HiDream-I1 (HiDreamImageTransformer2DModel)"
    denoisers = ("HiDreamImageTransformer2DModel",)
    batched_cfg = True
    packed = False

    def variant(self, pipe: Any) -> Family:
        return HiDreamUniPC() if type(pipe.scheduler).__name__ == "UniPCMultistepScheduler" else self

    # ------------------------------------------------------------------------ sizes and shift
    def default_size(self, pipe: Any) -> tuple[int, int]:
        size = pipe.default_sample_size * self.vae_scale_factor(pipe)
        return size, size

    def size_rules(self, vae_scale_factor: int, net_config: Any) -> dict:
        return {"multiple": 1}  # the call resizes any size itself (call_size)

    def call_size(self, pipe: Any, height: int, width: int, options: CallOptions) -> tuple[int, int]:
        # the pipeline scales every request to its default area, keeping the aspect ratio
        division = self.vae_scale_factor(pipe) * 2
        scale = math.sqrt((pipe.default_sample_size * self.vae_scale_factor(pipe)) ** 2 / (width * height))
        return int(height * scale // division * division), int(width * scale // division * division)

    def mu(self, pipe: Any, height: int, width: int, steps: Optional[int]) -> float:
        return flux_mu(pipe.transformer.max_seq)  # the pipeline's own: Flux's constants, not the scheduler's

    def default_run(self, pipe: Any, scheduler: Any, steps: int, height: int, width: int) -> None:
        # the scheduler's own spacing, shifted a second time at the low end (as SD3's and AuraFlow's)
        scheduler.set_timesteps(steps, mu=self.mu(pipe, height, width, steps))

    def flow_teacher(self, pipe: Any, steps: int, k: float) -> Schedule:
        """The pipeline's own `steps`-step run, so that the search's teacher is the call with many steps."""
        scheduler = copy.deepcopy(pipe.scheduler)
        self.default_run(pipe, scheduler, steps, *self.default_size(pipe))
        return Schedule(torch.as_tensor(scheduler.sigmas, dtype=torch.float64), FLOW, metadata={"baseline": "pipeline"})

    # ------------------------------------------------------------------------ prompts and model
    def conditioning(self, pipe: Any, prompts: Any, options: CallOptions) -> Conditioning:
        if not isinstance(prompts, dict):
            return text_conditioning(pipe, prompts, options.negative_prompt, False, False)
        known = set(EMBEDDINGS) | {"negative_" + name for name in EMBEDDINGS}
        unknown = sorted(set(prompts) - known)
        missing = [name for name in EMBEDDINGS if prompts.get(name) is None]
        if unknown or missing:
            raise OptimalStepsError(f"HiDream embeddings are {', '.join(EMBEDDINGS)} (and their negative_ twins); "
                                    f"got {sorted(prompts)}")
        given = {name: value for name, value in prompts.items() if value is not None}
        negative = [name for name in given if name.startswith("negative_")]
        if negative and len(negative) != len(EMBEDDINGS):
            raise OptimalStepsError("give all three negative HiDream embeddings, or none")
        if options.negative_prompt is not None:
            raise OptimalStepsError("give negative_*_embeds, not negative_prompt, together with prompt embeddings")
        counts = {name: _rows(name, value) for name, value in given.items()}
        count = counts["pooled_prompt_embeds"]
        for name, rows in counts.items():
            if rows != count:
                raise OptimalStepsError(f"{name} has {rows} prompts but pooled_prompt_embeds has {count}")
        for name in EMBEDDINGS:
            if "negative_" + name in given and given["negative_" + name].shape != given[name].shape:
                raise OptimalStepsError(f"negative_{name} has shape {list(given['negative_' + name].shape)} but "
                                        f"{name} has {list(given[name].shape)}")
        return Conditioning(None, given, None, count)

    def encode(self, pipe: Any, request: Request) -> dict[str, torch.Tensor]:
        c, cfg, options = request.conditioning, request.kind == "cfg", request.options
        if cfg and c.texts is None and "negative_pooled_prompt_embeds" not in c.embeds:
            raise OptimalStepsError("HiDream guidance with prompt embeddings needs the three negative_*_embeds")
        t5, neg_t5, llama, neg_llama, pooled, neg_pooled = pipe.encode_prompt(
            prompt=c.texts, device=device_of(pipe), num_images_per_prompt=request.per_prompt,
            do_classifier_free_guidance=cfg, negative_prompt=negatives(options.negative_prompt, c.count),
            **{name: c.embeds.get(name) for prefix in ("", "negative_") for name in
               (prefix + e for e in EMBEDDINGS)},
            max_sequence_length=sequence_length(pipe, options), lora_scale=lora_scale(options))
        cond = {"prompt_embeds_t5": t5, "prompt_embeds_llama3": llama.movedim(1, 0), "pooled_prompt_embeds": pooled}
        if cfg:
            cond.update(negative_prompt_embeds_t5=neg_t5, negative_prompt_embeds_llama3=neg_llama.movedim(1, 0),
                        negative_pooled_prompt_embeds=neg_pooled)
        return cond

    def build(self, pipe: Any, request: Request, cond: dict) -> tuple[Any, torch.dtype]:
        dtype = cond["pooled_prompt_embeds"].dtype
        model, _ = self.flow_model(HiDreamModel, pipe, request, cond, Guidance(request.scale, batched=True),
                                   self.image_latent_shape(pipe, request), latents_dtype=dtype)
        model.dtype = dtype  # the pipeline draws its latents in this dtype and hands them to the network as they are
        return model, dtype


class HiDreamUniPC(HiDream):
    """HiDream with a UniPC scheduler: the pipeline hands it only the step count (its `sigmas` are ignored), so a
    schedule runs through the library's loop (`sample_pipeline`), and `pipeline_schedule` is the UniPC default."""

    custom_schedule = False
    steps_only = True

    def default_run(self, pipe: Any, scheduler: Any, steps: int, height: int, width: int) -> None:
        scheduler.set_timesteps(steps)

    def flow_teacher(self, pipe: Any, steps: int, k: float) -> Schedule:
        return Family.flow_teacher(self, pipe, steps, k)
