"""The SD autoencoder (LDM ``AutoencoderKL``): 8× downsampling, 4 latent channels (SD3 and FLUX: 16).

``encode``/``decode`` work in the *scaled* latent space the denoiser lives in: (latent − shift_factor) ×
scale_factor (SD1/SD2: shift 0, scale 0.18215; SD3: 0.0609 and 1.5305). Parameter names are the LDM
``first_stage_model.`` names. SD3's and FLUX's VAEs have no 1×1 quant convolutions around the latent.
"""
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class VAEConfig:
    ch: int = 128
    ch_mult: tuple = (1, 2, 4, 4)
    num_res_blocks: int = 2
    z_channels: int = 4
    in_channels: int = 3
    scale_factor: float = 0.18215
    norm_groups: int = 32          # SD's; a 32-channel level would be normalised channel by channel
    shift_factor: float = 0.0      # subtracted before the scaling (SD3, FLUX)
    quant_conv: bool = True        # the 1×1 convolutions before and after the latent (not in SD3, FLUX)


# Inside shared_norm_statistics(): {layer: (mean, var) [B, groups]} each GroupNorm records on first use and
# normalises with afterwards. A context variable, so that two threads decoding at once do not mix.
_NORM_STATS: ContextVar[dict | None] = ContextVar("vae_norm_stats", default=None)


class GroupNorm(nn.GroupNorm):
    """torch's GroupNorm, whose statistics can be taken from another input (see shared_norm_statistics)."""

    def forward(self, x):
        stats = _NORM_STATS.get()
        if stats is None:
            return super().forward(x)
        groups = x.float().reshape(x.shape[0], self.num_groups, -1)
        if self not in stats:
            stats[self] = (groups.mean(-1, keepdim=True), groups.var(-1, unbiased=False, keepdim=True))
        mean, var = stats[self]
        y = ((groups - mean) * torch.rsqrt(var + self.eps)).reshape(x.shape).to(x.dtype)
        return y * self.weight[:, None, None] + self.bias[:, None, None]


@contextmanager
def shared_norm_statistics():
    """Within it, every GroupNorm of the autoencoder normalises with the mean and variance of the first
    input it saw there, instead of each input's own: run a whole (smaller) picture first, then its
    tiles, and every tile is normalised alike, as the whole picture is (sdcore.tiling)."""
    token = _NORM_STATS.set({})
    try:
        yield
    finally:
        _NORM_STATS.reset(token)


