"""MMDiT: the multimodal diffusion transformer of Stable Diffusion 3 and 3.5 (Esser et al., "Scaling Rectified
Flow Transformers for High-Resolution Image Synthesis", 2024), with SD3.5 medium's MMDiT-X blocks.

Where the UNet reads the text through cross-attention, MMDiT keeps two streams of tokens side by side, the
image's and the text's, each with its own weights, and lets them meet in one attention over both:

    latent [B, C, H, W] -> 2×2 patches (a strided conv) -> image tokens x [B, HW/4, D], plus fixed 2-D
        sin-cos positions: a max×max table stored in the file, of which the centre h×w is taken
    text [B, L, 4096] (CLIP-L ⊕ bigG hidden states zero-padded to 4096, then T5's, along L) -> linear -> ctx [B, L, D]
    c = MLP(sinusoid(t)) + MLP(pooled [B, 2048])                     the vector every block is modulated by
    for each joint block:
        per stream s ∈ {x, ctx}: (shift, scale, gate) ×2 = Linear(SiLU(c)) (adaLN-Zero)
        q, k, v of both streams from LayerNorm(s)·(1 + scale) + shift (q, k RMS-normalised per head in 3.5)
        attention over the concatenated tokens [x; ctx]: every token sees both streams
        s += gate · proj(its part of the attention);  s += gate' · MLP(modulated LayerNorm(s))
        MMDiT-X (the first blocks of 3.5 medium): x also gets an image-only self-attention, with its own
            (shift, scale, gate) from the same LayerNorm(x)
        the last block only feeds the text into the attention ("pre only": no output, no MLP)
    final layer: LayerNorm(x)·(1 + scale) + shift -> linear -> patches -> latent [B, C, H, W]

The network predicts the flow velocity v = ε − x₀ at time t = σ·1000 (samplers/denoiser.py). Parameter names are
those of Stability AI's single files (``model.diffusion_model.joint_blocks.N.x_block.attn.qkv`` ...); diffusers'
``SD3Transformer2DModel`` folders are converted to them by the loader.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .unet import timestep_embedding

FREQUENCY_DIM = 256      # the timestep sinusoid's width


@dataclass
class MMDiTConfig:
    depth: int = 24                  # joint blocks; Stability ties the width to it: D = 64·depth
    width: int = 1536                # D (SD3 medium; 3.5 large: 38 blocks of 2432)
    in_channels: int = 16
    patch_size: int = 2
    head_dim: int = 64
    context_dim: int = 4096          # the text tokens' channels (T5-XXL's width)
    pooled_dim: int = 2048           # CLIP-L's 768 + bigG's 1280 pooled outputs
    pos_embed_max_size: int = 192    # the positions table's side, in patches
    qk_norm: bool = False            # RMS norm of q and k per head (SD3.5)
    dual_attention_layers: tuple = field(default_factory=tuple)     # MMDiT-X blocks (SD3.5 medium: 0..12)

    @property
    def heads(self) -> int:
        return self.width // self.head_dim

    @property
    def out_channels(self) -> int:          # the velocity has the latent's channels
        return self.in_channels


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale[:, None]) + shift[:, None]


class RMSNorm(nn.Module):
    """x / rms(x) · weight over the last dimension, the mean of squares taken in float32."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(dim)), eps

    def forward(self, x):
        x = x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps).to(x.dtype)
        return x * self.weight


class SelfAttention(nn.Module):
    """The projections of one stream: fused qkv in, proj out (none for a "pre only" stream)."""

    def __init__(self, cfg: MMDiTConfig, pre_only: bool = False):
        super().__init__()
        self.heads = cfg.heads
        self.qkv = nn.Linear(cfg.width, 3 * cfg.width)
        self.proj = None if pre_only else nn.Linear(cfg.width, cfg.width)
        self.ln_q = RMSNorm(cfg.head_dim) if cfg.qk_norm else None
        self.ln_k = RMSNorm(cfg.head_dim) if cfg.qk_norm else None

    def qkv_heads(self, x):
        """x [B, L, D] -> q, k, v [B, heads, L, head_dim]."""
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        if self.ln_q is not None:
            q, k = self.ln_q(q), self.ln_k(k)
        return q, k, v

    def forward(self, x):          # MMDiT-X's image-only attention
        return self.proj(attend(*self.qkv_heads(x)))


def attend(q, k, v) -> torch.Tensor:
    """softmax(q kᵀ / √d) v, heads merged: [B, heads, L, d] -> [B, L, heads·d]."""
    out = F.scaled_dot_product_attention(q, k, v)
    return out.transpose(1, 2).flatten(2)


