"""TAESD: a tiny convolutional decoder distilled from a family's VAE (Ollin Boer Bohan's TAESD, TAESDXL,
and the 16-channel TAESD3 / TAEF1), for previews of a latent during sampling and, where speed matters more
than fidelity, for final images.

It reads the latent the sampler works on (the VAE latent times its scale factor, no unscaling), squashes it
softly into ±3, and upsamples three times by 2 through plain ReLU blocks, 64 channels throughout:

    latent [B, C, h, w] -> tanh(x/3)·3 -> conv C→64, ReLU -> 3 blocks -> (upsample ×2, conv, 3 blocks) ×2
                        -> upsample ×2, conv, 1 block -> conv 64→3 -> image [B, 3, 8h, 8w] in [0, 1]

a block being relu(conv·relu·conv·relu·conv(x) + x). Parameter names are those of the released
``taesd_decoder.safetensors`` (its nn.Sequential indices); diffusers' AutoencoderTiny names are read through
``sdcore.formats.taesd``.
"""
from __future__ import annotations

import torch
from torch import nn

WIDTH = 64


def conv(n_in: int, n_out: int, bias: bool = True) -> nn.Conv2d:
    return nn.Conv2d(n_in, n_out, 3, padding=1, bias=bias)


class Clamp(nn.Module):
    def forward(self, x):
        return torch.tanh(x / 3) * 3


class Block(nn.Module):
    def __init__(self, n: int = WIDTH):
        super().__init__()
        self.conv = nn.Sequential(conv(n, n), nn.ReLU(), conv(n, n), nn.ReLU(), conv(n, n))
        self.skip = nn.Identity()
        self.fuse = nn.ReLU()

    def forward(self, x):
        return self.fuse(self.conv(x) + self.skip(x))


class TinyDecoder(nn.Sequential):
    """latent [B, latent_channels, h, w] -> image [B, 3, 8h, 8w] in [0, 1] (not clamped)."""

    def __init__(self, latent_channels: int = 4):
        layers = [Clamp(), conv(latent_channels, WIDTH), nn.ReLU(), Block(), Block(), Block()]
        for n_blocks in (3, 3, 1):
            layers += [nn.Upsample(scale_factor=2), conv(WIDTH, WIDTH, bias=False)] + [Block() for _ in range(n_blocks)]
        super().__init__(*layers, conv(WIDTH, 3))
        self.latent_channels = latent_channels


def decode(decoder: TinyDecoder, latent: torch.Tensor) -> torch.Tensor:
    """The sampler's latent -> an image in [-1, 1], as the VAE decode gives it."""
    w = next(decoder.parameters())
    return (decoder(latent.to(w)).float() * 2 - 1).clamp(-1, 1)
