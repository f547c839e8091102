"""Stand-in for comfy.model_sampling: the prediction mixins and the sigma tables, to ComfyUI's numerics.

A model's sampling object is a class deriving from one table class (ModelSamplingDiscrete,
ModelSamplingDiscreteFlow) and one mixin (EPS, V_PREDICTION, CONST), as ComfyUI composes them.
"""

import math

import torch


def _view(sigma, ndim):
    return sigma.reshape(sigma.shape[:1] + (1,) * (ndim - 1)) if sigma.numel() > 1 else sigma.reshape(())


class EPS:
    def calculate_input(self, sigma, noise):
        return noise / (_view(sigma, noise.ndim) ** 2 + self.sigma_data ** 2) ** 0.5

    def calculate_denoised(self, sigma, model_output, model_input):
        return model_input - model_output * _view(sigma, model_output.ndim)

    def noise_scaling(self, sigma, noise, latent_image, max_denoise=False):
        sigma = _view(sigma, noise.ndim)
        scale = torch.sqrt(1.0 + sigma ** 2.0) if max_denoise else sigma
        return noise * scale + latent_image

    def inverse_noise_scaling(self, sigma, latent):
        return latent


class V_PREDICTION(EPS):
    def calculate_denoised(self, sigma, model_output, model_input):
        sigma = _view(sigma, model_output.ndim)
        norm = sigma ** 2 + self.sigma_data ** 2
        return model_input * self.sigma_data ** 2 / norm - model_output * sigma * self.sigma_data / norm ** 0.5


class CONST:
    def calculate_input(self, sigma, noise):
        return noise

    def calculate_denoised(self, sigma, model_output, model_input):
        return model_input - model_output * _view(sigma, model_output.ndim)

    def noise_scaling(self, sigma, noise, latent_image, max_denoise=False):
        sigma = _view(sigma, noise.ndim)
        return sigma * (getattr(self, "noise_scale", 1.0) * noise) + (1.0 - sigma) * latent_image

    def inverse_noise_scaling(self, sigma, latent):
        return latent / (1.0 - _view(sigma, latent.ndim))


def make_beta_schedule(schedule, n_timestep, linear_start=1e-4, linear_end=2e-2):
    """ComfyUI's "linear" is the square of a linspace in sqrt(beta) (Stable Diffusion's scaled_linear)."""
    if schedule == "linear":
        return torch.linspace(linear_start ** 0.5, linear_end ** 0.5, n_timestep, dtype=torch.float64) ** 2
    if schedule == "sqrt_linear":
        return torch.linspace(linear_start, linear_end, n_timestep, dtype=torch.float64)
    raise ValueError(schedule)


class _SigmaTable(torch.nn.Module):
    """A table of increasing sigmas, its ends as ComfyUI reads them."""

    @property
    def sigma_min(self):
        return self.sigmas[0]

    @property
    def sigma_max(self):
        return self.sigmas[-1]


class ModelSamplingDiscrete(_SigmaTable):
    def __init__(self, beta_schedule="linear", linear_start=0.00085, linear_end=0.012, timesteps=1000):
        super().__init__()
        betas = make_beta_schedule(beta_schedule, timesteps, linear_start, linear_end)
        alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        self.num_timesteps = timesteps
        self.sigma_data = 1.0
        sigmas = ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5
        self.register_buffer("sigmas", sigmas.float())
        self.register_buffer("log_sigmas", sigmas.log().float())

    def timestep(self, sigma):
        """The nearest table index in log sigma (an integer: discrete models see quantised time)."""
        dists = sigma.log() - self.log_sigmas[:, None]
        return dists.abs().argmin(dim=0).view(sigma.shape)

    def sigma(self, timestep):
        t = torch.clamp(timestep.float(), min=0, max=len(self.sigmas) - 1)
        low, high, w = t.floor().long(), t.ceil().long(), t.frac()
        return ((1 - w) * self.log_sigmas[low] + w * self.log_sigmas[high]).exp()

    def percent_to_sigma(self, percent):
        if percent <= 0.0:
            return 999999999.9
        if percent >= 1.0:
            return 0.0
        return self.sigma(torch.tensor((1.0 - percent) * 999.0)).item()


def time_snr_shift(alpha, t):
    if alpha == 1.0:
        return t
    return alpha * t / (1 + (alpha - 1) * t)


class ModelSamplingDiscreteFlow(_SigmaTable):
    def __init__(self, shift=1.0, multiplier=1000, timesteps=1000):
        super().__init__()
        self.noise_scale = 1.0
        self.set_parameters(shift, timesteps, multiplier)

    def set_parameters(self, shift=1.0, timesteps=1000, multiplier=1000):
        self.shift = shift
        self.multiplier = multiplier
        self.register_buffer("sigmas", self.sigma((torch.arange(1, timesteps + 1, 1) / timesteps) * multiplier))

    def timestep(self, sigma):
        return sigma * self.multiplier

    def sigma(self, timestep):
        return time_snr_shift(self.shift, timestep / self.multiplier)

    def percent_to_sigma(self, percent):
        if percent <= 0.0:
            return 1.0
        if percent >= 1.0:
            return 0.0
        return time_snr_shift(self.shift, 1.0 - percent)


def model_sampling(kind, **options):
    """The composed sampling object ComfyUI builds: kind "eps", "v" (discrete table) or "flow" (CONST)."""
    if kind == "flow":
        cls = type("ModelSampling", (ModelSamplingDiscreteFlow, CONST), {})
    else:
        cls = type("ModelSampling", (ModelSamplingDiscrete, EPS if kind == "eps" else V_PREDICTION), {})
    return cls(**options)
