"""T5 v1.1 encoder: the T5-XXL text encoder of SD3 and FLUX (Raffel et al., "Exploring the Limits of Transfer
Learning with a Unified Text-to-Text Transformer", 2020; v1.1: gated-GELU feed-forward, no dropout at
inference, untied input/output embeddings of which the encoder keeps only the input one).

Only the encoder half is used for conditioning. It is a pre-norm transformer that differs from CLIP's in four
ways that matter for reproducing it:

    ids [B, L] -> token embedding x [B, L, D]                  no absolute positions at all
    for each block:
        x += o(attention(RMSNorm(x)))                          attention logits q·k + bias(j − i), NOT / √d
        x += wo(gelu_tanh(wi_0 RMSNorm(x)) * wi_1 RMSNorm(x))  gated GELU ("gelu_new", the tanh approximation)
    hidden states = RMSNorm(x)                                 the final norm; this is ``last_hidden_state``

RMS norm: x / sqrt(mean(x²) + ε) · w, with no mean subtracted and no bias; the mean of squares is taken in
float32 whatever the weights' dtype, and the normalised value is cast back to a half weight dtype before the
scale. The missing 1/√d on q·k is not a bug: T5 folds it into the initialisation of q, and the trained weights
expect raw dot products.

Position enters only through a learned scalar per head added to every attention logit, looked up by the
*bucket* of the signed distance j − i from query i to key j (``relative_position_bucket``). Only the first
block owns that table (``relative_attention_bias``, [buckets, heads]); every later block adds the very same
bias. Padding, when a mask is given, is excluded by setting its keys' logits to the dtype's most negative value
(SD3 and FLUX pipelines pass no mask: their T5 attends to its padding tokens too).

Parameter names are those of Hugging Face's ``T5EncoderModel`` (``shared.weight``,
``encoder.block.N.layer.0.SelfAttention.q.weight``, ...), which SD3's single files keep under
``text_encoders.t5xxl.transformer.``, so weights load by name. ``DenseReluDense`` is a historical name (T5 v1.0
used ReLU); here it is the gated GELU.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn


@dataclass
class T5Config:
    vocab: int = 32128
    width: int = 4096                 # d_model
    d_kv: int = 64                    # per-head width; heads · d_kv need not equal width
    heads: int = 64
    d_ff: int = 10240                 # the gated feed-forward's inner width
    layers: int = 24
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    eps: float = 1e-6                 # RMS norm's ε


def relative_position_bucket(distance: torch.Tensor, num_buckets: int, max_distance: int) -> torch.Tensor:
    """Signed key-minus-query distances (any shape, integer) -> bucket ids in [0, num_buckets).

    Bidirectional: keys at or before the query take buckets [0, n), keys after it [n, 2n), n = num_buckets/2
    (bucket n itself is never used: distance 0 counts as "before"). Within a direction, with e = n/2 and
    d = |distance|: each d < e has a bucket of its own (d itself); farther distances share buckets spaced
    logarithmically, e + ⌊log(d/e) / log(max_distance/e) · (n − e)⌋, capped at n − 1. The cap is reached one
    log-step before max_distance: for T5-XXL (32 buckets, max distance 128) the buckets per direction start at
    distances 0, 1, .., 7, 8, 12, 16, 23, 32, 46, 64, 91, and everything from 91 on shares the last one.
    The float32 expression is evaluated in the reference's order so that no distance lands on the other side
    of a bucket boundary by rounding.
    """
    n = num_buckets // 2
    bucket = (distance > 0).long() * n                                   # keys after the query: upper half
    d = distance.abs()
    exact = n // 2
    # clamp(min=exact): log(0) would be -inf, whose cast to long is undefined; those d take the exact branch
    far = exact + (torch.log(d.clamp(min=exact).float() / exact) / math.log(max_distance / exact)
                   * (n - exact)).long()
    return bucket + torch.where(d < exact, d, far.clamp(max=n - 1))


def clamp_fp16(x: torch.Tensor) -> torch.Tensor:
    """T5-XXL's residual stream outgrows float16 (the feed-forward's output above all: the weights were trained
    in bfloat16). As transformers' T5 does after each sub-layer, a float16 x is clamped to the finite range,
    to ±(max − 1000) once anything has already overflowed to inf, so that adding the next sub-layer does not
    overflow at once again. It keeps values finite, not exact. Other dtypes pass through unchanged."""
    if x.dtype != torch.float16:
        return x
    big = torch.finfo(torch.float16).max
    limit = torch.where(torch.isinf(x).any(), big - 1000, big)        # a tensor: no host sync
    return x.clamp(-limit, limit)


class RMSNorm(nn.Module):
    """T5's LayerNorm: scale only, statistics in float32."""

    def __init__(self, width, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))
        self.eps = eps

    def forward(self, x):                                                # x [B, L, D]
        ms = x.float().pow(2).mean(-1, keepdim=True)                     # [B, L, 1], float32
        return self.weight * (x * torch.rsqrt(ms + self.eps)).to(self.weight.dtype)


