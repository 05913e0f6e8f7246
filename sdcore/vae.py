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


# Inside shared_norm_statistics(): {layer: (mean, var) [B, groups, 1]} each GroupNorm records on first use
# and normalises with afterwards. A context variable, so that two threads decoding at once do not mix.
_NORM_STATS: ContextVar[dict | None] = ContextVar("vae_norm_stats", default=None)

# Feature maps larger than this go through the norm, SiLU and convolution of a full-resolution layer in
# bands of rows (see in_bands): at 1024² a 256-channel float32 map is 1 GiB, and holding its normalised
# copy, its upsampled copy and the reordered copy the convolution kernel makes would cost as much again
# each. Bands of this size also ran fastest on the CPU (docs/BENCHMARKS.md, "Whole, at once and tiled").
BAND_BYTES = 16 << 20


class GroupNorm(nn.GroupNorm):
    """torch's GroupNorm, whose statistics can be taken once and applied to parts of the picture: to its
    bands (in_bands) or to tiles normalised alike (shared_norm_statistics)."""

    def forward(self, x):
        if _NORM_STATS.get() is None:
            return super().forward(x)
        return self.normalize(x, *self.statistics(x))

    def statistics(self, x):
        """(mean, biased variance) [B, groups, 1] in float32; inside shared_norm_statistics(), those of
        the first input this layer saw there."""
        shared = _NORM_STATS.get()
        if shared is not None and self in shared:
            return shared[self]
        groups = x.reshape(x.shape[0], self.num_groups, -1)
        # group by group, so that a half-precision map is never copied whole into float32
        var, mean = (torch.stack(t, 1) for t in zip(*(
            torch.var_mean(groups[:, g].float(), -1, correction=0, keepdim=True) for g in range(self.num_groups))))
        if shared is not None:
            shared[self] = (mean, var)
        return mean, var

    def normalize(self, x, mean, var):
        """x [B, C, h, w] (the whole picture or rows of it) normalised with the given statistics, in float32
        per channel: x·a + b, a = weight/√(var + eps), b = bias − mean·a."""
        c = x.shape[1]
        scale = torch.rsqrt(var + self.eps).repeat_interleave(c // self.num_groups, 1)       # [B, C, 1]
        scale = scale * self.weight.float()[:, None]
        shift = self.bias.float()[:, None] - mean.repeat_interleave(c // self.num_groups, 1) * scale
        return torch.addcmul(shift[..., None], x.float(), scale[..., None]).to(x.dtype)


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


def in_bands(conv: nn.Conv2d, rows, height: int, band: int) -> torch.Tensor:
    """conv (stride 1, zero padding keeping the size) over a picture of ``height`` rows that is never
    held whole: ``rows(lo, hi)`` makes its rows lo..hi-1, and the output is computed ``band`` rows at a
    time, each from its rows plus the padding's worth above and below (zeros past the picture's edge).
    Every output pixel sees exactly the inputs it sees in one whole convolution."""
    pad = conv.padding[0]
    out = None
    for r0 in range(0, height, band):
        r1 = min(r0 + band, height)
        lo, hi = max(r0 - pad, 0), min(r1 + pad, height)
        part = rows(lo, hi)
        if (lo, hi) != (r0 - pad, r1 + pad):                  # at the top or bottom edge
            part = F.pad(part, (0, 0, lo - (r0 - pad), (r1 + pad) - hi))
        y = F.conv2d(part, conv.weight, conv.bias, padding=(0, conv.padding[1]))
        if out is None:
            out = y.new_empty(y.shape[0], y.shape[1], height, y.shape[3])
        out[:, :, r0:r1] = y
    return out


def band_rows(x: torch.Tensor, scale: int = 1) -> int | None:
    """Rows per band for a full-resolution layer over x (upsampled ``scale`` times), or None where x
    goes whole: small enough, or while training (the bands are written into a tensor in place)."""
    row = x.shape[0] * x.shape[1] * x.shape[3] * scale * x.element_size()
    if torch.is_grad_enabled() or x.numel() * x.element_size() * scale * scale <= BAND_BYTES:
        return None
    return max(1, BAND_BYTES // row)


def norm_silu_conv(norm: GroupNorm, conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """conv(silu(norm(x))), a large x in bands: only a band of the normalised map exists at a time."""
    band = band_rows(x)
    if band is None:
        return conv(F.silu(norm(x)))
    mean, var = norm.statistics(x)
    return in_bands(conv, lambda lo, hi: F.silu(norm.normalize(x[:, :, lo:hi], mean, var), inplace=True), x.shape[2], band)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels, out_channels, groups):
        super().__init__()
        self.norm1, self.conv1 = Norm(in_channels, groups), nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2, self.conv2 = Norm(out_channels, groups), nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x):
        h = norm_silu_conv(self.norm1, self.conv1, x)
        h = norm_silu_conv(self.norm2, self.conv2, h)
        return h.add_(self.shortcut(x) if hasattr(self, "nin_shortcut") else x)

    def shortcut(self, x):                             # the 1×1 convolution to the new width, in bands if large
        band = band_rows(x)
        if band is None:
            return self.nin_shortcut(x)
        return in_bands(self.nin_shortcut, lambda lo, hi: x[:, :, lo:hi], x.shape[2], band)


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
        band = band_rows(x, scale=2)
        if band is None:
            return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))

        def rows(lo, hi):                              # upsampled row j is input row j // 2
            part = F.interpolate(x[:, :, lo // 2:(hi + 1) // 2], scale_factor=2.0, mode="nearest")
            return part[:, :, lo % 2:lo % 2 + hi - lo]
        return in_bands(self.conv, rows, 2 * x.shape[2], band)


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


def through(layers, h):
    """h through the layers one after another. Layer by layer, and h passed in rather than made in the
    call: a level called with h, or a call given the first layer's output, would keep that map alive
    until the end, and at full resolution it is a GiB."""
    for layer in layers:
        h = layer(h)
    return h


def layers_of(levels):
    """The levels' ResnetBlocks and resamplings, in order."""
    for level in levels:
        yield from level.block
        if level.resample_name:
            yield getattr(level, level.resample_name)


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
        return through([self.conv_in, *layers_of(self.down)], x)

    def middle(self, h):                               # -> [B, 2z, H/8, W/8] (mean, logvar); attention over all of h
        return norm_silu_conv(self.norm_out, self.conv_out, self.mid(h))

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
        return norm_silu_conv(self.norm_out, self.conv_out, through(layers_of(reversed(self.up)), h))

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