class Mlp(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class DismantledBlock(nn.Module):
    """One stream's half of a joint block (Stability AI's name): its modulation, projections and MLP."""

    def __init__(self, cfg: MMDiTConfig, pre_only: bool = False, dual: bool = False):
        super().__init__()
        self.pre_only, self.dual = pre_only, dual
        chunks = 2 if pre_only else 9 if dual else 6
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(cfg.width, chunks * cfg.width))
        self.norm1 = nn.LayerNorm(cfg.width, elementwise_affine=False, eps=1e-6)
        self.attn = SelfAttention(cfg, pre_only)
        self.attn2 = SelfAttention(cfg) if dual else None
        if not pre_only:
            self.norm2 = nn.LayerNorm(cfg.width, elementwise_affine=False, eps=1e-6)
            self.mlp = Mlp(cfg.width)

    def pre_attention(self, x, c):
        """(q, k, v of this stream, what post_attention needs)."""
        mods = self.adaLN_modulation(c).chunk(2 if self.pre_only else 9 if self.dual else 6, dim=1)
        h = self.norm1(x)
        return self.attn.qkv_heads(modulate(h, mods[0], mods[1])), (h, mods)

    def post_attention(self, x, attn_out, state):
        h, (shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp, *second) = state
        x = x + gate_msa[:, None] * self.attn.proj(attn_out)
        if self.dual:                                    # MMDiT-X: an image-only attention beside the joint one
            shift2, scale2, gate2 = second
            x = x + gate2[:, None] * self.attn2(modulate(h, shift2, scale2))
        return x + gate_mlp[:, None] * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class JointBlock(nn.Module):
    def __init__(self, cfg: MMDiTConfig, last: bool, dual: bool):
        super().__init__()
        self.context_block = DismantledBlock(cfg, pre_only=last)
        self.x_block = DismantledBlock(cfg, dual=dual)

    def forward(self, ctx, x, c):
        """ctx [B, L, D], x [B, N, D], c [B, D] -> (ctx or None after the last block, x)."""
        (qc, kc, vc), ctx_state = self.context_block.pre_attention(ctx, c)
        (qx, kx, vx), x_state = self.x_block.pre_attention(x, c)
        out = attend(torch.cat([qx, qc], 2), torch.cat([kx, kc], 2), torch.cat([vx, vc], 2))
        n = x.shape[1]
        x = self.x_block.post_attention(x, out[:, :n], x_state)
        if self.context_block.pre_only:
            return None, x
        return self.context_block.post_attention(ctx, out[:, n:], ctx_state), x


class Embedder(nn.Module):
    """MLP: in -> D, SiLU, D -> D (the timestep's and the pooled text's)."""

    def __init__(self, n_in: int, width: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(n_in, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, x):
        return self.mlp(x)


class PatchEmbed(nn.Module):
    def __init__(self, cfg: MMDiTConfig):
        super().__init__()
        self.proj = nn.Conv2d(cfg.in_channels, cfg.width, cfg.patch_size, stride=cfg.patch_size)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)          # [B, D, h, w] -> [B, h·w, D]


class FinalLayer(nn.Module):
    def __init__(self, cfg: MMDiTConfig):
        super().__init__()
        self.norm_final = nn.LayerNorm(cfg.width, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(cfg.width, cfg.patch_size ** 2 * cfg.in_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(cfg.width, 2 * cfg.width))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class MMDiT(nn.Module):
    def __init__(self, cfg: MMDiTConfig):
        super().__init__()
        self.cfg = cfg
        self.x_embedder = PatchEmbed(cfg)
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.pos_embed_max_size ** 2, cfg.width))
        self.t_embedder = Embedder(FREQUENCY_DIM, cfg.width)
        self.y_embedder = Embedder(cfg.pooled_dim, cfg.width)
        self.context_embedder = nn.Linear(cfg.context_dim, cfg.width)
        self.joint_blocks = nn.ModuleList(JointBlock(cfg, last=i == cfg.depth - 1, dual=i in cfg.dual_attention_layers)
                                          for i in range(cfg.depth))
        self.final_layer = FinalLayer(cfg)

    def positions(self, h: int, w: int) -> torch.Tensor:
        """The centre h×w of the max×max positions table, as [1, h·w, D]."""
        m = self.cfg.pos_embed_max_size
        if h > m or w > m:
            raise ValueError(f"the latent is {h}×{w} patches; this model's positions cover at most {m}×{m}")
        top, left = (m - h) // 2, (m - w) // 2
        return self.pos_embed.view(1, m, m, -1)[:, top:top + h, left:left + w].reshape(1, h * w, -1)

    def forward(self, x, t, context, y, skip_layers=()):
        """x [B, C, H, W], t [B] (σ·1000), context [B, L, context_dim], y [B, pooled_dim] -> velocity [B, C, H, W].
        x may have fewer rows than t (a guided pair sharing its latent, samplers.make_denoiser's share_latent):
        its tokens are then repeated to t's rows. The joint blocks numbered in ``skip_layers`` are passed over,
        both streams going on unchanged (skip-layer guidance's weakened model)."""
        p = self.cfg.patch_size
        _, _, height, width = x.shape
        h, w = height // p, width // p
        tokens = self.x_embedder(x) + self.positions(h, w).to(x.dtype)
        b = len(t)
        tokens = tokens.repeat(b // tokens.shape[0], 1, 1)
        c = self.t_embedder(timestep_embedding(t, FREQUENCY_DIM).to(x.dtype)) + self.y_embedder(y)
        ctx = self.context_embedder(context)
        for i, block in enumerate(self.joint_blocks):
            if i not in skip_layers:
                ctx, tokens = block(ctx, tokens, c)
        out = self.final_layer(tokens, c)                                   # [B, h·w, p·p·C]
        out = out.view(b, h, w, p, p, self.cfg.in_channels)
        return torch.einsum("nhwpqc->nchpwq", out).reshape(b, self.cfg.in_channels, height, width)