def Norm(channels, groups):
    return GroupNorm(groups, channels, eps=1e-6)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels, out_channels, groups):
        super().__init__()
        self.norm1, self.conv1 = Norm(in_channels, groups), nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2, self.conv2 = Norm(out_channels, groups), nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all pixels; q/k/v/proj stored as 1×1 convs."""

    def __init__(self, channels, groups):
        super().__init__()
        self.norm = Norm(channels, groups)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(channels, channels, 1) for _ in range(4))

    def forward(self, x):
        b, c, h, w = x.shape
        y = self.norm(x)
        # tokens made contiguous: as views of the NCHW conv outputs each token's channels lie HW apart,
        # and SDPA then runs slower (docs/BENCHMARKS.md)
        q, k, v = (f(y).flatten(2).transpose(1, 2).contiguous()[:, None] for f in (self.q, self.k, self.v))  # [B, 1, HW, C]
        y = F.scaled_dot_product_attention(q, k, v)[:, 0].transpose(1, 2).reshape(b, c, h, w)
        return x + self.proj_out(y)


class Downsample(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))   # asymmetric pad: LDM's original choice, kept for weights


class Upsample(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Mid(nn.Module):
    def __init__(self, channels, groups):
        super().__init__()
        self.block_1, self.attn_1 = ResnetBlock(channels, channels, groups), AttnBlock(channels, groups)
        self.block_2 = ResnetBlock(channels, channels, groups)

    def forward(self, x):
        return self.block_2(self.attn_1(self.block_1(x)))


class Level(nn.Module):
    """One resolution level: ``block`` ResnetBlocks then an optional ``downsample``/``upsample``."""

    def __init__(self, blocks, resample_name=None, resample=None):
        super().__init__()
        self.block = nn.ModuleList(blocks)
        self.resample_name = resample_name
        if resample_name:
            setattr(self, resample_name, resample)

    def forward(self, x):
        for block in self.block:
            x = block(x)
        return getattr(self, self.resample_name)(x) if self.resample_name else x


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        chans = [cfg.ch * m for m in cfg.ch_mult]
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        self.down = nn.ModuleList()
        c_in = cfg.ch
        for i, c in enumerate(chans):
            blocks = [ResnetBlock(c_in if j == 0 else c, c, cfg.norm_groups) for j in range(cfg.num_res_blocks)]
            last = i == len(chans) - 1
            self.down.append(Level(blocks, None if last else "downsample", None if last else Downsample(c)))
            c_in = c
        self.mid = Mid(c_in, cfg.norm_groups)
        self.norm_out, self.conv_out = Norm(c_in, cfg.norm_groups), nn.Conv2d(c_in, 2 * cfg.z_channels, 3, padding=1)

    def downsample(self, x):                           # [B, 3, H, W] -> [B, C, H/8, W/8]: convolutions and norms
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        return h

    def middle(self, h):                               # -> [B, 2z, H/8, W/8] (mean, logvar); attention over all of h
        return self.conv_out(F.silu(self.norm_out(self.mid(h))))

    def forward(self, x):
        return self.middle(self.downsample(x))


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        chans = [cfg.ch * m for m in cfg.ch_mult]
        c_in = chans[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, c_in, 3, padding=1)
        self.mid = Mid(c_in, cfg.norm_groups)
        levels = []
        for i in reversed(range(len(chans))):           # up.3 (deepest) runs first; indices follow the encoder's
            blocks = [ResnetBlock(c_in if j == 0 else chans[i], chans[i], cfg.norm_groups) for j in range(cfg.num_res_blocks + 1)]
            levels.insert(0, Level(blocks, "upsample" if i else None, Upsample(chans[i]) if i else None))
            c_in = chans[i]
        self.up = nn.ModuleList(levels)
        self.norm_out, self.conv_out = Norm(c_in, cfg.norm_groups), nn.Conv2d(c_in, cfg.in_channels, 3, padding=1)

    def middle(self, z):                               # [B, z, h, w] -> [B, C, h, w]; attention over all of z
        return self.mid(self.conv_in(z))

    def upsample(self, h):                             # -> [B, 3, 8h, 8w]: convolutions and norms
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))

    def forward(self, z):
        return self.upsample(self.middle(z))


class AutoencoderKL(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder, self.decoder = Encoder(cfg), Decoder(cfg)
        if cfg.quant_conv:
            self.quant_conv = nn.Conv2d(2 * cfg.z_channels, 2 * cfg.z_channels, 1)
            self.post_quant_conv = nn.Conv2d(cfg.z_channels, cfg.z_channels, 1)
        else:
            self.quant_conv = self.post_quant_conv = nn.Identity()

    def encode(self, img: torch.Tensor) -> torch.Tensor:
        """img [B, 3, H, W] in [-1, 1] -> scaled latent (the posterior mean) [B, z, H/8, W/8]."""
        return self.encode_middle(self.encoder.downsample(img))

    def encode_middle(self, h: torch.Tensor) -> torch.Tensor:
        """The encoder's end, at the latent's resolution: its features h -> scaled latent."""
        mean, _logvar = self.quant_conv(self.encoder.middle(h)).chunk(2, dim=1)
        return (mean - self.cfg.shift_factor) * self.cfg.scale_factor

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """scaled latent -> image in [-1, 1] (not clamped)."""
        return self.decoder.upsample(self.decode_middle(latent))

    def decode_middle(self, latent: torch.Tensor) -> torch.Tensor:
        """The decoder's start, at the latent's resolution: scaled latent -> the features it upsamples."""
        return self.decoder.middle(self.post_quant_conv(latent / self.cfg.scale_factor + self.cfg.shift_factor))
