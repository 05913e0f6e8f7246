"""Time our CPU attention kernel (sdcore/attention_bf16.cpp) against ATen's SDPA.

``python -m bench.attention_kernel [--rounds N]``: builds the kernel (g++, a CPU with AVX512-BF16; ~25 s
per variant, cached), checks it against a float64 reference, then times it and ATen's
scaled_dot_product_attention interleaved on the SD1.5 UNet's level-0 self-attention shapes in bfloat16,
and each of its three sections by leaving it out (docs/BENCHMARKS.md, "The bf16 UNet step at 512²").
"""
import argparse
import statistics
import sys
import time

import torch
from torch.nn.functional import scaled_dot_product_attention as sdpa

from sdcore import cpu_attention

VARIANTS = {"whole kernel": None, "without Q K^T": "SKIP_QK", "without softmax": "SKIP_SM", "without P V": "SKIP_PV"}


def variant(skip):
    """The op of the kernel without section ``skip`` (None: the real one)."""
    if skip is None:
        return torch.ops.sdcore.attention_bf16
    torch.ops.load_library(str(cpu_attention.build([skip, f"OP=attention_{skip.lower()}"])))
    return getattr(torch.ops.sdcore, f"attention_{skip.lower()}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=7)
    args = p.parse_args(argv)
    if not cpu_attention.prepare():
        sys.exit("the kernel needs a CPU with AVX512-BF16 and g++ (see the warning above)")
    kernels = {name: variant(skip) for name, skip in VARIANTS.items()}
    g = torch.Generator().manual_seed(0)
    for b, heads, n, d in [(2, 8, 4096, 40), (1, 8, 4096, 40)]:
        q, k, v = (torch.randn(b, heads, n, d, generator=g).bfloat16() for _ in range(3))
        calls = {"ATen SDPA": lambda: sdpa(q, k, v)}
        calls.update({name: (lambda kernel=kernel: kernel(q, k, v)) for name, kernel in kernels.items()})
        with torch.inference_mode():
            ref = sdpa(q.double(), k.double(), v.double())
            err = {name: (calls[name]().double() - ref).abs().max().item()
                   for name in ("ATen SDPA", "whole kernel")}
            times = {name: [] for name in calls}
            for _ in range(args.rounds):
                for name, call in calls.items():
                    t0 = time.perf_counter()
                    call()
                    times[name].append(time.perf_counter() - t0)
        med = {name: statistics.median(t) for name, t in times.items()}
        ratios = sorted(o / a for o, a in zip(times["whole kernel"], times["ATen SDPA"]))
        print(f"[{b}, {heads}, {n}, {d}] bfloat16, {torch.get_num_threads()} threads, median of {args.rounds}: "
              + ", ".join(f"{name} {m * 1e3:.0f} ms" for name, m in med.items())
              + f"; kernel/ATen {med['whole kernel'] / med['ATen SDPA']:.3f} (per round {ratios[0]:.2f}-{ratios[-1]:.2f}); "
              f"max abs error vs float64: kernel {err['whole kernel']:.1e}, ATen {err['ATen SDPA']:.1e}", flush=True)


if __name__ == "__main__":
    main()
