"""Stand-in for comfy.sample.fix_empty_latent_channels: an all-zero latent gets the model's channel count."""

import torch


def fix_empty_latent_channels(model, latent_image, downscale_ratio_spacial=None):
    channels = model.get_model_object("latent_format").latent_channels
    if latent_image.shape[1] != channels and torch.count_nonzero(latent_image) == 0:
        shape = list(latent_image.shape)
        shape[1] = channels
        latent_image = torch.zeros(shape, dtype=latent_image.dtype)
    return latent_image
