"""Previews and TAESD: ``python -m bench.previews [--runs 5] [--images 16]`` (prints markdown).

* Speed: one 512×512 decode (a 64×64 latent) by the full-size SD1.5-shaped VAE decoder, by TAESD and by the
  fitted projection, float32, interleaved rounds on the same latent; random weights (the work is the
  shapes', not the values').
* Quality: on the embedded default model, the final latents of ``--images`` generations (20 euler steps)
  decoded by its VAE, by the TAESD distilled for it (weights/shapes-taesd.safetensors) and by the
  projection (upscaled to the image size): PSNR against the VAE's image, and the mean absolute pixel
  difference (0-255).
"""
from __future__ import annotations

import argparse

import torch

from bench.util import interleave, log, machine_info

PROMPTS = ["a red circle on a blue background", "a green square on a yellow background, on the left",
           "a blue triangle on a white background, on the right", "a yellow circle on a black background"]


def speed(runs: int) -> dict:
    from sdcore import previews
    from sdcore.taesd import TinyDecoder, decode
    from sdcore.vae import AutoencoderKL, VAEConfig
    torch.manual_seed(0)
    vae, tiny = AutoencoderKL(VAEConfig()).eval(), TinyDecoder(4).eval()
    matrix = torch.randn(5, 3) * 0.2
    latent = torch.randn(1, 4, 64, 64)
    with torch.inference_mode():
        stats = interleave({"VAE": lambda: vae.decode(latent), "TAESD": lambda: decode(tiny, latent),
                            "projection": lambda: previews.project(matrix, latent)}, runs)
    return stats


def quality(images: int) -> dict:
    import sdcore.pipeline as pipeline
    from api.config import TRAINED_MODEL
    from sdcore import load_model, previews, taesd
    from sdcore.model import attach_taesd
    from weights.train_taesd import OUT, psnr
    model = load_model(TRAINED_MODEL, device="cpu", dtype="float32")
    attach_taesd(model, str(OUT))
    latents = []
    real = pipeline.decode_latent
    pipeline.decode_latent = lambda m, x: latents.append(x) or real(m, x)
    try:
        for i in range(images):
            pipeline.generate(model, pipeline.GenerationParams(PROMPTS[i % len(PROMPTS)], steps=20, seed=100 + i,
                                                               sample_method="euler", width=64, height=64))
    finally:
        pipeline.decode_latent = real
    out = {"TAESD": [], "projection": []}
    with torch.inference_mode():
        matrix = previews.projection(model)
        for z in latents:
            want = model.vae.decode(z).clamp(-1, 1)
            fast = taesd.decode(model.taesd, z)
            rough = previews.project(matrix, z)
            rough = torch.nn.functional.interpolate(rough, size=want.shape[-2:], mode="bilinear", align_corners=False)
            for name, got in (("TAESD", fast), ("projection", rough)):
                out[name].append((psnr(got, want), ((got - want).abs() * 127.5).mean().item()))
    return {name: (sum(p for p, _ in v) / len(v), sum(d for _, d in v) / len(v)) for name, v in out.items()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--images", type=int, default=16)
    args = ap.parse_args(argv)
    log(f"{machine_info('cpu')}")
    stats = speed(args.runs)
    vae = stats["VAE"]
    print("\n| decode of a 512×512 image (64×64 latent), float32 | median [min–max] | VAE ÷ this |")
    print("|---|---|---|")
    for name, s in stats.items():
        print(f"| {name} | {s} | {vae.median / s.median:.1f}× |")
    q = quality(args.images)
    print(f"\n| default model, {args.images} generations (20 euler steps, 64×64) | PSNR vs the VAE's image "
          "| mean abs. difference (0-255) |")
    print("|---|---|---|")
    for name, (p, d) in q.items():
        print(f"| {name} | {p:.1f} dB | {d:.1f} |")


if __name__ == "__main__":
    main()
