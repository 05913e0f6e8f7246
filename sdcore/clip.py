"""CLIP text transformers: OpenAI CLIP ViT-L/14 (SD1), OpenCLIP ViT-H (SD2), and SDXL's pair (CLIP ViT-L and
OpenCLIP ViT-bigG).

One module serves all of them; they differ only in width, depth, activation, which block's output
conditions the UNet and whether the final LayerNorm is applied. SDXL also takes bigG's pooled output: the
last block's output, through ln_final, at the end-of-text token, times ``text_projection``. Parameter names
follow OpenCLIP (fused ``in_proj``); the loader converts the Hugging Face layout that SD1 files use.
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn


@dataclass
class TextConfig:
    vocab_size: int = 49408
    context_length: int = 77
    width: int = 768
    layers: int = 12
    heads: int = 12
    act: str = "quick_gelu"       # SD1 (OpenAI CLIP); "gelu" for OpenCLIP towers
    output_layer: int = -1        # which block's output: -1 last (SD1), -2 penultimate (SD2, SD1 "clip skip 2")
    final_norm: bool = True       # SD1/SD2 apply ln_final to that output; SDXL does not
    pad_id: int = 49407           # SD1 pads with eos; OpenCLIP towers with 0
    projection_dim: int | None = None  # text_projection present (OpenCLIP, SDXL pooled output)


def quick_gelu(x):
    return x * torch.sigmoid(1.702 * x)


class SelfAttention(nn.Module):
    def __init__(self, width, heads):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))  # q, k, v stacked by rows
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        nn.init.xavier_uniform_(self.in_proj_weight)      # as nn.MultiheadAttention (OpenCLIP's own)

    def forward(self, x):                                                  # x [B, T, W]
        q, k, v = rearrange(F.linear(x, self.in_proj_weight, self.in_proj_bias),
                            "b t (qkv heads d) -> qkv b heads t d", qkv=3, heads=self.heads)
        h = F.scaled_dot_product_attention(q, k, v, is_causal=True)       # [B, heads, T, W/heads]
        return self.out_proj(rearrange(h, "b heads t d -> b t (heads d)"))


class MLP(nn.Module):
    def __init__(self, width, act):
        super().__init__()
        self.c_fc, self.c_proj = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)
        self.act = quick_gelu if act == "quick_gelu" else F.gelu

    def forward(self, x):
        return self.c_proj(self.act(self.c_fc(x)))


class ResidualBlock(nn.Module):
    """Pre-LayerNorm transformer block."""

    def __init__(self, width, heads, act):
        super().__init__()
        self.ln_1, self.attn = nn.LayerNorm(width), SelfAttention(width, heads)
        self.ln_2, self.mlp = nn.LayerNorm(width), MLP(width, act)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.resblocks = nn.ModuleList(ResidualBlock(cfg.width, cfg.heads, cfg.act) for _ in range(cfg.layers))


class TextEncoder(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.cfg = cfg
        # _weight= skips nn.Embedding's own init: on the meta device (where loading builds) init.normal_
        # runs a Python decomposition that imports torch._dynamo, 1-2 s of every server start
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width, _weight=torch.empty(cfg.vocab_size, cfg.width))
        self.positional_embedding = nn.Parameter(torch.empty(cfg.context_length, cfg.width))
        if not self.positional_embedding.is_meta:
            # OpenCLIP's initialisation: loading replaces it, but a module built for training must not
            # start from torch.empty
            nn.init.normal_(self.token_embedding.weight, std=0.02)
            nn.init.normal_(self.positional_embedding, std=0.01)
        self.transformer = Transformer(cfg)
        self.ln_final = nn.LayerNorm(cfg.width)
        if cfg.projection_dim:
            self.text_projection = nn.Parameter(torch.empty(cfg.width, cfg.projection_dim))
            if not self.text_projection.is_meta:
                nn.init.normal_(self.text_projection, std=cfg.width ** -0.5)

    def forward(self, tokens: torch.Tensor, output_layer: int | None = None, pooled: bool = False,
                extra: torch.Tensor | None = None):
        """tokens [B, 77] -> hidden states [B, 77, width] of the chosen block (ln_final applied if configured).
        Blocks after the chosen one are not run, unless ``pooled``: then all run, and the result is
        (hidden states, pooled [B, projection_dim], or [B, width] without a projection). ``extra`` [E, width]: the
        token vectors of ids from vocab_size on (textual-inversion embeddings, sdcore.embeddings).
        """
        blocks = self.transformer.resblocks
        layer = self.cfg.output_layer if output_layer is None else output_layer
        n_run = len(blocks) if pooled else layer % len(blocks) + 1
        vocab = self.cfg.vocab_size
        x = self.token_embedding(tokens.clamp(max=vocab - 1))
        if extra is not None:
            learned = extra.to(x)[(tokens - vocab).clamp(min=0, max=len(extra) - 1)]
            x = torch.where((tokens >= vocab)[..., None], learned, x)
            tokens = tokens.masked_fill(tokens >= vocab, 0)         # never taken for the end-of-text token below
        x = x + self.positional_embedding
        for i, block in enumerate(blocks[:n_run]):
            x = block(x)
            if i == layer % len(blocks):
                hidden = self.ln_final(x) if self.cfg.final_norm else x
        if not pooled:
            return hidden
        eos = (tokens == tokens.max(dim=1, keepdim=True).values).int().argmax(dim=1)   # the first end-of-text token
        pooled = self.ln_final(x)[torch.arange(x.shape[0], device=x.device), eos]
        # FLUX reads CLIP-L's pooled output before any projection (transformers' pooler_output)
        return hidden, pooled @ self.text_projection if self.cfg.projection_dim else pooled
