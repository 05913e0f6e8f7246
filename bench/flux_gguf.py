"""FLUX.1-schnell from GGUF files on this machine, beside stable-diffusion.cpp: ``python -m bench.flux_gguf
[--size 512] [--steps 4] [--threads 2] [--only ours,sdcpp]`` (prints markdown).

Builds once, under .cache/bench/flux-gguf/, full-size files with random weights in the layouts LlamaEdge's
guides have users download: ``flux1-schnell-Q8_0.gguf`` (the transformer in Black Forest Labs' names, 11.9 B
parameters), ``t5xxl-Q8_0.gguf`` (T5-XXL's encoder in transformers' names, as stable-diffusion.cpp's converter
keeps them), ``clip_l.safetensors`` and ``ae.safetensors`` (float16). Matrices whose rows are whole Q8_0 blocks
are Q8_0, the rest float32, as that converter does. Each Q8_0 block is written directly (a float16 scale and 32
random int8), so each matrix has random_init_'s spread without a float32 copy of the model in memory.

Then, each in a process of its own, one image at --size², --steps euler steps at cfg 1, from the same four files:
ours (load_model(quantized_weights="keep"), float32 compute: the transformer's and T5's Q8_0 linear layers stay
as stored and are expanded one at a time) and stable-diffusion.cpp (stable-diffusion-cpp-python in bench/sdcpp.py's
venv, its own Q8_0 kernels). Reported: the load, the whole generation (text encoders, sampling, VAE decode), the
time per step (the sampler's own step times, from each one's progress callback) and the peak
resident memory (VmHWM; mapped file pages count while they are resident)."""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import numpy as np
import torch

from bench.util import CACHE, ROOT, log, machine_info

FOLDER = CACHE / "flux-gguf"
FILES = {"transformer": "flux1-schnell-Q8_0.gguf", "t5xxl": "t5xxl-Q8_0.gguf", "clip_l": "clip_l.safetensors",
         "vae": "ae.safetensors"}
PROMPT = "a lighthouse on a rocky coast at dusk, oil painting"
Q8_BLOCK, Q8_BYTES = 32, 34
INT8_STD = float(np.sqrt(((np.arange(-127, 128) ** 2).mean())))      # of integers uniform in [-127, 127]


