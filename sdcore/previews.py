"""Pictures of a latent while it is being sampled: what streaming clients and A1111's progress poll show.

Two ways from a latent [1, C, h, w] to RGB:

* TAESD (``model.taesd``, sdcore.taesd): a tiny decoder distilled from the family's VAE; a recognisable
  picture at full size for a few percent of a VAE decode.
* a linear projection, always there: every latent cell's C channels, plus a constant, times a
  (C + 1) × 3 matrix give the cell's colour (what A1111 calls "Approx cheap" and stable-diffusion.cpp
  ``proj``). The matrix is not a table of constants per family: it is fitted to the model's own VAE, the
  first time a preview is asked for, by least squares between latents (the VAE's encodings of some
  synthetic pictures: smooth colour fields, bars and disks) and what the VAE decodes them to, averaged
  over each cell's 8×8 pixels: the preview approximates the picture the decode would give. So it fits any
  VAE, our embedded default model's included (whose VAE knows only its own kind of picture), and is then
  cached on the model.

A preview never touches the sampler's state or its random numbers: the final image is the same with or
without previews.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from PIL import Image

from . import taesd
from .pipeline import tensor_to_image

METHODS = ("taesd", "projection")
FIT_IMAGES, FIT_SIDE = 4, 128        # cells (4 · 16²) for C + 1 unknowns per colour, many times over


def method(model) -> str:
    return "taesd" if model.taesd is not None else "projection"


@torch.inference_mode()
def preview(model, latent: torch.Tensor, size: tuple[int, int] | None = None) -> Image.Image:
    """An RGB picture of the sampler's latent [1, C, h, w]; ``size`` (width, height): scaled to it (the
    projection gives one pixel per latent cell), else TAESD's 8× or the projection's 1× size."""
    if model.taesd is not None:
        img = tensor_to_image(taesd.decode(model.taesd, latent)[0])
    else:
        img = tensor_to_image(project(projection(model), latent)[0])
    if size is not None and img.size != tuple(size):
        img = img.resize(tuple(size), Image.Resampling.BILINEAR)
    return img


def project(matrix: torch.Tensor, latent: torch.Tensor) -> torch.Tensor:
    """latent [B, C, h, w] -> RGB [B, 3, h, w] in [-1, 1] through ``matrix`` [C + 1, 3] (last row: the constant)."""
    x = latent.float().to(matrix.device)
    return (torch.einsum("bchw,cr->brhw", x, matrix[:-1]) + matrix[-1].view(1, 3, 1, 1)).clamp(-1, 1)


def projection(model) -> torch.Tensor:
    """The model's latent -> RGB matrix [C + 1, 3], fitted to its VAE once (``fit_projection``)."""
    matrix = getattr(model, "preview_projection", None)
    if matrix is None:
        matrix = model.preview_projection = fit_projection(model.vae)
    return matrix


@torch.inference_mode()
def fit_projection(vae, seed: int = 0) -> torch.Tensor:
    """Least squares of the decoded cell colour on [latent channels, 1] over latents of synthetic pictures."""
    latent, decoded = encode_decode(vae, synthetic_images(FIT_IMAGES, FIT_SIDE, seed))
    colour = F.avg_pool2d(decoded, 8)                                      # [N, 3, S/8, S/8]
    a = torch.cat([latent, torch.ones_like(latent[:, :1])], 1)
    a = a.permute(0, 2, 3, 1).reshape(-1, a.shape[1]).double()             # [cells, C + 1]
    b = colour.permute(0, 2, 3, 1).reshape(-1, 3).double()                 # [cells, 3]
    return torch.linalg.lstsq(a, b).solution.float()


def encode_decode(vae, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(the VAE's latents of ``images`` [N, C, S/8, S/8], their decode [N, 3, S, S]), float32 on the CPU."""
    w = next(vae.parameters())
    latent = vae.encode(images.to(w))
    return latent.float().cpu(), vae.decode(latent).float().cpu()


def synthetic_images(count: int, side: int, seed: int = 0) -> torch.Tensor:
    """[count, 3, side, side] in [-1, 1]: smooth random colour fields with a bar and a disk of flat colour,
    so that the fit sees saturated colours, dark and light, edges and gradients."""
    g = torch.Generator().manual_seed(seed)
    fields = F.interpolate(torch.rand(count, 3, 4, 4, generator=g) * 2 - 1, size=(side, side),
                           mode="bicubic", align_corners=False)
    yy, xx = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    for k in range(count):
        lo, hi = sorted(torch.randint(0, side, (2,), generator=g).tolist())
        bar = (xx >= lo) & (xx <= hi + side // 8)
        cy, cx, r = (torch.randint(side // 4, 3 * side // 4, (3,), generator=g)).tolist()
        disk = (yy - cy) ** 2 + (xx - cx) ** 2 <= (r // 2) ** 2
        for shape in (bar, disk):
            fields[k][:, shape] = (torch.rand(3, 1, generator=g) * 2 - 1)
    return fields.clamp(-1, 1)
