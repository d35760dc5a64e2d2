"""The reference model's "latent": an exactly invertible rearrangement of
pixels, so no VAE is needed and every output decodes to a real image.

RGB in [0, 1] becomes [-1, 1], gets a fourth all-zero channel and is folded
2x2 into channels: [N, 3, H, W] -> [N, 16, H/2, W/2], the 16 channels that
ComfyUI's Flux latent format expects. The values are then stored the way
ComfyUI stores Flux latents (latent = model_space / scale + shift), so the
sampler's own process_in hands the model exactly the [-1, 1] pixel fold.
"""
import torch

LATENT_CHANNELS = 16
DOWNSCALE = 2
# comfy.latent_formats.Flux: process_in(latent) = (latent - shift_factor) * scale_factor
FLUX_SCALE_FACTOR = 0.3611
FLUX_SHIFT_FACTOR = 0.1159


def to_model_space(images: torch.Tensor) -> torch.Tensor:
    """[N, 3, H, W] in [0, 1] -> [N, 16, H/2, W/2], what the model is trained on."""
    signed = images * 2.0 - 1.0
    padded = torch.cat((signed, torch.zeros_like(signed[:, :1])), dim=1)
    return torch.nn.functional.pixel_unshuffle(padded, DOWNSCALE)


def from_model_space(folded: torch.Tensor) -> torch.Tensor:
    """Inverse of to_model_space; the fourth channel is dropped."""
    return ((torch.nn.functional.pixel_shuffle(folded, DOWNSCALE)[:, :3] + 1.0) / 2.0).clamp(0, 1)


def encode(images: torch.Tensor) -> torch.Tensor:
    """Pixels -> a ComfyUI LATENT tensor."""
    return to_model_space(images) / FLUX_SCALE_FACTOR + FLUX_SHIFT_FACTOR


def decode(latent: torch.Tensor) -> torch.Tensor:
    """A ComfyUI LATENT tensor -> pixels [N, 3, H, W] in [0, 1]."""
    return from_model_space((latent - FLUX_SHIFT_FACTOR) * FLUX_SCALE_FACTOR)
