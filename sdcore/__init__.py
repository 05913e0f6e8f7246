"""Our own Stable Diffusion networks, their checkpoint loading, and the generation pipeline."""
from .controlnet import ControlNet, attach_controlnet, load_controlnet
from .loader import CheckpointError
from .model import StableDiffusion, load_model
from .tokenizer import Tokenizer

__all__ = ["CheckpointError", "ControlNet", "StableDiffusion", "Tokenizer", "attach_controlnet", "load_controlnet",
           "load_model"]
