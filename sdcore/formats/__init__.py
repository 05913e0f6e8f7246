"""Checkpoint formats: every way a network's weights are stored on disk, in one place.

    files.py        reading tensors lazily (safetensors, pickles, diffusers components) and our metadata
    layouts.py      name maps ours <-> diffusers / Hugging Face, one table per network, read both ways
    infer.py        network configurations from tensor shapes and diffusers config.json files
    checkpoints.py  what a file or folder is (or why it is refused), as networks' tensors + configs
    build.py        a network from its tensors, cast per tensor (through sdcore.weights_cache)
    write.py        writing our layouts (the default model, training, tests, benchmarks)

This package imports the network modules for their configurations and classes; the modules that
load models (sdcore.model, sdcore.controlnet) import it, never the other way round.
"""
from .checkpoints import ModelParts, Part, read_controlnet, read_model, read_vae
from .files import CheckpointError

__all__ = ["CheckpointError", "ModelParts", "Part", "read_controlnet", "read_model", "read_vae"]
