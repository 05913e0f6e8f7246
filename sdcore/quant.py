"""Weights kept quantized in memory and dequantized one layer at a time, when it runs.

A GGUF file's block quantizations and a float8 file's weights take a half to a quarter of bfloat16's memory.
Dequantized at load (``build``'s default) they cost the compute dtype's full size; kept as they are, a linear
layer's weight is expanded to the compute dtype just before its matrix product and dropped after it, so a
network needs its stored size plus one layer's weight in the compute dtype. That is what lets FLUX (12 B
parameters) and T5-XXL (4.7 B) share a 24 GiB machine, at the price of the expansion in every call.

The block formats (llama.cpp's, as stable-diffusion.cpp's converter writes them), each of 32 weights x:

    Q8_0  [d: f16][32 × int8 q]                         x = d·q
    Q4_0  [d: f16][16 bytes: q in 4 bits]               x = d·(q − 8)
    Q4_1  [d: f16][m: f16][16 bytes of 4-bit q]         x = d·q + m
    Q5_0  [d: f16][32 high bits][16 bytes of 4 low bits] x = d·(q − 16), q = low | high << 4
    Q5_1  [d: f16][m: f16][32 high bits][16 bytes]       x = d·q + m

The 4-bit halves of byte j are weights j (low nibble) and j + 16 (high nibble); the high bits of weight j are
bit j of a little-endian 32-bit word. Each expansion below equals ``gguf.quants.dequantize`` bit for bit (tests).
Other GGUF types (the K-quants, ...) are dequantized at load. float8 (e4m3fn, e5m2) weights are kept as they
are and cast up per call.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

BLOCK = 32
# bytes per block of each kept GGUF type
BLOCK_BYTES = {"Q8_0": 34, "Q4_0": 18, "Q4_1": 20, "Q5_0": 22, "Q5_1": 24}
FLOAT8 = (torch.float8_e4m3fn, torch.float8_e5m2)


def _f16(blocks: torch.Tensor, start: int) -> torch.Tensor:
    """The float16 at bytes [start, start + 2) of each block, as float32 [n, 1]."""
    return blocks[:, start:start + 2].contiguous().view(torch.float16).float()


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """16 bytes per block -> 32 values in 0..15: the low nibbles (weights 0-15), then the high ones (16-31)."""
    return torch.cat([qs & 0x0F, qs >> 4], dim=1)


def _high_bits(qh: torch.Tensor) -> torch.Tensor:
    """4 bytes per block (a little-endian 32-bit word) -> 32 values in 0..1, bit j for weight j."""
    bits = torch.arange(8, device=qh.device, dtype=torch.uint8)
    return ((qh[:, :, None] >> bits) & 1).reshape(qh.shape[0], 32)


def dequantize(blocks: torch.Tensor, kind: str) -> torch.Tensor:
    """blocks [n, BLOCK_BYTES[kind]] uint8 -> the n·32 weights as float32 [n, 32]."""
    if kind == "Q8_0":
        return _f16(blocks, 0) * blocks[:, 2:].contiguous().view(torch.int8).float()
    if kind == "Q4_0":
        return _f16(blocks, 0) * (_nibbles(blocks[:, 2:]).float() - 8)
    if kind == "Q4_1":
        return _f16(blocks, 0) * _nibbles(blocks[:, 4:]).float() + _f16(blocks, 2)
    if kind == "Q5_0":
        q = _nibbles(blocks[:, 6:]) | (_high_bits(blocks[:, 2:6]) << 4)
        return _f16(blocks, 0) * (q.float() - 16)
    if kind == "Q5_1":
        q = _nibbles(blocks[:, 8:]) | (_high_bits(blocks[:, 4:8]) << 4)
        return _f16(blocks, 0) * q.float() + _f16(blocks, 2)
    raise ValueError(f"no in-memory expansion for {kind}")


class QuantLinear(nn.Module):
    """``nn.Linear`` whose weight stays as stored: GGUF blocks (``blocks`` [out·in/32, bytes], uint8) or float8
    (``blocks`` [out, in]); expanded to the input's dtype for each call."""

    def __init__(self, blocks: torch.Tensor, kind: str, shape: tuple[int, int], bias: torch.Tensor | None):
        super().__init__()
        self.kind, self.out_features, self.in_features = kind, *shape
        self.register_buffer("blocks", blocks)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    def weight_as(self, dtype) -> torch.Tensor:
        if self.kind == "float8":
            return self.blocks.to(dtype)
        return dequantize(self.blocks, self.kind).to(dtype).view(self.out_features, self.in_features)

    def forward(self, x):
        return F.linear(x, self.weight_as(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, kept as {self.kind}"


def keepable(kind: str | None) -> bool:
    return kind in BLOCK_BYTES or kind == "float8"


def stored_bytes(module: nn.Module) -> int:
    """The memory a network's weights take as held (kept blocks at their size)."""
    return sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))
