"""Attention on the CPU in bfloat16 through our own kernel (sdcore/attention_bf16.cpp) where it is faster.

SD1.5's level-0 self-attention, [2, 8, 4096, 40] at 512², is a third of a bf16 UNet step on the CPU,
and ATen's flash kernel runs it far below the CPU's bf16 rate; the kernel here is faster on this shape
(docs/BENCHMARKS.md). ``prepare()`` (called by ``load_model`` for a bfloat16 UNet on the CPU with heads
of HEAD_DIMS) compiles it once with g++ into ~/.cache/sd-api-server/kernels (later processes load the
cached library) on CPUs with AVX512-BF16. Where it cannot (no compiler, another CPU,
SDCORE_ATTENTION_KERNEL=0) everything stays on ``F.scaled_dot_product_attention``. The op has a fake
implementation, so ``torch.compile`` keeps it.
"""
import fcntl
import hashlib
import logging
import os
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

log = logging.getLogger(__name__)
SOURCE = Path(__file__).with_name("attention_bf16.cpp")
FLAGS = ["-O3", "-std=c++20", "-shared", "-fPIC", "-mavx512f", "-mavx512dq", "-mavx512bw", "-mavx512bf16", "-mfma"]
QUERY_BLOCK, KEY_BLOCK = 64, 256                    # QB, KB in the kernel
HEAD_DIMS = range(34, 49, 2)                        # even, <= 48 (DP); above 32, where it is faster than ATen's
_state = {"loaded": False, "tried": False}
_lock = threading.Lock()


def cpu_flags(cpuinfo="/proc/cpuinfo") -> set[str]:
    """The CPU's feature flags (empty where /proc/cpuinfo cannot be read)."""
    try:
        with open(cpuinfo) as f:
            return set(next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), []))
    except OSError:
        return set()


def cpu_has_avx512_bf16() -> bool:
    return "avx512_bf16" in cpu_flags()


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "sd-api-server" / "kernels"


def build(defines=(), out_dir: Path | None = None) -> Path:
    """Compile the kernel (``defines``: e.g. SKIP_QK, for bench/attention_kernel.py) unless a library
    built from the same source, flags and torch exists; returns its path."""
    from torch.utils.cpp_extension import include_paths, library_paths
    flags = FLAGS + [f"-D{d}" for d in defines] + [f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"]
    key = hashlib.sha256("\0".join([SOURCE.read_text(), torch.__version__, *flags]).encode()).hexdigest()[:16]
    out_dir = out_dir or cache_dir()
    target = out_dir / f"attention_bf16-{key}.so"
    if target.exists():
        return target
    out_dir.mkdir(parents=True, exist_ok=True)
    # workers starting together: one compiles, the others wait for it and then find the library
    with open(out_dir / f"attention_bf16-{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)                            # released when the file closes
        if target.exists():
            return target
        with tempfile.TemporaryDirectory(dir=out_dir) as tmp:      # built aside, renamed into place: atomic
            partial = Path(tmp) / target.name
            cmd = ["g++", *flags, *(f"-I{p}" for p in include_paths()), str(SOURCE), "-o", str(partial),
                   *(f"-L{p}" for p in library_paths()), "-lc10", "-ltorch_cpu", "-ltorch"]
            subprocess.run(cmd, check=True, capture_output=True, text=True)
            os.replace(partial, target)
    return target


def prepare() -> bool:
    """Build (once) and load the kernel where it can run; True when ``attention`` may use it."""
    with _lock:
        if _state["tried"]:
            return _state["loaded"]
        _state["tried"] = True
        if os.environ.get("SDCORE_ATTENTION_KERNEL", "1") == "0" or not cpu_has_avx512_bf16():
            return False
        try:
            torch.ops.load_library(str(build()))
            torch.library.register_fake("sdcore::attention_bf16")(lambda q, k, v: torch.empty_like(q))
        except Exception as e:              # no g++, an old torch, a full disk: the kernel is an optimisation
            detail = getattr(e, "stderr", "") or e
            log.warning("bf16 attention kernel not built, using torch's SDPA: %s", str(detail)[-2000:])
            return False
        log.info("bf16 CPU attention kernel loaded")
        _state["loaded"] = True
        return True


def takes(q: torch.Tensor, k: torch.Tensor) -> bool:
    """Whether the kernel computes attention for these [B, heads, N, d] queries and keys: CPU bfloat16,
    32 < d <= 48 (measured faster there: SD1.5's level 0), whole tiles of queries and keys."""
    return (_state["loaded"] and q.device.type == "cpu" and q.dtype == torch.bfloat16 and q.shape[-1] in HEAD_DIMS
            and q.shape[-2] % QUERY_BLOCK == 0 and k.shape[-2] % KEY_BLOCK == 0)


def _kernel(q, k, v):
    return torch.ops.sdcore.attention_bf16(q, k, v)


def attention(q, k, v):
    """softmax(q kᵀ / √d) v for [B, heads, N, d] tensors, by the kernel where it takes them."""
    if takes(q, k):
        return _kernel(q, k, v)
    return torch.nn.functional.scaled_dot_product_attention(q, k, v)
