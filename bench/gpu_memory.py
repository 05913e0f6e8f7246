"""What the default CUDA graphs cost on a GPU: ``python -m bench.gpu_memory`` (part ``memory`` of bench/gpu.sh).

For the full-size SD1.5-shaped checkpoint in float16, with and without CUDA graphs: the first 512²
20-step image (which captures the graph), the second, a first image at a new size (768², another
capture), and the peak GPU memory allocated and reserved by torch over all of it.
"""
import time

import torch

import sdcore
from bench.util import NEGATIVE, PROMPT, sd15_checkpoint
from sdcore.pipeline import GenerationParams, generate


def timed(model, size):
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    generate(model, GenerationParams(PROMPT, NEGATIVE, width=size, height=size, steps=20, seed=1, sample_method="euler_a"))
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def main():
    ckpt = str(sd15_checkpoint())
    print(torch.cuda.get_device_name(), "torch", torch.__version__)
    for graphs in (False, True):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        model = sdcore.load_model(ckpt, device="cuda", dtype=torch.float16, cuda_graphs=graphs)
        weights = torch.cuda.memory_allocated()
        first, second, third, new_size = timed(model, 512), timed(model, 512), timed(model, 512), timed(model, 768)
        again = timed(model, 768)
        print(f"cuda_graphs={graphs}: 512² 20 steps first {first * 1e3:.0f} ms, then {second * 1e3:.0f} / {third * 1e3:.0f} ms; "
              f"768² first {new_size * 1e3:.0f} ms, then {again * 1e3:.0f} ms; weights {weights / 2**30:.2f} GiB, peak "
              f"allocated {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB, peak reserved "
              f"{torch.cuda.max_memory_reserved() / 2**30:.2f} GiB", flush=True)
        del model


if __name__ == "__main__":
    main()
