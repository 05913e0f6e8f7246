"""ControlNet (Zhang et al. 2023, "Adding Conditional Control to Text-to-Image Diffusion Models").

A trainable copy of the UNet's encoder (time embedding, input blocks, middle block — the very
``UNetEncoder`` code the UNet runs) that also sees a control image. The image enters through a small
conv stack (the hint block) added after the first conv; every input block's output and the middle
block's output leave through a 1×1 "zero conv" as a residual for the frozen UNet.
Parameter names are the single-file ones (``input_hint_block.*``, ``zero_convs.*``, ``middle_block_out.*``).
"""
import os

import torch
from torch import nn

from .cuda_graphs import CUDAGraphed
from .device import resolve_device, resolve_dtype
from .formats import CheckpointError, read_controlnet
from .formats.build import build
from .unet import UNetConfig, UNetEncoder

HINT_CHANNELS = (16, 16, 32, 32, 96, 96, 256)      # the hint block's conv widths; fixed by every released model
FAMILY_OF_CONTEXT = {768: "SD1.x", 1024: "SD2.x", 2048: "SDXL"}


class ControlNet(UNetEncoder):
    def __init__(self, cfg: UNetConfig):
        super().__init__(cfg)
        # 8 convs 3×3 with SiLU between, 3 of them stride 2: the full-resolution image down to the
        # latent's size (÷8) and the first block's width. Indices 0, 2, .., 14 as in the checkpoints.
        layers, ch = [], 3
        for i, out in enumerate(HINT_CHANNELS):
            layers += [nn.Conv2d(ch, out, 3, padding=1, stride=2 if i in (2, 4, 6) else 1), nn.SiLU()]
            ch = out
        self.input_hint_block = nn.Sequential(*layers, nn.Conv2d(ch, cfg.model_channels, 3, padding=1))
        # Zero-initialised in training so the untrained ControlNet leaves the UNet unchanged.
        self.zero_convs = nn.ModuleList(nn.Sequential(nn.Conv2d(c, c, 1)) for c in self.skip_channels)
        self.middle_block_out = nn.Sequential(nn.Conv2d(self.out_ch, self.out_ch, 1))

    def embed_hint(self, image: torch.Tensor) -> torch.Tensor:
        """Control image [1|B, 3, 8h, 8w] in [0, 1] -> guided hint [1|B, C, h, w]. It depends on neither
        the latent nor the timestep, so the pipeline computes it once per request, not per step."""
        return self.input_hint_block(image.to(self.input_hint_block[0].weight.dtype))

    def forward(self, x, t, context, guided_hint, y=None) -> list[torch.Tensor]:
        """x [B, in_ch, h, w], t float [B], context [B, T, Cc] -> the 13 residuals (unscaled): one per UNet
        skip connection, in order, then the middle block's. ``guided_hint`` broadcasts over the batch."""
        x, emb = self.embed_batch(x, t, context, y)
        skips, h = self.encode(x, emb, context, hint=guided_hint)
        return [zero(s) for zero, s in zip(self.zero_convs, skips)] + [self.middle_block_out(h)]


def load_controlnet(path, device="auto", dtype="auto", cache_dir=None) -> ControlNet:
    """A ControlNet from a single file (LDM or diffusers names) or a diffusers ``ControlNetModel``
    folder (``sdcore.formats.read_controlnet``); ``device``, ``dtype`` and ``cache_dir``: as for
    ``load_model``, which passes its own when it loads one with a model."""
    part = read_controlnet(os.fspath(path))
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    cn = build(ControlNet, part.cfg, part.tensors, device, dtype, "ControlNet", part.source, cache_dir)
    cn.source = part.source
    return cn


def attach_controlnet(model, cn: ControlNet):
    """Give ``model`` (a StableDiffusion) its ControlNet, refusing one made for another base family."""
    u, c, name = model.unet.cfg, cn.cfg, getattr(cn, "source", "the ControlNet")
    if c.context_dim != u.context_dim:
        fam = lambda d: FAMILY_OF_CONTEXT.get(d, "unknown family")
        raise CheckpointError(f"{name} is a ControlNet for {fam(c.context_dim)} models (context_dim {c.context_dim}) "
                              f"but the model {model.name!r} is {fam(u.context_dim)} (context_dim {u.context_dim})")
    if cn.skip_channels != model.unet.skip_channels or c.in_channels > u.in_channels:
        raise CheckpointError(f"{name} does not fit the model {model.name!r}: its blocks have channels "
                              f"{cn.skip_channels} (input {c.in_channels}), the UNet's {model.unet.skip_channels} "
                              f"(input {u.in_channels})")
    model.controlnet = cn.to(device=model.device, dtype=model.dtype)
    return model.use_cuda_graphs() if isinstance(model.unet, CUDAGraphed) else model    # as the UNet runs
