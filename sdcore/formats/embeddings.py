"""Textual-inversion embeddings: a few learned token vectors stored under a name (the file's).

Files people share:
    A1111 .pt             {"string_to_param": {"*": [n, width]}, "name": ..., "step": ...}
    A1111 .safetensors    {"emb_params": [n, width]}
    SDXL .safetensors     {"clip_l": [n, 768], "clip_g": [n, 1280]}: one set per text encoder
    diffusers .bin/.pt    {"<token>": [width]}: one vector

``read_embedding`` gives the vectors by text-encoder width; a prompt naming the embedding gets, in each
encoder, the vectors of that encoder's width (sdcore.prompts, sdcore.model).
"""
from __future__ import annotations

import os

import torch

from .files import CheckpointError, TensorFile

EXTENSIONS = (".safetensors", ".pt", ".bin")
SDXL_KEYS = ("clip_l", "clip_g")


def read_embedding(path: str) -> dict[int, torch.Tensor]:
    """width -> vectors [n, width] (float32) of the embedding file at ``path``; CheckpointError if it holds none."""
    name = os.path.basename(path)
    try:
        if path.endswith(".safetensors"):
            tf = TensorFile(path)
            tensors = {k: tf.get(k) for k in tf.keys()}
        else:
            tensors = torch.load(path, map_location="cpu", weights_only=True)     # no code runs
    except CheckpointError:
        raise
    except Exception as e:             # a damaged file, or a pickle holding more than data
        raise CheckpointError(f"embedding {name}: unreadable ({type(e).__name__}: {str(e)[:120]})") from None
    if not isinstance(tensors, dict):
        raise CheckpointError(f"embedding {name}: not a dictionary of tensors")
    if isinstance(tensors.get("string_to_param"), dict):          # A1111 .pt
        found = list(tensors["string_to_param"].values())[:1]
    elif "emb_params" in tensors:
        found = [tensors["emb_params"]]
    elif any(k in tensors for k in SDXL_KEYS):
        found = [tensors[k] for k in SDXL_KEYS if k in tensors]
    else:                                                         # diffusers: {token: vector}
        found = [v for v in tensors.values() if isinstance(v, torch.Tensor)]
        if len(found) != 1:
            raise CheckpointError(f"embedding {name} holds none of string_to_param, emb_params, clip_l/clip_g, "
                                  "nor one {token: vector}")
    out = {}
    for t in found:
        if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.dim() not in (1, 2) or not t.numel():
            raise CheckpointError(f"embedding {name}: its vectors are not a [n, width] float tensor")
        t = t.detach().float().reshape(-1, t.shape[-1])
        out[t.shape[-1]] = t
    return out
