"""Writes the embedded default model, ``weights/tiny-sd1.safetensors``: a tiny random-weight checkpoint
in the exact SD1 single-file layout, with every block type present. Same bytes on every run.

    python -m weights.make_default [--force]
"""
import argparse
import hashlib
import os

import torch

from sdcore.clip import TextConfig, TextEncoder
from sdcore.formats.write import random_init_, save_single_file
from sdcore.unet import UNet, UNetConfig
from sdcore.vae import AutoencoderKL, VAEConfig

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_PATH = os.path.join(HERE, "tiny-sd1.safetensors")

# The smallest config that still has every LDM block type (docs/core.md, Checkpoint layouts).
UNET = UNetConfig(model_channels=32, channel_mult=(1, 1, 2, 2), num_res_blocks=2, attention_levels=(0, 1, 2),
                  transformer_depth=(1, 1, 1, 0), num_heads=8, context_dim=32)
VAE = VAEConfig(ch=32, ch_mult=(1, 1, 2, 2), num_res_blocks=2)
TEXT = TextConfig(width=32, layers=2, heads=2)


def build_tiny(seed=0):
    torch.manual_seed(seed)
    return (random_init_(UNet(UNET), seed + 1), random_init_(AutoencoderKL(VAE), seed + 2),
            random_init_(TextEncoder(TEXT), seed + 3))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--force", action="store_true", help="rewrite even if the file exists")
    ap.add_argument("--out", default=DEFAULT_PATH)
    args = ap.parse_args(argv)
    if args.force or not os.path.exists(args.out):
        tmp = args.out + ".tmp"
        save_single_file(tmp, *build_tiny(), family="sd1", dtype=torch.float16, native_size=64)
        os.replace(tmp, args.out)
    digest = hashlib.sha256(open(args.out, "rb").read()).hexdigest()
    print(f"{args.out}: {os.path.getsize(args.out) / 1e6:.1f} MB, sha256 {digest}")


if __name__ == "__main__":
    main()
