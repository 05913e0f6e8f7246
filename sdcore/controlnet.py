"""ControlNet (Zhang et al. 2023, "Adding Conditional Control to Text-to-Image Diffusion Models").

A trainable copy of the UNet's encoder (time embedding, input blocks, middle block — the very
``UNetEncoder`` code the UNet runs) that also sees a control image. The image enters through a small
conv stack (the hint block) added after the first conv; every input block's output and the middle
block's output leave through a 1×1 "zero conv" as a residual for the frozen UNet (CHECKPOINTS.md §4).
Parameter names are the single-file ones (``input_hint_block.*``, ``zero_convs.*``, ``middle_block_out.*``).
"""
import os

import torch
from safetensors.torch import save_file
from torch import nn

from . import layouts
from .cuda_graphs import CUDAGraphed
from .loader import (CheckpointError, TensorFile, Tensors, _apply_overrides, build, config_to_metadata,
                     from_file, infer_unet_config, renamed)
from .model import _json, _metadata, _weights_in, unet_config_from_diffusers
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


# ------------------------------------------------------------------------------------------------
# Loading
# ------------------------------------------------------------------------------------------------
def load_controlnet(path, device="cpu", dtype=torch.float32, cache_dir=None) -> ControlNet:
    """A ControlNet from a single file (``control_model.*`` keys or bare, LDM names; or diffusers names)
    or a diffusers ``ControlNetModel`` folder (config.json + diffusion_pytorch_model[.fp16].safetensors).
    ``cache_dir``: as for ``load_model``."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise CheckpointError(f"no such ControlNet file or folder: {path}")
    cfg, overrides = None, None
    if os.path.isdir(path):
        config = _json(os.path.join(path, "config.json"))
        if config.get("_class_name", "ControlNetModel") != "ControlNetModel":
            raise CheckpointError(f"{path} holds a diffusers {config['_class_name']}, not a ControlNetModel")
        t, cfg = _weights_in(path, "diffusion_pytorch_model"), unet_config_from_diffusers(config)
    else:
        tf = TensorFile(path)
        t, overrides = from_file(tf), _metadata(tf).get("controlnet")
    if "controlnet_cond_embedding.conv_in.weight" in t:
        t = _from_diffusers_names(t)
    elif any(k.startswith("control_model.") for k in t.keys()):
        t = t.sub("control_model.")          # whole-pipeline files also hold the base model: ignored
    if "input_hint_block.0.weight" not in t:
        what = ("a base model, not a ControlNet" if any(k.startswith("model.diffusion_model.") for k in t.keys())
                else "not a ControlNet (no input_hint_block / controlnet_cond_embedding tensors)")
        raise CheckpointError(f"{path} is {what}")
    if "zero_convs.0.0.weight" not in t:
        raise CheckpointError(f"{path} is a ControlNet variant that is not supported (no zero_convs: "
                              f"control-LoRA or T2I-adapter?); use a full ControlNet")
    cfg = _apply_overrides(cfg or _infer_config(t), overrides)
    cn = build(ControlNet, cfg, t, device, dtype, "ControlNet", path, cache_dir)
    cn.source = path
    return cn


def _infer_config(t: Tensors) -> UNetConfig:
    # A ControlNet has no output head, the one thing infer_unet_config reads out_channels from.
    conv_in = t.shape("input_blocks.0.0.weight")
    return infer_unet_config(Tensors(t.entries | {"out.2.weight": (None, (conv_in[1], conv_in[0], 3, 3))}))


def _from_diffusers_names(t: Tensors) -> Tensors:
    """Diffusers ControlNetModel names -> ours. The name map needs only the level and ResBlock counts,
    which the keys tell; everything else is then inferred from the renamed tensors as for LDM files."""
    levels = len({k.split(".")[1] for k in t.keys() if k.startswith("down_blocks.")})
    nrb = len({k.split(".")[3] for k in t.keys() if k.startswith("down_blocks.0.resnets.")})
    shape_only = UNetConfig(channel_mult=(1,) * levels, num_res_blocks=nrb)
    ours = layouts.controlnet_names_from_diffusers(t.keys(), shape_only)
    return renamed(t, {o: d for d, o in ours.items()})


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


# ------------------------------------------------------------------------------------------------
# Writing (tests, training recipes)
# ------------------------------------------------------------------------------------------------
def save_controlnet(path, cn: ControlNet, dtype=None, prefix="control_model.", with_config=True):
    """The single-file layout of lllyasviel's releases (``control_model.`` prefix, or bare with prefix="")."""
    sd = {prefix + k: (v.to(dtype) if dtype is not None else v).contiguous() for k, v in cn.state_dict().items()}
    save_file(sd, str(path), metadata=config_to_metadata(controlnet=cn.cfg) if with_config else None)

