"""Our own Stable Diffusion networks, their checkpoint formats (sdcore.formats), and the generation pipeline."""
from .controlnet import ControlNet, attach_controlnet, load_controlnet
from .formats import CheckpointError
from .model import StableDiffusion, load_model
from .tokenizer import Tokenizer

__all__ = ["CheckpointError", "ControlNet", "StableDiffusion", "Tokenizer", "attach_controlnet", "load_controlnet",
           "load_model"]
