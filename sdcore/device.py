"""Where a model runs and in which dtype, when the caller says "auto": the server's default, and
``load_model``'s, so a script loading a model the plain way draws the images the server draws; and
handing freed memory back between the stages of a generation."""
import ctypes
import ctypes.util
import functools

import torch

from .cpu_attention import cpu_flags

CPUINFO = "/proc/cpuinfo"


def resolve_device(device="auto") -> str:
    """``auto``: the first CUDA card when there is one, else the CPU. Anything else is kept."""
    if str(device) != "auto":
        return str(device)
    return "cuda" if torch.cuda.is_available() else "cpu"


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX: where bf16 matmuls run at about twice the fp32 rate (elsewhere they are
    emulated and slower than fp32)."""
    return not cpu_flags(CPUINFO).isdisjoint({"avx512_bf16", "amx_bf16"})


def resolve_dtype(dtype="auto", device="cpu") -> torch.dtype:
    """A torch dtype or its name ("float16", "bfloat16", ...) as a torch dtype. ``auto`` picks the
    fastest dtype whose images stay faithful (docs/BENCHMARKS.md): bfloat16 on a CPU with native bf16
    and on CUDA cards that compute in bf16 (no fp16 overflow in the VAE), float16 on older CUDA
    cards, float32 elsewhere."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype != "auto":
        resolved = getattr(torch, str(dtype), None)
        if not (isinstance(resolved, torch.dtype) and resolved.is_floating_point):
            raise ValueError(f"dtype must be auto or a floating-point torch dtype (float32, float16, bfloat16), "
                             f"not {dtype!r}")
        return resolved
    device = torch.device(resolve_device(device))
    if device.type == "cuda":
        with torch.cuda.device(device):       # the card asked for, not the current one
            return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
    if device.type == "cpu" and cpu_has_native_bf16():
        return torch.bfloat16
    return torch.float32


@functools.cache
def _malloc_trim():
    """glibc's malloc_trim, or None (another C library, or none found)."""
    try:
        return ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim
    except (OSError, AttributeError, TypeError):
        return None


def release_freed_memory(device) -> None:
    """On the CPU, hand the pages the C heap holds free back to the system (glibc's malloc_trim).
    torch frees most CPU tensors into that heap, where they stay part of the process: after sampling,
    the step's freed temporaries would sit under the VAE decode's peak, which comes next."""
    trim = _malloc_trim() if torch.device(device).type == "cpu" else None
    if trim is not None:
        trim(0)
