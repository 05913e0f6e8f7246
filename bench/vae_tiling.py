"""Tiled VAE decode against the whole decode: ``python -m bench.vae_tiling [--sizes 1024] [--out FILE]``.

For each VAE and size, the same latent is decoded three ways, each in a fresh process so that its peak
resident memory is its own: whole (its full-resolution layers in bands of rows, sdcore.vae.in_bands, as
the server decodes), whole at once (every layer over the whole map, the bands turned off), and in tiles
(sdcore.tiling). Figures: seconds, the peak RSS above the process's RSS before the decode, and the pixel
difference from the whole decode (mean and max, 0-255). The VAEs: the
default model's (trained, so its images and their difference mean something) and the full-size
SD1.5-shaped one of bench.util's random checkpoint (the memory and time of a real-sized decoder). The
latent is a trained VAE's encoding of a smooth random picture, so that it looks like a real latent.
"""
import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time

import torch


def _status_mib(key: str) -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":")) / 1024


MODES = ("whole", "at_once", "tiled")


def child(path: str, size: int, mode: str, out: str) -> None:
    """One decode in this process; writes the image and its figures to ``out``."""
    import sdcore
    from sdcore import tiling, vae
    if mode == "at_once":
        vae.BAND_BYTES = float("inf")
    model = sdcore.load_model(path, device="cpu", dtype=torch.float32)
    default = sdcore.load_model("weights/shapes-sd1.safetensors", device="cpu", dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    picture = torch.nn.functional.interpolate(torch.rand(1, 3, 12, 12, generator=g) * 2 - 1, size=(size, size),
                                              mode="bicubic").clamp(-1, 1)
    with torch.inference_mode():
        latent = default.vae.encode(picture) / default.vae.cfg.scale_factor * model.vae.cfg.scale_factor
        del default
        before = _status_mib("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:         # "5": the peak (VmHWM) starts again from now
            f.write("5")
        t0 = time.perf_counter()
        image = tiling.decode(model.vae, latent) if mode == "tiled" else model.vae.decode(latent).float()
        seconds = time.perf_counter() - t0
    peak = _status_mib("VmHWM")
    torch.save({"image": ((image.clamp(-1, 1) + 1) * 127.5).round(), "seconds": seconds, "peak": peak - before}, out)


def measure(path: str, size: int) -> dict:
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in MODES:
            out = os.path.join(tmp, f"{mode}.pt")
            subprocess.run([sys.executable, "-m", "bench.vae_tiling", "--child", path, str(size), mode, out], check=True)
            rows[mode] = torch.load(out)
    diff = {mode: (rows[mode]["image"] - rows["whole"]["image"]).abs() for mode in MODES[1:]}
    return {**{f"{mode}_s": rows[mode]["seconds"] for mode in MODES}, **{f"{mode}_mib": rows[mode]["peak"] for mode in MODES},
            **{f"{mode}_mean": d.mean().item() for mode, d in diff.items()},
            **{f"{mode}_max": d.max().item() for mode, d in diff.items()}}


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="1024")
    ap.add_argument("--out", default="bench/results/runs.md")
    ap.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        path, size, mode, out = a.child
        return child(path, int(size), mode, out)
    from bench.util import sd15_checkpoint
    vaes = {"default model (trained)": "weights/shapes-sd1.safetensors", "SD1.5-shaped (random)": sd15_checkpoint()}
    lines = [f"\n## VAE tiling, {datetime.datetime.now():%Y-%m-%d %H:%M}, {torch.get_num_threads()} threads, float32\n",
             "| VAE | size | whole s | at once s | tiled s | whole peak MiB | at once peak MiB | tiled peak MiB "
             "| at once diff mean / max | tiled diff mean / max |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, path in vaes.items():
        for size in map(int, a.sizes.split(",")):
            r = measure(path, size)
            print(json.dumps({"vae": name, "size": size, **r}), flush=True)
            lines.append(f"| {name} | {size}² | " + " | ".join(f"{r[m + '_s']:.1f}" for m in MODES) + " | "
                         + " | ".join(f"{r[m + '_mib']:.0f}" for m in MODES) + " | "
                         + " | ".join(f"{r[m + '_mean']:.2f} / {r[m + '_max']:.0f}" for m in MODES[1:]) + " |")
    with open(a.out, "a") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
