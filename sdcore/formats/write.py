"""Writing checkpoints in the layouts users download (used by the default-model generator, the
training recipe, the benchmarks and the tests that build checkpoints of their own). Every file
records its full configuration in the ``sdcore.config`` metadata, so loading it infers nothing."""
import math

import torch
from safetensors.torch import save_file

from ..clip import TextEncoder
from ..unet import UNet
from ..vae import AutoencoderKL
from .files import config_to_metadata
from .infer import REFINER
from .layouts import text_to_hf


def ldm_state_dict(unet: UNet, vae: AutoencoderKL, text: TextEncoder, family="sd1", dtype=None,
                   text_2: TextEncoder | None = None) -> dict[str, torch.Tensor]:
    """The single-file LDM layout (what ``v1-5-pruned-emaonly.safetensors`` holds; SDXL: what
    ``sd_xl_base_1.0.safetensors`` holds, ``text_2`` being its OpenCLIP bigG; the refiner: ``text`` is its bigG)."""
    sd = {f"model.diffusion_model.{k}": v for k, v in unet.state_dict().items()}
    sd |= {f"first_stage_model.{k}": v for k, v in vae.state_dict().items()}
    if family == "sdxl":
        sd |= {f"conditioner.embedders.0.transformer.text_model.{k}": v for k, v in text_to_hf(text).items()}
        sd["conditioner.embedders.0.transformer.text_model.embeddings.position_ids"] = \
            torch.arange(text.cfg.context_length)[None]
        sd |= {f"conditioner.embedders.1.model.{k}": v for k, v in text_2.state_dict().items()}
    elif family == REFINER:
        sd |= {f"conditioner.embedders.0.model.{k}": v for k, v in text.state_dict().items()}
    elif family == "sd1":
        sd |= {f"cond_stage_model.transformer.text_model.{k}": v for k, v in text_to_hf(text).items()}
        sd["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(text.cfg.context_length)[None]
    else:
        sd |= {f"cond_stage_model.model.{k}": v for k, v in text.state_dict().items()}
    return {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).contiguous() for k, v in sd.items()}


def save_single_file(path, unet, vae, text, family="sd1", dtype=None, prediction="eps", native_size=None,
                     extra_metadata: dict | None = None, text_2=None, with_config=True):
    """``with_config=False``: no ``sdcore.config`` metadata, as in the files people download (loading then
    infers every configuration from the tensors)."""
    meta = config_to_metadata(family=family, prediction=prediction, unet=unet.cfg, vae=vae.cfg, text=text.cfg,
                              **({"text_2": text_2.cfg} if text_2 is not None else {}),
                              **({"native_size": native_size} if native_size else {})) if with_config else {}
    save_file(ldm_state_dict(unet, vae, text, family, dtype, text_2), str(path), metadata=meta | (extra_metadata or {}))


def save_controlnet(path, cn, dtype=None, prefix="control_model.", with_config=True):
    """A ``sdcore.controlnet.ControlNet`` in the single-file layout of lllyasviel's releases
    (``control_model.`` prefix, or bare with prefix="")."""
    sd = {prefix + k: (v.to(dtype) if dtype is not None else v).contiguous() for k, v in cn.state_dict().items()}
    save_file(sd, str(path), metadata=config_to_metadata(controlnet=cn.cfg) if with_config else None)


@torch.no_grad()
def random_init_(module: torch.nn.Module, seed: int, gain: float = 1.0) -> torch.nn.Module:
    """Deterministic random weights that keep activations O(1) and make every parameter matter:
    matrices ~ N(0, gain²/fan_in), norm scales 1 ± 0.1, biases ± 0.05 (so parity tests see them)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in sorted(module.named_parameters()):
        if p.ndim >= 2:
            fan_in = p[0].numel() if "embedding" not in name else 1
            p.copy_(torch.randn(p.shape, generator=g) * gain / math.sqrt(fan_in))
        elif name.endswith("weight"):
            p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
        else:
            p.copy_(0.05 * torch.randn(p.shape, generator=g))
    return module
