"""TAESD decoder files (sdcore.taesd): the released ``taesd_decoder.safetensors`` / ``.pth`` (and TAESDXL's,
TAESD3's, TAEF1's: our names are theirs, the decoder's nn.Sequential indices), and diffusers' AutoencoderTiny
(a folder with config.json, or its weights file alone), whose ``decoder.layers.N`` are ours shifted by one:
diffusers applies the soft clamp in code, where TAESD has it as layer 0."""
from __future__ import annotations

import os
import re

import torch

from .build import build
from .files import CheckpointError, TensorFile, Tensors, component_weights, from_file

_DIFFUSERS = re.compile(r"decoder\.layers\.(\d+)\.(.+)")


def read_taesd(path: str) -> tuple[Tensors, int]:
    """(the decoder's tensors under our names, its latent channels)."""
    t = component_weights(path, "diffusion_pytorch_model") if os.path.isdir(path) else from_file(TensorFile(path))
    out = Tensors()
    if t.has_prefix("decoder.layers."):
        for key in t.keys():
            m = _DIFFUSERS.fullmatch(key)
            if m:
                out.entries[f"{int(m.group(1)) + 1}.{m.group(2)}"] = t.entries[key]
    else:
        prefix = "decoder." if t.has_prefix("decoder.") else ""
        out = t.sub(prefix) if prefix else t
    if "1.weight" not in out or len(out.shape("1.weight")) != 4:
        raise CheckpointError(f"{path} is not a TAESD decoder (taesd_decoder.safetensors or a diffusers "
                              "AutoencoderTiny): it has no first convolution 1.weight / decoder.layers.0.weight")
    return out, out.shape("1.weight")[1]


def load_taesd(path: str, device, dtype) -> torch.nn.Module:
    from ..taesd import TinyDecoder
    tensors, channels = read_taesd(os.fspath(path))
    return build(TinyDecoder, channels, tensors, device, dtype, "TAESD decoder", path)
