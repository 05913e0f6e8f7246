"""Distil a TAESD decoder (sdcore.taesd.TinyDecoder) for the embedded default model:
``python -m weights.train_taesd [--steps 1500] [--out weights/shapes-taesd.safetensors]``.

The teacher is the default model's own VAE decoder; the data its training pictures (weights/shapes.py),
encoded by its VAE. The student learns decode(latent) -> the teacher's picture, by mean squared error in
[-1, 1] (the released TAESDs were trained with adversarial and perceptual terms as well; for flat shapes
the squared error is enough). The file is saved in the released TAESD layout, float16.
"""
from __future__ import annotations

import argparse
import math
import time

import torch
from safetensors.torch import save_file

from api.config import TRAINED_MODEL, WEIGHTS_DIR
from sdcore import load_model
from sdcore.taesd import TinyDecoder, decode

from .shapes import batch

OUT = WEIGHTS_DIR / "shapes-taesd.safetensors"


def teacher_pairs(vae, seed: int, count: int, chunk: int = 256):
    """(latents [count, 4, 8, 8], the teacher's pictures [count, 3, 64, 64] in [-1, 1])."""
    latents, pictures = [], []
    with torch.inference_mode():
        for start in range(0, count, chunk):
            images, _ = batch(seed, start, min(chunk, count - start))
            z = vae.encode(images)
            latents.append(z)
            pictures.append(vae.decode(z).clamp(-1, 1))
    return torch.cat(latents), torch.cat(pictures)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """In dB, for pictures in [-1, 1] (peak-to-peak 2)."""
    return 10 * math.log10(4 / ((a - b) ** 2).mean().item())


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--train-size", type=int, default=8192)
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    vae = load_model(TRAINED_MODEL, device="cpu", dtype="float32").vae
    t0 = time.monotonic()
    z, x = teacher_pairs(vae, seed=0, count=args.train_size)
    z_test, x_test = teacher_pairs(vae, seed=1, count=512)
    print(f"teacher pairs: {len(z)} train, {len(z_test)} held out ({time.monotonic() - t0:.0f} s)", flush=True)
    student = TinyDecoder(4)
    opt = torch.optim.Adam(student.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=args.steps, pct_start=0.05)
    g = torch.Generator().manual_seed(0)
    for step in range(1, args.steps + 1):
        idx = torch.randint(0, len(z), (args.batch,), generator=g)
        loss = ((student(z[idx]) * 2 - 1 - x[idx]) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0 or step == args.steps:
            with torch.inference_mode():
                held = psnr(decode(student, z_test), x_test)
            print(f"step {step}: loss {loss.item():.5f}, held-out PSNR against the VAE {held:.1f} dB "
                  f"({time.monotonic() - t0:.0f} s)", flush=True)
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in student.state_dict().items()}
    save_file(state, args.out, metadata={"sdcore.teacher": TRAINED_MODEL.name, "sdcore.steps": str(args.steps)})
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
