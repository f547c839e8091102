"""Stand-in for the three comfy.k_diffusion.sampling functions the tests cross-check, to ComfyUI's
numerics: every step works on sigmas as given (float32 tensors), d = (x - denoised) / sigma."""

import torch


def to_d(x, sigma, denoised):
    return (x - denoised) / sigma.reshape(sigma.shape + (1,) * (x.ndim - sigma.ndim))


def _denoised(model, x, sigma, extra_args):
    """The model at one sigma for every row, as the samplers call it."""
    return model(x, sigma * x.new_ones([x.shape[0]]), **({} if extra_args is None else extra_args))


def _report(callback, x, i, sigma, denoised):
    if callback is not None:
        callback({"x": x, "i": i, "sigma": sigma, "sigma_hat": sigma, "denoised": denoised})


@torch.no_grad()
def sample_euler(model, x, sigmas, extra_args=None, callback=None, disable=None):
    for i in range(len(sigmas) - 1):
        denoised = _denoised(model, x, sigmas[i], extra_args)
        _report(callback, x, i, sigmas[i], denoised)
        x = x + to_d(x, sigmas[i], denoised) * (sigmas[i + 1] - sigmas[i])
    return x


@torch.no_grad()
def sample_heun(model, x, sigmas, extra_args=None, callback=None, disable=None):
    for i in range(len(sigmas) - 1):
        denoised = _denoised(model, x, sigmas[i], extra_args)
        _report(callback, x, i, sigmas[i], denoised)
        d = to_d(x, sigmas[i], denoised)
        dt = sigmas[i + 1] - sigmas[i]
        if sigmas[i + 1] == 0:
            x = x + d * dt  # the last step to sigma 0 is Euler
        else:
            x_pred = x + d * dt
            d_pred = to_d(x_pred, sigmas[i + 1], _denoised(model, x_pred, sigmas[i + 1], extra_args))
            x = x + (d + d_pred) / 2 * dt
    return x


@torch.no_grad()
def sample_dpmpp_2m(model, x, sigmas, extra_args=None, callback=None, disable=None):
    """Steps in lambda = -log(sigma) whatever the model (flow included); first order on the first step
    and on the step to sigma 0."""
    lam = lambda sigma: sigma.log().neg()
    previous = None
    for i in range(len(sigmas) - 1):
        denoised = _denoised(model, x, sigmas[i], extra_args)
        _report(callback, x, i, sigmas[i], denoised)
        h = lam(sigmas[i + 1]) - lam(sigmas[i])
        estimate = denoised
        if previous is not None and sigmas[i + 1] != 0:
            r = (lam(sigmas[i]) - lam(sigmas[i - 1])) / h
            estimate = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * previous
        x = (sigmas[i + 1] / sigmas[i]) * x - torch.expm1(-h) * estimate
        previous = denoised
    return x
