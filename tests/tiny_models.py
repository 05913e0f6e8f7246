"""Small random networks the core tests share (each full-width model lives in its own test): an SD2-shaped
configuration (OpenCLIP text tower, head dim 64, linear projections), an SDXL-shaped one (no attention at
the first level, deeper transformers further down, two text encoders whose hidden states are concatenated,
the pooled output and six size numbers in the label vector), an SDXL-refiner-shaped one (four levels, bigG
alone, five numbers with the aesthetic score) and a ControlNet with deterministic weights."""
import torch

from sdcore.clip import TextConfig
from sdcore.controlnet import ControlNet
from sdcore.formats.write import random_init_
from sdcore.unet import UNetConfig
from sdcore.vae import VAEConfig

SD2_UNET = UNetConfig(model_channels=64, channel_mult=(1, 2, 2), num_res_blocks=2, attention_levels=(0, 1),
                      transformer_depth=(1, 2, 0), transformer_depth_middle=1, num_heads=None, head_dim=64,
                      context_dim=64, use_linear_proj=True)
SD2_VAE = VAEConfig(ch=32, ch_mult=(1, 2, 2), num_res_blocks=2)
SD2_TEXT = TextConfig(width=64, layers=3, heads=1, act="gelu", output_layer=-2, pad_id=0)


def random_controlnet(cfg: UNetConfig, seed: int = 5) -> ControlNet:
    torch.manual_seed(seed)
    return random_init_(ControlNet(cfg), seed)


SDXL_TEXT = TextConfig(width=64, layers=3, heads=1, act="quick_gelu", output_layer=-2, final_norm=False)
SDXL_TEXT_2 = TextConfig(width=128, layers=3, heads=2, act="gelu", output_layer=-2, final_norm=False, pad_id=0,
                         projection_dim=128)
SDXL_UNET = UNetConfig(model_channels=64, channel_mult=(1, 2, 2), num_res_blocks=2, attention_levels=(1, 2),
                       transformer_depth=(0, 1, 2), transformer_depth_middle=2, num_heads=None, head_dim=64,
                       context_dim=64 + 128, use_linear_proj=True, adm_in_channels=128 + 6 * 256)
# The refiner: bigG alone (context = its width), the pooled output and five numbers (size, crop, aesthetic score)
SDXL_REFINER_UNET = UNetConfig(model_channels=64, channel_mult=(1, 2, 2, 2), num_res_blocks=2, attention_levels=(1, 2),
                               transformer_depth=(0, 2, 2, 0), transformer_depth_middle=2, num_heads=None, head_dim=64,
                               context_dim=128, use_linear_proj=True, adm_in_channels=128 + 5 * 256)
SDXL_VAE = VAEConfig(ch=32, ch_mult=(1, 1, 2, 2), num_res_blocks=1, scale_factor=0.13025)


def random_mlp(dim: int, hidden: int, seed: int = 0):
    """The float64 weights (w1 [dim, hidden], b1, u [hidden], w2 [hidden, dim]) of the small random nonlinear
    networks the sampler tests use as denoisers: tanh(x·w1 + b1 + σ·u)·w2, each test wrapping it its own way."""
    g = torch.Generator().manual_seed(seed)
    w1 = torch.randn(dim, hidden, generator=g, dtype=torch.float64) / dim ** 0.5
    b1 = torch.randn(hidden, generator=g, dtype=torch.float64)
    u = torch.randn(hidden, generator=g, dtype=torch.float64)
    w2 = torch.randn(hidden, dim, generator=g, dtype=torch.float64) / hidden ** 0.5
    return w1, b1, u, w2
