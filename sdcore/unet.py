"""The Stable Diffusion UNet (LDM ``UNetModel``), configured for SD1.x / SD2.x (and SDXL's shape).

Parameter names are the LDM single-file names (``input_blocks.N.M...``), so the checkpoints people
download load without renaming. Shapes in comments use C channels, H×W latent, T = 77 tokens.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from . import cpu_attention


@dataclass
class UNetConfig:
    in_channels: int = 4                 # 9 for inpainting UNets (latent + mask + masked-image latent)
    out_channels: int = 4
    model_channels: int = 320
    channel_mult: tuple = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attention_levels: tuple = (0, 1, 2)
    transformer_depth: tuple = (1, 1, 1, 0)   # per level (0 where the level has no attention)
    transformer_depth_middle: int = 1         # 0: the middle block is one ResBlock (SSD-1B, Vega)
    # per output block (deepest first) where they differ from their level's transformer_depth (pruned SDXLs)
    transformer_depth_output: tuple | None = None
    num_heads: int | None = 8                 # SD1: fixed head count ...
    head_dim: int | None = None               # ... SD2/SDXL: fixed head dim (64)
    context_dim: int = 768
    use_linear_proj: bool = False             # SD2/SDXL: Linear proj_in/proj_out instead of 1×1 conv
    adm_in_channels: int | None = None        # SDXL: size/crop vector y

    def heads_for(self, channels: int) -> int:
        return self.num_heads if self.num_heads else channels // self.head_dim

    def output_depth(self, block: int, level: int) -> int:
        """Transformer blocks in output block ``block`` (of ``level``)."""
        return self.transformer_depth_output[block] if self.transformer_depth_output else self.transformer_depth[level]

    def head_dims(self) -> set[int]:
        """The attention head dimensions of its transformer levels and middle block."""
        levels = (*self.attention_levels, *((len(self.channel_mult) - 1,) if self.transformer_depth_middle else ()))
        channels = [self.model_channels * self.channel_mult[i] for i in levels]
        return {ch // heads for ch in channels if (heads := self.heads_for(ch))}


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of float timesteps t [B] -> [B, dim], ordered [cos, sin]."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def per_conditioning(x: torch.Tensor, batch: int) -> torch.Tensor:
    """x [B, ...] -> [batch, ...]: rows shared by the batch // B conditionings of each latent, repeated
    in the order classifier-free guidance batches them ([uncond, cond]); x itself when already full."""
    return x if x.shape[0] >= batch else x.repeat(batch // x.shape[0], *(1,) * (x.ndim - 1))


def GroupNorm(channels, eps=1e-5):
    return nn.GroupNorm(32, channels, eps=eps)


class ResBlock(nn.Module):
    def __init__(self, channels, emb_channels, out_channels):
        super().__init__()
        self.in_layers = nn.Sequential(GroupNorm(channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(GroupNorm(out_channels), nn.SiLU(), nn.Dropout(0.0),
                                        nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip_connection = nn.Conv2d(channels, out_channels, 1) if channels != out_channels else nn.Identity()

    def forward(self, x, emb):
        h = self.in_layers(x)
        # the timestep enters as a per-channel shift; x may hold only the first rows of emb's batch
        # (a latent shared by its conditionings, see UNetEncoder.embed_batch), whose embeddings are those rows
        h = h + self.emb_layers(emb[:x.shape[0]])[:, :, None, None]
        return self.skip_connection(x) + self.out_layers(h)


class Attention(nn.Module):
    """Multi-head attention; cross-attention when ``context_dim`` is given (keys/values from the text)."""

    def __init__(self, dim, heads, context_dim=None):
        super().__init__()
        self.heads = heads
        context_dim = context_dim or dim
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(context_dim, dim, bias=False)
        self.to_v = nn.Linear(context_dim, dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(dim, dim), nn.Dropout(0.0))

    def forward(self, x, context=None):                     # x [B, N, C], context [B, T, Cc]
        context = x if context is None else context
        b, n, c = x.shape
        # heads made contiguous (a small copy): as strided views of [B, N, C] the CPU flash kernel would read
        # each head's rows C apart, which is slower (docs/BENCHMARKS.md)
        q, k, v = (rearrange(t, "b n (heads d) -> b heads n d", heads=self.heads).contiguous()
                   for t in (self.to_q(x), self.to_k(context), self.to_v(context)))
        h = cpu_attention.attention(q, k, v)               # [B, heads, N, C/heads]
        return self.to_out(rearrange(h, "b heads n d -> b n (heads d)"))


class GEGLU(nn.Module):
    def __init__(self, dim, inner):
        super().__init__()
        self.proj = nn.Linear(dim, inner * 2)

    def forward(self, x):
        a, gate = self.proj(x).chunk(2, dim=-1)
        return a * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, 4 * dim), nn.Dropout(0.0), nn.Linear(4 * dim, dim))

    def forward(self, x):
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    def __init__(self, dim, heads, context_dim):
        super().__init__()
        self.attn1, self.norm1 = Attention(dim, heads), nn.LayerNorm(dim)
        self.attn2, self.norm2 = Attention(dim, heads, context_dim), nn.LayerNorm(dim)
        self.ff, self.norm3 = FeedForward(dim), nn.LayerNorm(dim)

    def forward(self, x, context):
        x = x + self.attn1(self.norm1(x))
        x = per_conditioning(x, context.shape[0])       # the text enters here: rows stop being shared
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """Image features [B, C, H, W] attend to themselves and to the text, residual around the whole."""

    def __init__(self, channels, heads, depth, context_dim, linear_proj):
        super().__init__()
        self.linear_proj = linear_proj
        self.norm = GroupNorm(channels, eps=1e-6)
        proj = (lambda: nn.Linear(channels, channels)) if linear_proj else (lambda: nn.Conv2d(channels, channels, 1))
        self.proj_in = proj()
        self.transformer_blocks = nn.ModuleList(BasicTransformerBlock(channels, heads, context_dim) for _ in range(depth))
        self.proj_out = proj()

    def forward(self, x, context):
        c, h, w = x.shape[1:]
        y = self.norm(x)
        if not self.linear_proj:
            y = self.proj_in(y)
        y = y.flatten(2).transpose(1, 2)                     # [B, H*W, C]
        # tokens contiguous (proj_in's Linear output already is): left as a transposed view, the layout
        # would follow the residual adds through every block and each LayerNorm would copy its input first
        y = self.proj_in(y) if self.linear_proj else y.contiguous()
        for block in self.transformer_blocks:
            y = block(y, context)
        if self.linear_proj:
            y = self.proj_out(y)
        y = y.transpose(1, 2).reshape(-1, c, h, w).contiguous()  # back to NCHW, not a channels-last view
        if not self.linear_proj:
            y = self.proj_out(y)
        return per_conditioning(x, y.shape[0]) + y


class Downsample(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x):
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x, size=None):
        # Upsampling to the size of the skip connection it meets (not blindly ×2) is what lets latent
        # sizes that are not multiples of 8 (e.g. 520 px -> 65) round-trip through the UNet.
        return self.conv(F.interpolate(x, size=size, scale_factor=None if size else 2.0, mode="nearest"))


class TimestepEmbedSequential(nn.Sequential):
    """Runs its layers in order, handing each the inputs it takes (emb, context, output size)."""

    def forward(self, x, emb, context, size=None):
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            elif isinstance(layer, Upsample):
                x = layer(x, size)
            else:
                x = layer(x)
        return x


class UNetEncoder(nn.Module):
    """Time embedding, input blocks and middle block: the half of the UNet that ControlNet copies."""

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        mc, emb_ch = cfg.model_channels, cfg.model_channels * 4
        self.time_embed = nn.Sequential(nn.Linear(mc, emb_ch), nn.SiLU(), nn.Linear(emb_ch, emb_ch))
        if cfg.adm_in_channels:
            self.label_emb = nn.Sequential(nn.Sequential(nn.Linear(cfg.adm_in_channels, emb_ch), nn.SiLU(),
                                                         nn.Linear(emb_ch, emb_ch)))

        def transformer(ch, depth):
            return SpatialTransformer(ch, cfg.heads_for(ch), depth, cfg.context_dim, cfg.use_linear_proj)

        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(nn.Conv2d(cfg.in_channels, mc, 3, padding=1))])
        self.skip_channels = [mc]               # channels of every stored skip connection, in order
        ch = mc
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                layers = [ResBlock(ch, emb_ch, mult * mc)]
                ch = mult * mc
                if level in cfg.attention_levels:
                    layers.append(transformer(ch, cfg.transformer_depth[level]))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                self.skip_channels.append(ch)
            if level != len(cfg.channel_mult) - 1:
                self.input_blocks.append(TimestepEmbedSequential(Downsample(ch)))
                self.skip_channels.append(ch)
        middle = [ResBlock(ch, emb_ch, ch)]
        if cfg.transformer_depth_middle:
            middle += [transformer(ch, cfg.transformer_depth_middle), ResBlock(ch, emb_ch, ch)]
        self.middle_block = TimestepEmbedSequential(*middle)
        self.cfg, self.out_ch = cfg, ch

    def embed(self, t, y=None):
        emb = self.time_embed(timestep_embedding(t, self.cfg.model_channels).to(self.time_embed[0].weight.dtype))
        if y is not None:
            emb = emb + self.label_emb(y)
        return emb

    def embed_batch(self, x, t, context, y=None):
        """-> (x, emb [batch, 4·C]) for a call on x [B, ...] against a context [batch, T, Cc].

        With classifier-free guidance the batch holds k = batch // B conditionings of the same latents
        ([uncond, cond], as the denoiser orders them), and x may be given once, [B, ...]. Everything
        before the first cross-attention is then the same for all k, so it runs once: the rows are
        repeated where the text enters (``per_conditioning``), not before. Not with a label vector y
        (SDXL): it differs per conditioning and enters through the time embedding."""
        batch = max(x.shape[0], context.shape[0])
        if batch % x.shape[0] or batch % context.shape[0]:
            raise ValueError(f"latents [{x.shape[0]}] and conditionings [{context.shape[0]}]: one must be a "
                             f"multiple of the other")
        if y is not None:
            x = per_conditioning(x, batch)
        return x, self.embed(t.expand(batch), y)

    def encode(self, x, emb, context, hint=None):
        """-> (skips: list of every input block's output, middle block output), all [batch, ...]."""
        skips, h = [], x
        for i, block in enumerate(self.input_blocks):
            h = block(h, emb, context)
            if i == 0 and hint is not None:        # ControlNet adds its embedded hint after conv_in
                h = h + hint
            skips.append(h)
        h = self.middle_block(h, emb, context)
        return [per_conditioning(s, emb.shape[0]) for s in skips], per_conditioning(h, emb.shape[0])


class UNet(UNetEncoder):
    def __init__(self, cfg: UNetConfig):
        super().__init__(cfg)
        mc, emb_ch, ch = cfg.model_channels, cfg.model_channels * 4, self.out_ch
        skip_channels = list(self.skip_channels)
        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                layers = [ResBlock(ch + skip_channels.pop(), emb_ch, mc * mult)]
                ch = mc * mult
                if level in cfg.attention_levels:
                    layers.append(SpatialTransformer(ch, cfg.heads_for(ch), cfg.output_depth(len(self.output_blocks), level),
                                                     cfg.context_dim, cfg.use_linear_proj))
                if level and i == cfg.num_res_blocks:
                    layers.append(Upsample(ch))
                self.output_blocks.append(TimestepEmbedSequential(*layers))
        self.out = nn.Sequential(GroupNorm(ch), nn.SiLU(), nn.Conv2d(ch, cfg.out_channels, 3, padding=1))

    def forward(self, x, t, context, y=None, control=None):
        """x [B, in_ch, H, W], t float [B], context [B, T, context_dim] -> [B, out_ch, H, W]; x may be
        [B/k, ...] when the k conditionings of classifier-free guidance share the latents (embed_batch).

        ``control``: ControlNet residuals (one per skip connection, then the middle block's), already
        scaled by the control strength; added to the skips and the middle output.
        """
        x, emb = self.embed_batch(x, t, context, y)
        skips, h = self.encode(x, emb, context)
        if control is not None:
            *down, mid = control
            skips = [s + r for s, r in zip(skips, down)]
            h = h + mid
        for block in self.output_blocks:
            h = torch.cat([h, skips.pop()], dim=1)
            h = block(h, emb, context, size=skips[-1].shape[-2:] if skips else None)
        return self.out(h)
