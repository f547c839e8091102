"""Stand-in for comfy.samplers: the guider's call path, KSAMPLER, scheduler registry.

The call path is ComfyUI's: CFGGuider.sample -> sampler.sample(guider, sigmas, extra_args, callback,
noise, latent_image, denoise_mask, disable_pbar) -> KSAMPLER builds the first state with
model_sampling.noise_scaling(sigmas[0], noise, latent, max_denoise) and calls
sampler_function(model_k, x, sigmas, extra_args=..., callback=..., disable=...), where
model_k(x, sigma[B], **extra_args) returns the guided clean estimate uncond + cfg (cond - uncond).
"""

import math
from typing import Callable, NamedTuple

import torch

from .k_diffusion import sampling as k_diffusion_sampling


class Sampler:
    def max_denoise(self, model_wrap, sigmas):
        max_sigma = float(model_wrap.inner_model.model_sampling.sigma_max)
        sigma = float(sigmas[0])
        return math.isclose(max_sigma, sigma, rel_tol=1e-05) or sigma > max_sigma


class KSamplerX0Inpaint:
    def __init__(self, model, sigmas):
        self.inner_model = model
        self.sigmas = sigmas

    def __call__(self, x, sigma, denoise_mask=None, model_options={}, seed=None):
        return self.inner_model(x, sigma, model_options=model_options, seed=seed)


class KSAMPLER(Sampler):
    def __init__(self, sampler_function, extra_options={}, inpaint_options={}):
        self.sampler_function = sampler_function
        self.extra_options = extra_options
        self.inpaint_options = inpaint_options

    def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None,
               disable_pbar=False):
        extra_args["denoise_mask"] = denoise_mask
        model_k = KSamplerX0Inpaint(model_wrap, sigmas)
        ms = model_wrap.inner_model.model_sampling
        x = ms.noise_scaling(sigmas[0], noise, latent_image, self.max_denoise(model_wrap, sigmas))
        total = len(sigmas) - 1
        k_callback = None if callback is None else (lambda d: callback(d["i"], d["denoised"], d["x"], total))
        samples = self.sampler_function(model_k, x, sigmas, extra_args=extra_args, callback=k_callback,
                                        disable=disable_pbar, **self.extra_options)
        return ms.inverse_noise_scaling(sigmas[-1], samples)


def ksampler(sampler_name, extra_options={}, inpaint_options={}):
    return KSAMPLER(getattr(k_diffusion_sampling, f"sample_{sampler_name}"), extra_options, inpaint_options)


def sampler_object(name):
    return ksampler(name)


class CFGGuider:
    def __init__(self, model_patcher):
        self.model_patcher = model_patcher
        self.model_options = model_patcher.model_options
        self.original_conds = {}
        self.cfg = 1.0

    def set_conds(self, positive, negative):
        self.original_conds = {"positive": positive, "negative": negative}

    def set_cfg(self, cfg):
        self.cfg = cfg

    def __call__(self, x, timestep, model_options={}, seed=None):
        return self.predict_noise(x, timestep, model_options, seed)

    def predict_noise(self, x, timestep, model_options={}, seed=None):
        model = self.inner_model
        cond = model.apply_model(x, timestep, self.conds["positive"])
        if math.isclose(self.cfg, 1.0):  # ComfyUI skips the unconditional pass at cfg 1
            return cond
        uncond = model.apply_model(x, timestep, self.conds["negative"])
        return uncond + (cond - uncond) * self.cfg

    def sample(self, noise, latent_image, sampler, sigmas, denoise_mask=None, callback=None, disable_pbar=False,
               seed=None):
        if sigmas.shape[-1] == 0:
            return latent_image
        self.conds = {k: list(v) for k, v in self.original_conds.items()}
        self.inner_model = self.model_patcher.model
        try:
            noise = noise.to(dtype=torch.float32)
            latent_image = latent_image.to(dtype=torch.float32)
            extra_args = {"model_options": dict(self.model_options), "seed": seed}
            samples = sampler.sample(self, sigmas, extra_args, callback, noise, latent_image, denoise_mask,
                                     disable_pbar)
        finally:
            self.model_patcher.cleanups += 1  # ComfyUI's model_patcher.cleanup() in a finally
        del self.inner_model
        return samples.to(torch.float32)


class SchedulerHandler(NamedTuple):
    handler: Callable[..., torch.Tensor]
    use_ms: bool = True


def simple_scheduler(model_sampling, steps):
    s = model_sampling
    stride = len(s.sigmas) / steps
    sigs = [float(s.sigmas[-(1 + int(x * stride))]) for x in range(steps)]
    return torch.FloatTensor(sigs + [0.0])


SCHEDULER_HANDLERS = {"simple": SchedulerHandler(simple_scheduler)}
SCHEDULER_NAMES = list(SCHEDULER_HANDLERS)


def calculate_sigmas(model_sampling, scheduler_name, steps):
    handler = SCHEDULER_HANDLERS.get(scheduler_name)
    if handler is None:
        raise ValueError(f"error invalid scheduler {scheduler_name}")
    if handler.use_ms:
        return handler.handler(model_sampling, steps)
    return handler.handler(n=steps, sigma_min=float(model_sampling.sigma_min),
                           sigma_max=float(model_sampling.sigma_max))


class KSampler:
    SCHEDULERS = SCHEDULER_NAMES
