"""Tiled VAE decode and encode: a large image goes through the autoencoder in overlapping tiles, so its
peak memory is a tile's, not the image's.

Each tile is run on its own (with its overlap as context), and where tiles overlap their outputs are
blended with weights that ramp linearly across the overlap, so no seam shows. A tile's GroupNorm sees
only that tile's statistics and its middle attention only that tile, which is why the result differs
from the untiled one, by an amount that depends on the VAE and the picture (the benchmark page gives
measured figures); where tiles agree, the blend returns exactly what they agree on. The same routine
serves the decoder (latent in, 8x larger image out) and the encoder (image in, 8x smaller latent out).
"""
from __future__ import annotations

import math
import os

import torch

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


def decode(vae, latent: torch.Tensor) -> torch.Tensor:
    """``vae.decode`` in tiles of DECODE_TILE latent pixels (float32 out)."""
    return tiled(vae.decode, latent, DECODE_TILE, DECODE_OVERLAP, DOWNSCALE)


def encode(vae, img: torch.Tensor) -> torch.Tensor:
    """``vae.encode`` in tiles of ENCODE_TILE image pixels (float32 out)."""
    return tiled(vae.encode, img, ENCODE_TILE, ENCODE_OVERLAP, 1 / DOWNSCALE)


def decode_bytes(latent_h: int, latent_w: int, itemsize: int) -> int:
    """A rough bound on an untiled decode's peak: a few full-size 256-channel activations of the last
    decoder levels, plus the mid-block attention's token-by-token matrix (where it is materialized)."""
    pixels = latent_h * latent_w * DOWNSCALE ** 2
    tokens = latent_h * latent_w
    return (4 * 256 * pixels + tokens * tokens) * itemsize


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
