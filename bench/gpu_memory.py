"""What the default CUDA graphs cost and give on a GPU: ``python -m bench.gpu_memory`` (part ``memory``
of bench/gpu.sh).

For the full-size SD1.5-shaped checkpoint in float16, with and without CUDA graphs: the first 512²
20-step image (which captures the graph), the second, a first image at a new size (768², another
capture), and the peak GPU memory allocated and reserved by torch over all of it. Then the same
512² image with a full-size ControlNet (random weights), whose residuals enter the captured UNet.
"""
import tempfile
import time
from pathlib import Path

import torch

import sdcore
from bench.util import NEGATIVE, PROMPT, sd15_checkpoint
from sdcore.pipeline import GenerationParams, generate


def timed(model, size, **kw):
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    generate(model, GenerationParams(PROMPT, NEGATIVE, width=size, height=size, steps=20, seed=1, sample_method="euler_a",
                                     **kw))
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def controlnet_times(ckpt):
    from PIL import Image

    from sdcore.controlnet import ControlNet
    from sdcore.formats.write import random_init_, save_controlnet
    from sdcore.unet import UNetConfig
    hint = Image.new("RGB", (512, 512))
    hint.paste((255, 255, 255), (128, 128, 384, 384))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "controlnet.safetensors"
        save_controlnet(path, random_init_(ControlNet(UNetConfig()), 21), dtype=torch.float16)
        for graphs in (False, True):
            model = sdcore.load_model(ckpt, device="cuda", dtype=torch.float16, cuda_graphs=graphs, control_net=str(path))
            times = [timed(model, 512, control_image=hint) for _ in range(4)]
            print(f"cuda_graphs={graphs}, with a ControlNet: 512² 20 steps first {times[0] * 1e3:.0f} ms, then "
                  + " / ".join(f"{t * 1e3:.0f}" for t in times[1:]) + " ms", flush=True)
            del model


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
    controlnet_times(ckpt)


if __name__ == "__main__":
    main()
