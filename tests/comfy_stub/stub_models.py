"""Models for the ComfyUI stand-in: a ModelPatcher whose network is an exact Gaussian mixture.

The network sees what ComfyUI gives a network: the input scaled by calculate_input and the model's
timestep (sigma * 1000 for flow, the nearest table index for discrete models), and returns the raw
prediction (velocity eps - x0 for CONST, eps for EPS, v for V_PREDICTION); the conditioning's tensor
selects one of two mixtures, so CFG mixes two different denoisers.
"""

from types import SimpleNamespace

import torch

from comfy import model_sampling as cms
from optimalsteps.core.processes import FLOW, ve_process
from optimalsteps.testbeds.mixture import GaussianMixture


class StubNetwork:
    def __init__(self, kind, ms, dim, seed=0):
        process = FLOW if kind == "flow" else ve_process(float(ms.sigma_max))
        self.kind, self.ms = kind, ms
        self.mixtures = [GaussianMixture.random(dim=dim, components=3, seed=seed + i, process=process)
                         for i in range(2)]

    def network_sigma(self, timestep):
        if self.kind == "flow":
            return timestep.double() / self.ms.multiplier
        return self.ms.sigma(timestep).double()

    def __call__(self, xc, timestep, which):
        sigma = self.network_sigma(timestep).reshape(-1)
        sigma = sigma.expand(xc.shape[0]) if sigma.numel() == 1 else sigma
        s = sigma.reshape(-1, *([1] * (xc.dim() - 1)))
        flat = xc.double().reshape(xc.shape[0], -1)
        if self.kind == "flow":
            x = flat
        else:  # the network assumes its input was scaled for its own (quantised) noise level
            x = flat * (s.reshape(-1, 1) ** 2 + 1).sqrt()
        x0 = self.mixtures[which](x, sigma)
        if self.kind == "flow":
            eps = (x - (1 - sigma[:, None]) * x0) / sigma[:, None]
            out = eps - x0
        else:
            eps = (x - x0) / sigma[:, None]
            if self.kind == "v":
                norm = (sigma[:, None] ** 2 + 1).sqrt()
                out = eps / norm - sigma[:, None] / norm * x0
            else:
                out = eps
        return out.reshape(xc.shape).to(xc.dtype)


class StubBaseModel:
    def __init__(self, kind, dim=6, seed=0, **sampling_options):
        self.model_sampling = cms.model_sampling(kind, **sampling_options)
        self.diffusion_model = StubNetwork(kind, self.model_sampling, dim, seed)
        self.latent_format = SimpleNamespace(latent_channels=2)  # the tests' latents are [B, 2, 1, 3]
        self.calls = 0

    def apply_model(self, x, sigma, conds):
        self.calls += 1
        which = int(conds[0][0].reshape(-1)[0])
        xc = self.model_sampling.calculate_input(sigma, x)
        t = self.model_sampling.timestep(sigma).float()
        out = self.diffusion_model(xc, t, which)
        return self.model_sampling.calculate_denoised(sigma, out, x)


class StubModelPatcher:
    def __init__(self, kind, dim=6, seed=0, **sampling_options):
        self.model = StubBaseModel(kind, dim, seed, **sampling_options)
        self.model_options = {"transformer_options": {}}
        self.cleanups = 0

    def get_model_object(self, name):
        return getattr(self.model, name)


POSITIVE = [[torch.zeros(1, 1), {}]]
NEGATIVE = [[torch.ones(1, 1), {}]]