def _q8_blocks(shape, std: float, g: torch.Generator) -> np.ndarray:
    """Random Q8_0 blocks for a [rows, cols] matrix whose values spread as N(0, std²) would: [rows, cols/32·34]."""
    rows, cols = shape
    q = torch.randint(-127, 128, (rows, cols // Q8_BLOCK, Q8_BLOCK), generator=g, dtype=torch.int8)
    d = torch.full((rows, cols // Q8_BLOCK, 1), std / INT8_STD, dtype=torch.float16)
    return torch.cat([d.view(torch.uint8), q.view(torch.uint8)], dim=2).reshape(rows, -1).numpy()


def _dense(name: str, shape, g: torch.Generator) -> np.ndarray:
    """random_init_'s values for a tensor that stays float32 (norm scales, biases, small matrices)."""
    if len(shape) >= 2:
        fan_in = 1 if "embed" in name or name.startswith("shared") else int(np.prod(shape[1:]))
        return (torch.randn(shape, generator=g) / fan_in ** 0.5).numpy()
    scale, offset = (0.1, 1.0) if name.endswith(("weight", "scale")) else (0.05, 0.0)
    return (offset + scale * torch.randn(shape, generator=g)).numpy()


def write_q8_gguf(path, shapes: dict, arch: str, seed: int) -> None:
    """A GGUF of random weights named and shaped as ``shapes``, streamed tensor by tensor."""
    import gguf
    g = torch.Generator().manual_seed(seed)
    quantized = {k for k, s in shapes.items()                   # matrices of whole blocks, not T5's position-bias table
                 if len(s) == 2 and s[1] % Q8_BLOCK == 0 and "relative_attention_bias" not in k}
    w = gguf.GGUFWriter(str(path), arch)
    for k, s in shapes.items():
        if k in quantized:
            w.add_tensor_info(k, s, np.float32, s[0] * s[1] // Q8_BLOCK * Q8_BYTES, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor_info(k, s, np.float32, int(np.prod(s)) * 4)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for k, s in shapes.items():
        w.write_tensor_data(_q8_blocks(s, (1 if k.startswith("shared") else s[1]) ** -0.5, g) if k in quantized
                            else _dense(k, s, g))
    w.close()


def build_files() -> dict:
    from safetensors.torch import save_file

    from bench.references import hf_text_config
    from sdcore.clip import TextConfig
    from sdcore.flux import Flux, FluxConfig
    from sdcore.formats.write import random_init_
    from sdcore.t5 import T5Config, T5Encoder
    from sdcore.vae import AutoencoderKL, VAEConfig
    FOLDER.mkdir(parents=True, exist_ok=True)
    paths = {k: FOLDER / name for k, name in FILES.items()}
    meta = torch.device("meta")
    if not paths["transformer"].exists():
        log("writing the FLUX.1-schnell Q8_0 GGUF (12.7 GB) ...")
        with meta:
            shapes = {k: tuple(v.shape) for k, v in Flux(FluxConfig(guidance_embed=False)).state_dict().items()}
        write_q8_gguf(str(paths["transformer"]) + ".tmp", shapes, "flux", 1)
        (FOLDER / (FILES["transformer"] + ".tmp")).rename(paths["transformer"])
    if not paths["t5xxl"].exists():
        log("writing the T5-XXL Q8_0 GGUF (5.1 GB) ...")
        with meta:
            shapes = {k: tuple(v.shape) for k, v in T5Encoder(T5Config()).state_dict().items()}
        write_q8_gguf(str(paths["t5xxl"]) + ".tmp", shapes, "t5", 2)
        (FOLDER / (FILES["t5xxl"] + ".tmp")).rename(paths["t5xxl"])
    if not paths["clip_l"].exists():
        from transformers import CLIPTextModel
        with torch.no_grad():
            clip = random_init_(CLIPTextModel(hf_text_config(TextConfig())), 3, gain=1.5)
        save_file({"text_model." + k: v.half().contiguous() for k, v in clip.state_dict().items()}, str(paths["clip_l"]))
    if not paths["vae"].exists():
        cfg = VAEConfig(z_channels=16, quant_conv=False, scale_factor=0.3611, shift_factor=0.1159)
        with torch.no_grad():
            ae = random_init_(AutoencoderKL(cfg), 4, gain=0.5)
        save_file({k: v.half().contiguous() for k, v in ae.state_dict().items()}, str(paths["vae"]))
    return paths


def _status_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) / 1024


def ours_child(size: int, steps: int) -> None:
    import sdcore
    from sdcore.pipeline import GenerationParams, generate
    paths = {k: FOLDER / name for k, name in FILES.items()}
    t0 = time.perf_counter()
    model = sdcore.load_model(paths["transformer"], device="cpu", dtype=torch.float32, vae=paths["vae"],
                              clip_l=paths["clip_l"], t5xxl=paths["t5xxl"], quantized_weights="keep")
    load = time.perf_counter() - t0
    step_s = []
    p = GenerationParams(prompt=PROMPT, width=size, height=size, steps=steps, cfg_scale=1.0, sample_method="euler",
                         seed=1)
    t0 = time.perf_counter()
    image = generate(model, p, progress=lambda s: step_s.append(s.seconds))[0].image
    total = time.perf_counter() - t0
    image.save(FOLDER / f"ours-{size}-{steps}.png")
    print(json.dumps({"load_s": load, "total_s": total, "step_s": sum(step_s) / len(step_s), "steps": len(step_s),
                      "peak_mib": _status_mib("VmHWM"), "std": float(np.asarray(image).std())}))


SDCPP_CHILD = r"""
import json, sys, time
from stable_diffusion_cpp import StableDiffusion
paths, size, steps, threads = json.loads(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
def mib(field):
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(field + ":")) / 1024
t0 = time.perf_counter()
sd = StableDiffusion(diffusion_model_path=paths["transformer"], clip_l_path=paths["clip_l"], t5xxl_path=paths["t5xxl"],
                     vae_path=paths["vae"], n_threads=threads, vae_decode_only=True, verbose=True)
load = time.perf_counter() - t0
step_s = []
t0 = time.perf_counter()
images = sd.generate_image(prompt=sys.argv[5], width=size, height=size, cfg_scale=1.0, sample_method="euler",
                           sample_steps=steps, seed=1, progress_callback=lambda i, n, s: step_s.append(s))
total = time.perf_counter() - t0
images[0].save(paths["out"])
print("RESULT " + json.dumps({"load_s": load, "total_s": total, "peak_mib": mib("VmHWM"), "steps": step_s}), flush=True)
"""


def sdcpp_run(paths: dict, size: int, steps: int, threads: int) -> dict:
    from bench.sdcpp import ensure_venv
    python = ensure_venv()
    args = {k: str(v) for k, v in paths.items()} | {"out": str(FOLDER / f"sdcpp-{size}-{steps}.png")}
    out = subprocess.run([str(python), "-c", SDCPP_CHILD, json.dumps(args), str(size), str(steps), str(threads), PROMPT],
                         capture_output=True, text=True, cwd=ROOT)
    text = out.stdout + out.stderr
    line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
    if line is None:
        raise RuntimeError(f"stable-diffusion.cpp failed (exit {out.returncode}):\n{text[-3000:]}")
    result = json.loads(line[len("RESULT "):])
    # its progress callback reports each step's seconds, after a first report of 0 before the first step (and may
    # report the VAE decode after them): the first ``steps`` after that
    times = result["steps"][1:] if result["steps"][:1] == [0.0] else result["steps"]
    result["step_s"] = sum(times[:steps]) / steps if len(times) >= steps else float("nan")
    return result


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", default="ours,sdcpp")
    ap.add_argument("--ours-child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.ours_child:
        return ours_child(args.size, args.steps)
    log(machine_info("cpu"))
    paths = build_files()
    rows = []
    if "ours" in args.only.split(","):
        log("ours ...")
        out = subprocess.run([sys.executable, "-m", "bench.flux_gguf", "--ours-child", "--size", str(args.size),
                              "--steps", str(args.steps)], cwd=ROOT, capture_output=True, text=True)
        if out.returncode:
            raise RuntimeError(f"ours failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
        rows.append(("ours (keep, float32 compute)", json.loads(out.stdout.strip().splitlines()[-1])))
        log(f"ours: {rows[-1][1]}")
    if "sdcpp" in args.only.split(","):
        log("stable-diffusion.cpp ...")
        rows.append(("stable-diffusion.cpp", sdcpp_run(paths, args.size, args.steps, args.threads)))
        log(f"stable-diffusion.cpp: {rows[-1][1]}")
    print(f"\n| FLUX.1-schnell Q8_0 + T5-XXL Q8_0, {args.size}², {args.steps} steps | load | whole generation "
          "| per step | peak RSS |")
    print("|---|---|---|---|---|")
    for name, r in rows:
        print(f"| {name} | {r['load_s']:.1f} s | {r['total_s']:.0f} s | {r['step_s']:.0f} s "
              f"| {r['peak_mib'] / 1024:.1f} GiB |")


if __name__ == "__main__":
    main()
