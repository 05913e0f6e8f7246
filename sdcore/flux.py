"""FLUX.1: Black Forest Labs' rectified-flow transformer (dev, schnell and their fine-tunes).

Like SD3's MMDiT it keeps the image's and the text's tokens in two streams that meet in one attention, but
positions enter every attention as rotations (RoPE) rather than once as added vectors, and after the
two-stream blocks the streams are merged into one sequence run through lighter single-stream blocks:

    latent [B, 16, H, W] packed by the pipeline into 2×2 patches: img [B, HW/4, 64] -> linear -> [B, N, D]
    text: T5-XXL hidden states [B, T, 4096] -> linear -> txt [B, T, D]
    vec = MLP(sinusoid(1000·t)) + MLP(pooled CLIP-L [B, 768]) (+ MLP(sinusoid(1000·guidance)) for dev)
    positions: every token has 3 coordinates (0, row, column for the image; zeros for the text); each head's
        128 channels are rotated in pairs by angles pos_a·θ_k, the channels split 16/56/56 over the 3 axes
    double blocks (19): per stream (shift, scale, gate) ×2 = Linear(SiLU(vec)); q, k, v of both streams (q, k
        RMS-normalised per head), rotated, one attention over [txt; img]; each stream takes its part through
        its own projection and MLP (GELU, tanh approximation), gated
    single blocks (38), on [txt; img]: one (shift, scale, gate); a single linear gives q, k, v and the MLP's
        input side by side; attention and GELU(MLP) are concatenated and projected back by one linear, gated
    final layer on the image tokens: LayerNorm·(1 + scale) + shift -> linear -> [B, N, 64] (the velocity's patches)

Parameter names are those of Black Forest Labs' files (``double_blocks.N.img_attn.qkv`` ...); diffusers'
``FluxTransformer2DModel`` names are converted by the loader (sdcore.formats.layouts).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .mmdit import RMSNorm, modulate
from .unet import timestep_embedding

FREQUENCY_DIM = 256
TIME_FACTOR = 1000.0        # t ∈ [0, 1] and the guidance scale are embedded as 1000·t
PATCH = 2


@dataclass
class FluxConfig:
    in_channels: int = 64            # 16 latent channels × a 2×2 patch
    width: int = 3072
    heads: int = 24
    depth: int = 19                  # double-stream blocks
    depth_single: int = 38
    context_dim: int = 4096          # T5-XXL
    pooled_dim: int = 768            # CLIP-L's pooled output
    axes_dim: tuple = field(default_factory=lambda: (16, 56, 56))      # RoPE channels per position axis
    theta: int = 10000
    guidance_embed: bool = True      # dev: the guidance scale is an input; schnell: not
    mlp_ratio: float = 4.0

    @property
    def head_dim(self) -> int:
        return self.width // self.heads

    @property
    def patch_size(self) -> int:              # the pipeline packs 2×2 latent pixels into one token
        return PATCH

    @property
    def out_channels(self) -> int:            # the latent's channels: a token holds a 2×2 patch of them
        return self.in_channels // PATCH ** 2

    @property
    def mlp_width(self) -> int:
        return int(self.width * self.mlp_ratio)


def rope(ids: torch.Tensor, axes_dim, theta: int) -> torch.Tensor:
    """ids [B, L, axes] -> rotations [B, 1, L, head_dim/2, 2, 2]: for each pair of channels k of axis a the 2×2
    matrix of angle ids[a]·θ^(−2k/dim_a), computed in float64."""
    out = []
    for a, dim in enumerate(axes_dim):
        omega = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64, device=ids.device) / dim)
        angle = ids[..., a].double()[..., None] * omega                         # [B, L, dim/2]
        cos, sin = torch.cos(angle), torch.sin(angle)
        out.append(torch.stack([cos, -sin, sin, cos], -1).view(*angle.shape, 2, 2))
    return torch.cat(out, dim=-3)[:, None].float()


def apply_rope(x: torch.Tensor, rot: torch.Tensor) -> torch.Tensor:
    """x [B, heads, L, head_dim]: channels (2k, 2k + 1) rotated by rot[..., k, :, :]."""
    pairs = x.float().reshape(*x.shape[:-1], -1, 1, 2)
    return (rot[..., 0] * pairs[..., 0] + rot[..., 1] * pairs[..., 1]).reshape(x.shape).to(x.dtype)


def attention(q, k, v, rot) -> torch.Tensor:
    q, k = apply_rope(q, rot), apply_rope(k, rot)
    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)


def split_heads(qkv: torch.Tensor, heads: int):
    """[B, L, 3·D] -> q, k, v [B, heads, L, head_dim]."""
    b, n, _ = qkv.shape
    return qkv.view(b, n, 3, heads, -1).permute(2, 0, 3, 1, 4)


class QKNorm(nn.Module):
    def __init__(self, head_dim: int):
        super().__init__()
        self.query_norm, self.key_norm = RMSNorm(head_dim), RMSNorm(head_dim)

    def forward(self, q, k):
        return self.query_norm(q), self.key_norm(k)


# BFL's RMSNorm gain is called "scale": our RMSNorm's "weight" is renamed on load and save
def _scale_names(module: nn.Module) -> None:
    def load(state, prefix, *args):
        for name in ("query_norm", "key_norm"):
            key = f"{prefix}{name}.scale"
            if key in state:
                state[f"{prefix}{name}.weight"] = state.pop(key)

    def save(module, state, prefix, local_metadata):
        for name in ("query_norm", "key_norm"):
            state[f"{prefix}{name}.scale"] = state.pop(f"{prefix}{name}.weight")
    module._register_load_state_dict_pre_hook(load)
    module._register_state_dict_hook(save)


class SelfAttention(nn.Module):
    def __init__(self, cfg: FluxConfig):
        super().__init__()
        self.qkv = nn.Linear(cfg.width, 3 * cfg.width)
        self.norm = QKNorm(cfg.head_dim)
        _scale_names(self.norm)
        self.proj = nn.Linear(cfg.width, cfg.width)


class Modulation(nn.Module):
    def __init__(self, width: int, chunks: int):
        super().__init__()
        self.lin, self.chunks = nn.Linear(width, chunks * width), chunks

    def forward(self, vec):
        return self.lin(F.silu(vec)).chunk(self.chunks, dim=1)


def mlp(cfg: FluxConfig) -> nn.Sequential:
    return nn.Sequential(nn.Linear(cfg.width, cfg.mlp_width), nn.GELU(approximate="tanh"),
                         nn.Linear(cfg.mlp_width, cfg.width))


class DoubleStreamBlock(nn.Module):
    def __init__(self, cfg: FluxConfig):
        super().__init__()
        self.heads = cfg.heads
        for s in ("img", "txt"):
            setattr(self, f"{s}_mod", Modulation(cfg.width, 6))
            setattr(self, f"{s}_norm1", nn.LayerNorm(cfg.width, elementwise_affine=False, eps=1e-6))
            setattr(self, f"{s}_attn", SelfAttention(cfg))
            setattr(self, f"{s}_norm2", nn.LayerNorm(cfg.width, elementwise_affine=False, eps=1e-6))
            setattr(self, f"{s}_mlp", mlp(cfg))

    def _qkv(self, s: str, x, mods):
        q, k, v = split_heads(getattr(self, f"{s}_attn").qkv(modulate(getattr(self, f"{s}_norm1")(x), *mods[:2])),
                              self.heads)
        q, k = getattr(self, f"{s}_attn").norm(q, k)
        return q, k, v

    def _rest(self, s: str, x, attn_out, mods):
        shift1, scale1, gate1, shift2, scale2, gate2 = mods
        x = x + gate1[:, None] * getattr(self, f"{s}_attn").proj(attn_out)
        return x + gate2[:, None] * getattr(self, f"{s}_mlp")(modulate(getattr(self, f"{s}_norm2")(x), shift2, scale2))

    def forward(self, img, txt, vec, rot):
        img_mods, txt_mods = self.img_mod(vec), self.txt_mod(vec)
        (qi, ki, vi), (qt, kt, vt) = self._qkv("img", img, img_mods), self._qkv("txt", txt, txt_mods)
        out = attention(torch.cat([qt, qi], 2), torch.cat([kt, ki], 2), torch.cat([vt, vi], 2), rot)
        n = txt.shape[1]
        return self._rest("img", img, out[:, n:], img_mods), self._rest("txt", txt, out[:, :n], txt_mods)


class SingleStreamBlock(nn.Module):
    def __init__(self, cfg: FluxConfig):
        super().__init__()
        self.heads, self.width, self.mlp_width = cfg.heads, cfg.width, cfg.mlp_width
        self.linear1 = nn.Linear(cfg.width, 3 * cfg.width + cfg.mlp_width)
        self.linear2 = nn.Linear(cfg.width + cfg.mlp_width, cfg.width)
        self.norm = QKNorm(cfg.head_dim)
        _scale_names(self.norm)
        self.pre_norm = nn.LayerNorm(cfg.width, elementwise_affine=False, eps=1e-6)
        self.modulation = Modulation(cfg.width, 3)

    def forward(self, x, vec, rot):
        shift, scale, gate = self.modulation(vec)
        qkv, hidden = self.linear1(modulate(self.pre_norm(x), shift, scale)).split([3 * self.width, self.mlp_width], -1)
        q, k, v = split_heads(qkv, self.heads)
        q, k = self.norm(q, k)
        out = torch.cat([attention(q, k, v, rot), F.gelu(hidden, approximate="tanh")], dim=-1)
        return x + gate[:, None] * self.linear2(out)


class MLPEmbedder(nn.Module):
    def __init__(self, n_in: int, width: int):
        super().__init__()
        self.in_layer, self.out_layer = nn.Linear(n_in, width), nn.Linear(width, width)

    def forward(self, x):
        return self.out_layer(F.silu(self.in_layer(x)))


class LastLayer(nn.Module):
    def __init__(self, cfg: FluxConfig):
        super().__init__()
        self.norm_final = nn.LayerNorm(cfg.width, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(cfg.width, cfg.in_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(cfg.width, 2 * cfg.width))

    def forward(self, x, vec):
        shift, scale = self.adaLN_modulation(vec).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class Flux(nn.Module):
    def __init__(self, cfg: FluxConfig):
        super().__init__()
        self.cfg = cfg
        self.img_in = nn.Linear(cfg.in_channels, cfg.width)
        self.txt_in = nn.Linear(cfg.context_dim, cfg.width)
        self.time_in = MLPEmbedder(FREQUENCY_DIM, cfg.width)
        self.vector_in = MLPEmbedder(cfg.pooled_dim, cfg.width)
        self.guidance_in = MLPEmbedder(FREQUENCY_DIM, cfg.width) if cfg.guidance_embed else None
        self.double_blocks = nn.ModuleList(DoubleStreamBlock(cfg) for _ in range(cfg.depth))
        self.single_blocks = nn.ModuleList(SingleStreamBlock(cfg) for _ in range(cfg.depth_single))
        self.final_layer = LastLayer(cfg)

    def forward(self, img, img_ids, txt, txt_ids, t, y, guidance=None):
        """img [B, N, in_channels] (packed patches), img_ids [B, N, 3], txt [B, T, context_dim], txt_ids [B, T, 3],
        t [B] in [0, 1], y [B, pooled_dim], guidance [B] (dev) -> velocity patches [B, N, in_channels]."""
        vec = self.time_in(timestep_embedding(t * TIME_FACTOR, FREQUENCY_DIM).to(img.dtype))
        if self.guidance_in is not None:
            if guidance is None:
                raise ValueError("this FLUX model (dev) takes the guidance scale as an input")
            vec = vec + self.guidance_in(timestep_embedding(guidance * TIME_FACTOR, FREQUENCY_DIM).to(img.dtype))
        vec = vec + self.vector_in(y)
        img, txt = self.img_in(img), self.txt_in(txt)
        rot = rope(torch.cat([txt_ids, img_ids], dim=1), self.cfg.axes_dim, self.cfg.theta)
        for block in self.double_blocks:
            img, txt = block(img, txt, vec, rot)
        x = torch.cat([txt, img], dim=1)
        for block in self.single_blocks:
            x = block(x, vec, rot)
        return self.final_layer(x[:, txt.shape[1]:], vec)


def pack(latent: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """latent [B, C, H, W] -> (tokens [B, HW/4, 4C], each a 2×2 patch with channels outermost; ids [B, HW/4, 3]:
    (0, patch row, patch column))."""
    b, c, h, w = latent.shape
    tokens = rearrange(latent, "b c (h ph) (w pw) -> b (h w) (c ph pw)", ph=PATCH, pw=PATCH)
    ids = torch.zeros(h // PATCH, w // PATCH, 3, device=latent.device)
    ids[..., 1] = torch.arange(h // PATCH, device=latent.device)[:, None]
    ids[..., 2] = torch.arange(w // PATCH, device=latent.device)[None, :]
    return tokens, ids.reshape(1, -1, 3).expand(b, -1, -1)


def unpack(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """pack's inverse: tokens [B, HW/4, 4C] -> latent [B, C, height, width]."""
    return rearrange(tokens, "b (h w) (c ph pw) -> b c (h ph) (w pw)", h=height // PATCH, ph=PATCH, pw=PATCH)


class LatentFlux(nn.Module):
    """The transformer on the pipeline's terms (those of the UNet and the MMDiT): latents [B, 16, H, W] in and
    velocities out, the time as 1000·σ, the text tokens (at positions (0, 0, 0)) and the pooled vector, and for
    dev the guidance scale per row. ``cfg`` is the transformer's."""

    def __init__(self, flux: Flux):
        super().__init__()
        self.flux, self.cfg = flux, flux.cfg

    def forward(self, x, t, context, y, guidance=None):
        """x [B, 16, H, W] (or fewer rows than t: a guided pair sharing its latent), t [B] = 1000·σ,
        context [B, T, 4096], y [B, 768], guidance [B] -> velocity [B, 16, H, W]."""
        img, img_ids = pack(x)
        img, img_ids = (a.repeat(len(t) // a.shape[0], 1, 1) for a in (img, img_ids))
        txt_ids = torch.zeros(len(t), context.shape[1], 3, device=x.device)
        out = self.flux(img, img_ids, context, txt_ids, t / TIME_FACTOR, y, guidance)
        return unpack(out, *x.shape[-2:])
