"""Tiled VAE decode and encode: a large image goes through the autoencoder in overlapping tiles, so its
peak memory is a tile's, not the image's.

Only the full-resolution part is tiled: the decoder's upsampling half and the encoder's downsampling
half, convolutions and GroupNorms. The middle block, whose attention relates every latent pixel to every
other, runs whole at the latent's resolution (8x smaller each way, so it fits where the image does not).
Each tile is run on its own (with its overlap as context), and where tiles overlap their outputs are
blended with weights that ramp linearly across the overlap, so no seam shows.

A GroupNorm normalises with its input's mean and variance over the whole picture; a tile alone would
see only its own, and tiles of a sky and of a forest would come out differently exposed. So the part
is first run once on the whole input shrunk to a tile's size, each GroupNorm keeping the statistics
it saw there (sdcore.vae.shared_norm_statistics), and every tile is then normalised with those. They
are an estimate (from a smaller picture), which is why the result still differs slightly from the
untiled one (the benchmark page gives measured figures). The same routine serves the decoder (features
in, 8x larger image out) and the encoder (image in, 8x smaller features out).
"""
from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F

from .vae import BAND_BYTES, shared_norm_statistics

MODES = ("auto", "on", "off")
DECODE_TILE, DECODE_OVERLAP = 64, 16           # latent pixels: 512-pixel tiles overlapping by 128 pixels
ENCODE_TILE, ENCODE_OVERLAP = 512, 128         # image pixels
DOWNSCALE = 8                                  # image pixels per latent pixel


def _starts(size: int, tile: int, overlap: int, align: int = 1) -> list[int]:
    """Tile offsets along one side: as few tiles as overlap by at least ``overlap`` (give or take
    ``align``, which offsets are multiples of), spread evenly, the last one flush with the end."""
    if size <= tile:
        return [0]
    n = math.ceil((size - overlap) / (tile - overlap))
    return [round(i * (size - tile) / (n - 1) / align) * align for i in range(n)]


def _ramp(n: int, overlap: int, rise: bool, fall: bool, device) -> torch.Tensor:
    """[n] weights: 1 inside, rising over ``overlap`` at the start (if a tile comes before) and falling
    at the end (if one comes after); never 0, so every pixel has weight."""
    w = torch.ones(n, device=device)
    ramp = torch.arange(1, overlap + 1, device=device) / (overlap + 1)
    k = min(overlap, n)
    if rise:
        w[:k] = torch.minimum(w[:k], ramp[:k])
    if fall:
        w[n - k:] = torch.minimum(w[n - k:], ramp[:k].flip(0))
    return w


def tiled(fn, x: torch.Tensor, tile: int, overlap: int, scale: float) -> torch.Tensor:
    """``fn`` over overlapping ``tile``-sized tiles of x [B, C, H, W], blended; ``fn`` maps a tile of
    h x w to one of h*scale x w*scale (scale 8: the decoder, 1/8: the encoder)."""
    _, _, h, w = x.shape
    align = round(1 / scale) if scale < 1 else 1          # the encoder's tiles start on whole latent pixels
    ys, xs = _starts(h, tile, overlap, align), _starts(w, tile, overlap, align)
    out = weight = None
    for i, y0 in enumerate(ys):
        for j, x0 in enumerate(xs):
            part = fn(x[:, :, y0:y0 + tile, x0:x0 + tile]).float()
            oh, ow = part.shape[-2:]
            oy, ox = int(y0 * scale), int(x0 * scale)
            if out is None:
                out = torch.zeros(part.shape[0], part.shape[1], int(h * scale), int(w * scale), device=part.device)
                weight = torch.zeros(1, 1, *out.shape[-2:], device=part.device)
            o = int(overlap * scale)
            wy = _ramp(oh, o, i > 0, i < len(ys) - 1, part.device)
            wx = _ramp(ow, o, j > 0, j < len(xs) - 1, part.device)
            wt = wy[:, None] * wx[None, :]
            out[:, :, oy:oy + oh, ox:ox + ow] += part * wt
            weight[:, :, oy:oy + oh, ox:ox + ow] += wt
    return out / weight


def tiled_shared_norms(fn, x: torch.Tensor, tile: int, overlap: int, scale: float, align: int = 1) -> torch.Tensor:
    """``tiled``, every tile normalised with the GroupNorm statistics of ``fn`` run on the whole of x shrunk
    (by area averaging) to fit one tile, its sides multiples of ``align``."""
    h, w = x.shape[-2:]
    shrink = max(h, w) / tile
    with shared_norm_statistics():
        if shrink > 1:                                 # else the one tile is the whole: its own statistics
            size = [max(align, round(s / shrink / align) * align) for s in (h, w)]
            fn(F.interpolate(x, size=size, mode="area"))
        return tiled(fn, x, tile, overlap, scale)


def decode(vae, latent: torch.Tensor) -> torch.Tensor:
    """``vae.decode``, its upsampling half in tiles of DECODE_TILE latent pixels (float32 out)."""
    return tiled_shared_norms(vae.decoder.upsample, vae.decode_middle(latent), DECODE_TILE, DECODE_OVERLAP, DOWNSCALE)


def encode(vae, img: torch.Tensor) -> torch.Tensor:
    """``vae.encode``, its downsampling half in tiles of ENCODE_TILE image pixels (float32 out)."""
    features = tiled_shared_norms(vae.encoder.downsample, img, ENCODE_TILE, ENCODE_OVERLAP, 1 / DOWNSCALE, DOWNSCALE)
    return vae.encode_middle(features.to(img.dtype)).float()


def decode_bytes(latent_h: int, latent_w: int, itemsize: int) -> int:
    """A rough bound on an untiled decode's peak: the last level's first block holds its 256-channel
    full-size input and its two 128-channel outputs (the layers run in bands, so no normalised or
    upsampled copy is whole), a few bands, and the mid-block attention's token-by-token matrix (where it
    is materialized)."""
    pixels = latent_h * latent_w * DOWNSCALE ** 2
    tokens = latent_h * latent_w
    return (2 * 256 * pixels + tokens * tokens) * itemsize + 8 * BAND_BYTES


def available_bytes(device: torch.device) -> int | None:
    """Memory free for a decode on ``device``; None where it cannot be told."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type == "cpu" and os.path.exists("/proc/meminfo"):
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    return None


def should_tile(mode: str, latent_h: int, latent_w: int, dtype: torch.dtype, device: torch.device) -> bool:
    """on: always (when more than one tile is needed); off: never; auto: when the untiled decode would not fit."""
    if mode == "off" or max(latent_h, latent_w) <= DECODE_TILE:
        return False
    if mode == "on":
        return True
    free = available_bytes(device)
    return free is not None and decode_bytes(latent_h, latent_w, torch.finfo(dtype).bits // 8) > free