class Attention(nn.Module):
    """Multi-head self-attention without biases and without the 1/√d scale; the first block's also holds the
    relative-position table."""

    def __init__(self, cfg: T5Config, relative_bias: bool):
        super().__init__()
        self.heads = cfg.heads
        inner = cfg.heads * cfg.d_kv
        self.q, self.k, self.v = (nn.Linear(cfg.width, inner, bias=False) for _ in range(3))
        self.o = nn.Linear(inner, cfg.width, bias=False)
        if relative_bias:
            buckets = cfg.relative_attention_num_buckets
            self.relative_attention_bias = nn.Embedding(buckets, cfg.heads, _weight=torch.empty(buckets, cfg.heads))

    def forward(self, x, bias):                          # x [B, L, D]; bias [1 or B, heads, L, L] added to q·k
        q, k, v = (rearrange(f(x), "b l (heads d) -> b heads l d", heads=self.heads) for f in (self.q, self.k, self.v))
        h = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=1.0)          # [B, heads, L, d_kv]
        return self.o(rearrange(h, "b heads l d -> b l (heads d)"))


class GatedGELU(nn.Module):
    """The v1.1 feed-forward: wo(gelu_tanh(wi_0 x) · wi_1 x)."""

    def __init__(self, cfg: T5Config):
        super().__init__()
        self.wi_0 = nn.Linear(cfg.width, cfg.d_ff, bias=False)
        self.wi_1 = nn.Linear(cfg.width, cfg.d_ff, bias=False)
        self.wo = nn.Linear(cfg.d_ff, cfg.width, bias=False)

    def forward(self, x):                                                # x [B, L, D]
        h = F.gelu(self.wi_0(x), approximate="tanh") * self.wi_1(x)      # [B, L, d_ff]
        # transformers keeps wo in float32 when it loads T5 in float16 (its _keep_in_fp32_modules); with wo
        # cast to float32 here too, the product is computed (and the residual stream carried) in float32 (a wo kept
        # quantized, sdcore.quant, computes in its input's dtype)
        return self.wo(h.to(self.wo.weight.dtype) if isinstance(self.wo, nn.Linear) else h)


class AttentionSublayer(nn.Module):
    def __init__(self, cfg: T5Config, relative_bias: bool):
        super().__init__()
        self.SelfAttention = Attention(cfg, relative_bias)
        self.layer_norm = RMSNorm(cfg.width, cfg.eps)

    def forward(self, x, bias):
        return x + self.SelfAttention(self.layer_norm(x), bias)


class FeedForwardSublayer(nn.Module):
    def __init__(self, cfg: T5Config):
        super().__init__()
        self.DenseReluDense = GatedGELU(cfg)
        self.layer_norm = RMSNorm(cfg.width, cfg.eps)

    def forward(self, x):
        return x + self.DenseReluDense(self.layer_norm(x))


class Block(nn.Module):
    """Pre-norm block: attention then feed-forward sub-layer, each residual (``layer.0``, ``layer.1``)."""

    def __init__(self, cfg: T5Config, relative_bias: bool):
        super().__init__()
        self.layer = nn.ModuleList([AttentionSublayer(cfg, relative_bias), FeedForwardSublayer(cfg)])

    def forward(self, x, bias):
        x = clamp_fp16(self.layer[0](x, bias))
        return clamp_fp16(self.layer[1](x))


class Stack(nn.Module):
    def __init__(self, cfg: T5Config):
        super().__init__()
        self.block = nn.ModuleList(Block(cfg, relative_bias=i == 0) for i in range(cfg.layers))
        self.final_layer_norm = RMSNorm(cfg.width, cfg.eps)


class T5Encoder(nn.Module):
    def __init__(self, cfg: T5Config):
        super().__init__()
        self.cfg = cfg
        # _weight= skips nn.Embedding's init, which on the meta device is slow (see sdcore.clip)
        self.shared = nn.Embedding(cfg.vocab, cfg.width, _weight=torch.empty(cfg.vocab, cfg.width))
        self.encoder = Stack(cfg)
        self.register_load_state_dict_pre_hook(_tied_embedding)

    def position_bias(self, length: int, device) -> torch.Tensor:
        """[1, heads, L, L]: block 0's learned bias for each (query i, key j), by the bucket of j − i."""
        pos = torch.arange(length, device=device)
        buckets = relative_position_bucket(pos[None, :] - pos[:, None], self.cfg.relative_attention_num_buckets,
                                           self.cfg.relative_attention_max_distance)                 # [L, L]
        table = self.encoder.block[0].layer[0].SelfAttention.relative_attention_bias
        return rearrange(table(buckets), "i j heads -> 1 heads i j")

    def forward(self, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """ids [B, L] -> hidden states [B, L, width] after the final norm (transformers' ``last_hidden_state``).
        ``mask`` [B, L]: 1 (True) for tokens, 0 for padding that no token may attend to; None: all attend to all
        (what SD3 and FLUX do)."""
        x = self.shared(ids)                                                               # [B, L, D]
        bias = self.position_bias(ids.shape[1], ids.device)                                # [1, heads, L, L]
        if mask is not None:
            bias = bias.masked_fill(~mask.bool()[:, None, None, :], torch.finfo(bias.dtype).min)  # [B, heads, L, L]
        for block in self.encoder.block:
            x = block(x, bias)
        return self.encoder.final_layer_norm(x)


def _tied_embedding(module, state_dict, prefix, *args):
    """transformers' state dicts also hold the token table as ``encoder.embed_tokens.weight`` (tied to
    ``shared.weight``; some files keep only one of the two): take it for ``shared`` if that is missing, and
    drop the alias, so that a strict load accepts either."""
    alias = state_dict.pop(prefix + "encoder.embed_tokens.weight", None)
    if alias is not None:
        state_dict.setdefault(prefix + "shared.weight", alias)
