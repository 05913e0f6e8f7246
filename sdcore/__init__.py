"""Our own Stable Diffusion networks, their checkpoint loading, and the generation pipeline."""
from .loader import CheckpointError
from .model import StableDiffusion, load_model
from .tokenizer import Tokenizer

__all__ = ["CheckpointError", "StableDiffusion", "Tokenizer", "load_model"]
