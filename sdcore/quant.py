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

and the K-quants, each of 256 weights in sub-blocks of 16 or 32 with a scale sc (and a min m) of their own,
in a few bits, under the block's float16 d (and dmin):

    Q2_K  [16 bytes: sc | m << 4][64 bytes of 2-bit q][d: f16][dmin: f16]   x = (d·sc)·q − dmin·m, per 16
    Q3_K  [32 bytes of high bits][64 bytes of 2 low bits][12 bytes: 6-bit sc][d: f16]
                                                        x = (d·(sc − 32))·(q − 4), q = low | high << 2, per 16
    Q4_K  [d: f16][dmin: f16][12 bytes: 6-bit sc, m][128 bytes of 4-bit q]  x = (d·sc)·q − dmin·m, per 32
    Q5_K  [d: f16][dmin: f16][12 bytes][32 bytes of high bits][128 bytes of 4 low bits]
                                                        x = (d·sc)·q − dmin·m, q = low | high << 4, per 32
    Q6_K  [128 bytes of 4 low bits][64 bytes of 2 high bits][16 × int8 sc][d: f16]
                                                        x = (d·sc)·(q − 32), q = low | high << 4, per 16

Values of b bits are packed in runs of bytes: a run gives the lowest b bits of each of its bytes in turn, then
the next b bits of each, and so on. So the 4-bit halves of byte j of Q4_0's 16 are weights j (low nibble) and
j + 16 (high nibble); Q5_0's high bits are runs of one byte (bit j of a little-endian 32-bit word for weight j);
the K-quants' 256 weights are 2 runs of 32 bytes for Q2_K's and Q3_K's 2 bits, 4 of 32 for the 4 bits of Q4_K and
Q5_K, 2 of 64 and 2 of 32 for Q6_K's low and high bits, and one of 32 for the high bits of Q3_K and Q5_K. Q3_K's
scales are 8 bytes of their low 4 bits then 4 of their high 2; Q4_K's and Q5_K's see ``_scales_mins``.
Each expansion below equals ``gguf.quants.dequantize`` bit for bit (tests), computing in float32 as it does: the
products are exact there (a float16's 11 significant bits times integers of at most 12 bits together), so only
the sum with the min (or m) rounds, once, the same way.
The other GGUF types (the IQ and TQ types, MXFP4, Q8_1, Q8_K ...) are dequantized at load, by the gguf package.
float8 (e4m3fn, e5m2) weights are kept as they are and cast up per call.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# each kept GGUF type's block: (its weights, {its fields in order: their bytes}), as in the tables above
LAYOUTS = {
    "Q8_0": (32, {"d": 2, "qs": 32}),
    "Q4_0": (32, {"d": 2, "qs": 16}),
    "Q4_1": (32, {"d": 2, "m": 2, "qs": 16}),
    "Q5_0": (32, {"d": 2, "qh": 4, "qs": 16}),
    "Q5_1": (32, {"d": 2, "m": 2, "qh": 4, "qs": 16}),
    "Q2_K": (256, {"scales": 16, "qs": 64, "d": 2, "dmin": 2}),
    "Q3_K": (256, {"hmask": 32, "qs": 64, "scales": 12, "d": 2}),
    "Q4_K": (256, {"d": 2, "dmin": 2, "scales": 12, "qs": 128}),
    "Q5_K": (256, {"d": 2, "dmin": 2, "scales": 12, "qh": 32, "qs": 128}),
    "Q6_K": (256, {"ql": 128, "qh": 64, "scales": 16, "d": 2}),
}
# (weights, bytes) per block of each kept GGUF type
BLOCK_SIZES = {kind: (weights, sum(fields.values())) for kind, (weights, fields) in LAYOUTS.items()}
FLOAT8 = (torch.float8_e4m3fn, torch.float8_e5m2)
_FLOAT16_FIELDS = ("d", "dmin", "m")


def _fields(blocks: torch.Tensor, kind: str) -> dict:
    """blocks [n, bytes] -> {field: its bytes [n, size]}, the float16 scales (d, dmin, m) as float32 [n, 1]."""
    out, start = {}, 0
    for name, size in LAYOUTS[kind][1].items():
        part = blocks[:, start:start + size]
        out[name] = part.contiguous().view(torch.float16).float() if name in _FLOAT16_FIELDS else part
        start += size
    return out


def _unpack(packed: torch.Tensor, bits: int, runs: int = 1) -> torch.Tensor:
    """Bytes [n, m] of ``bits``-bit values -> the 8·m/bits values [n, 8·m/bits] in llama.cpp's order: the bytes
    are ``runs`` equal runs, each giving the lowest ``bits`` of every byte of the run, then the next ``bits`` ..."""
    shifts = torch.arange(0, 8, bits, device=packed.device, dtype=torch.uint8)
    values = packed.reshape(packed.shape[0], runs, 1, -1) >> shifts[:, None]
    return (values & ((1 << bits) - 1)).reshape(packed.shape[0], -1)


def _scales_mins(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K's and Q5_K's 12 bytes -> the 6-bit scales and mins of the 8 sub-blocks, [n, 8] each: bytes 0-3 hold
    scales 0-3 in their low 6 bits and bytes 4-7 mins 0-3; sub-blocks 4-7 have their low 4 bits in bytes 8-11
    (scale in the low nibble, min in the high one) and their top 2 bits in the top 2 of bytes 0-3 and 4-7."""
    sc, m, low = packed[:, 0:4], packed[:, 4:8], packed[:, 8:12]
    return (torch.cat([sc & 0x3F, (low & 0x0F) | (sc >> 6) << 4], dim=1),
            torch.cat([m & 0x3F, (low >> 4) | (m >> 6) << 4], dim=1))


def _sub_blocks(q: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor | None = None) -> torch.Tensor:
    """scale·q (− minimum) for each equal sub-block: q [n, weights], scale and minimum [n, sub-blocks] float32
    (d·sc and dmin·m, multiplied out first as the reference does; exact either way, see above)."""
    x = scale[:, :, None] * q.reshape(q.shape[0], scale.shape[1], -1).float()
    if minimum is not None:
        x = x - minimum[:, :, None]
    return x.reshape(q.shape[0], -1)


def dequantize(blocks: torch.Tensor, kind: str) -> torch.Tensor:
    """blocks [n, BLOCK_SIZES[kind][1]] uint8 -> the weights as float32 [n, BLOCK_SIZES[kind][0]]."""
    if kind not in LAYOUTS:
        raise ValueError(f"no in-memory expansion for {kind}")
    f = _fields(blocks, kind)
    # the common types in place on one float32 buffer: this runs for every layer at every step
    if kind == "Q8_0":
        return f["qs"].contiguous().view(torch.int8).float().mul_(f["d"])
    if kind == "Q4_0":
        return _unpack(f["qs"], 4).float().sub_(8).mul_(f["d"])
    if kind == "Q4_1":
        return f["d"] * _unpack(f["qs"], 4).float() + f["m"]
    if kind in ("Q5_0", "Q5_1"):
        q = _unpack(f["qs"], 4) | _unpack(f["qh"], 1, runs=4) << 4
        return f["d"] * (q.float() - 16) if kind == "Q5_0" else f["d"] * q.float() + f["m"]
    if kind == "Q2_K":
        sc, m = f["scales"] & 0x0F, f["scales"] >> 4
        return _sub_blocks(_unpack(f["qs"], 2, runs=2), f["d"] * sc.float(), f["dmin"] * m.float())
    if kind == "Q3_K":
        sc = (_unpack(f["scales"][:, :8], 4) | _unpack(f["scales"][:, 8:], 2) << 4).float() - 32
        q = (_unpack(f["qs"], 2, runs=2) | _unpack(f["hmask"], 1) << 2).float() - 4
        return _sub_blocks(q, f["d"] * sc)
    if kind in ("Q4_K", "Q5_K"):
        sc, m = _scales_mins(f["scales"])
        q = _unpack(f["qs"], 4, runs=4)
        if kind == "Q5_K":
            q = q | _unpack(f["qh"], 1) << 4
        return _sub_blocks(q, f["d"] * sc.float(), f["dmin"] * m.float())
    # Q6_K
    q = (_unpack(f["ql"], 4, runs=2) | _unpack(f["qh"], 2, runs=2) << 4).float() - 32
    return _sub_blocks(q, f["d"] * f["scales"].contiguous().view(torch.int8).float())


class QuantLinear(nn.Module):
    """``nn.Linear`` whose weight stays as stored: GGUF blocks (``blocks`` [out·in / weights per block, bytes],
    uint8) or float8 (``blocks`` [out, in]); expanded to the input's dtype for each call. Adapters (sdcore.lora)
    cannot be merged into the blocks: their changes are held beside them, as (change, rows, multiplier), and added
    to the expanded weight in each call, as the merge would add them to a dequantized one."""

    def __init__(self, blocks: torch.Tensor, kind: str, shape: tuple[int, int], bias: torch.Tensor | None):
        super().__init__()
        self.kind, self.out_features, self.in_features = kind, *shape
        self.register_buffer("blocks", blocks)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.adapters = []          # (patch with .delta(shape, multiplier), rows or None, multiplier)

    @property
    def weight_shape(self) -> torch.Size:
        return torch.Size((self.out_features, self.in_features))

    def weight_as(self, dtype) -> torch.Tensor:
        if self.kind == "float8":
            w = self.blocks.to(dtype)
        else:
            w = dequantize(self.blocks, self.kind).to(dtype).view(self.out_features, self.in_features)
        for patch, rows, multiplier in self.adapters:      # each added in float32 and rounded, as merged ones are
            view = w[rows[0]:rows[1]] if rows else w
            view.copy_(view.float().add_(patch.delta(view.shape, multiplier).to(w.device)))
        return w

    def forward(self, x):
        return F.linear(x, self.weight_as(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, kept as {self.kind}"


def keepable(kind: str | None) -> bool:
    return kind in BLOCK_SIZES or kind == "float8"


def stored_bytes(module: nn.Module) -> int:
    """The memory a network's weights take as held (kept blocks at their size)."""
    return sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))
