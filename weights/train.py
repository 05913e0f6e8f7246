"""Trains the default model from scratch on the procedural shapes data set (weights/shapes.py) with
our own networks — the same UNet, AutoencoderKL and TextEncoder classes that serve — and writes it
as an SD1 single-file checkpoint.

    python -m weights.train                       # the committed model's recipe (resumes if interrupted)
    python -m weights.train --vae-steps 20 --unet-steps 20 --batch 8 --out /tmp/t.safetensors   # smoke run

Stages: (1) the VAE (MSE on the posterior mean), (2) the latent scale factor measured as
1/std of the latents, (3) UNet + text encoder jointly on precomputed latents (eps prediction, SD's
scaled-linear schedule, 10 % empty captions for classifier-free guidance, EMA of the UNet).
Deterministic for a given seed; a state file under --work lets an interrupted run resume.
"""
import argparse
import copy
import hashlib
import json
import math
import os
import time

import torch
import torch.nn.functional as F

from sdcore.clip import TextConfig, TextEncoder
from sdcore.formats.write import save_single_file
from sdcore.tokenizer import Tokenizer
from sdcore.unet import UNet, UNetConfig
from sdcore.vae import AutoencoderKL, VAEConfig
from weights import shapes

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "shapes-sd1.safetensors")
UNET = UNetConfig(model_channels=64, channel_mult=(1, 2, 2), num_res_blocks=2, attention_levels=(0, 1),
                  transformer_depth=(1, 1, 0), transformer_depth_middle=1, num_heads=4, context_dim=128)
VAE = VAEConfig(ch=32, ch_mult=(1, 2, 2, 2), num_res_blocks=1, norm_groups=8)   # 32 groups of 1 channel lose the colour
TEXT = TextConfig(width=128, layers=4, heads=4)          # SD1 conventions: quick_gelu, last layer, eos padding


def alphas_cumprod():
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0).float()


def vae_loss(vae, x):
    # Trained as a plain autoencoder on the posterior mean (sampling z with a near-zero KL weight
    # left the decoder fighting unit-variance latent noise for thousands of steps: PSNR stuck near
    # 10 dB). MSE, not L1 + an edge term: measured over 200 steps, MSE reached 15 dB where L1 + edge
    # reached 10.7 after 300. A light L2 pull on the latent keeps its scale bounded; stage 2 measures it.
    mean = vae.quant_conv(vae.encoder(x)).chunk(2, dim=1)[0]
    rec = vae.decoder(vae.post_quant_conv(mean))
    return F.mse_loss(rec, x) + 1e-4 * mean.pow(2).mean(), rec


def psnr(a, b):
    mse = ((a.clamp(-1, 1) - b) ** 2).mean() / 4           # on the [0, 1] scale
    return (10 * torch.log10(1 / mse)).item()


def save_state(path, state):
    torch.save(state, path + ".tmp")
    os.replace(path + ".tmp", path)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--vae-steps", type=int, default=1500)
    ap.add_argument("--vae-batch", type=int, default=24)
    ap.add_argument("--unet-steps", type=int, default=6000)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--pool", type=int, default=30000, help="latents precomputed for stage 3")
    ap.add_argument("--lr", type=float, default=6e-4)
    ap.add_argument("--work", default=os.path.join(os.path.dirname(HERE), ".cache", "train"))
    ap.add_argument("--out", default=OUT)
    ap.add_argument("--log-every", type=int, default=50)
    ap.add_argument("--save-every", type=int, default=250)
    args = ap.parse_args(argv)
    os.makedirs(args.work, exist_ok=True)
    # the state file is keyed by everything that shapes the run except its length: --unet-steps can
    # be raised and the run resumed (the UNet's learning rate is constant after warm-up for that reason)
    tag = hashlib.sha256(json.dumps({k: v for k, v in vars(args).items()
                                     if k not in ("out", "work", "log_every", "save_every", "unet_steps")},
                                    sort_keys=True).encode()).hexdigest()[:10]
    state_path = os.path.join(args.work, f"state-{tag}.pt")
    torch.manual_seed(args.seed)
    vae, unet, text = AutoencoderKL(VAE), UNet(UNET), TextEncoder(TEXT)
    ema = copy.deepcopy(unet).requires_grad_(False)
    opt_vae = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    opt = torch.optim.AdamW([*unet.parameters(), *text.parameters()], lr=args.lr, weight_decay=0.01)
    st = {"stage": "vae", "step": 0, "log": []}
    if os.path.exists(state_path):
        st = torch.load(state_path, weights_only=False)
        for module, key in ((vae, "vae"), (unet, "unet"), (text, "text"), (ema, "ema"), (opt_vae, "opt_vae"), (opt, "opt")):
            module.load_state_dict(st[key])
        print(f"resumed {state_path}: stage {st['stage']} step {st['step']}", flush=True)

    def checkpoint(**extra):
        st.update(extra, vae=vae.state_dict(), unet=unet.state_dict(), text=text.state_dict(), ema=ema.state_dict(),
                  opt_vae=opt_vae.state_dict(), opt=opt.state_dict())
        save_state(state_path, st)

    t0 = time.time()
    # -- stage 1: the autoencoder ---------------------------------------------------------------
    held_out = shapes.batch(args.seed + 1, 0, 64)[0]
    while st["stage"] == "vae" and st["step"] < args.vae_steps:
        step = st["step"]
        lr = 1e-3 * min(1.0, (step + 1) / 100) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / args.vae_steps)))
        for group in opt_vae.param_groups:
            group["lr"] = lr
        x, _ = shapes.batch(args.seed, step * args.vae_batch, args.vae_batch)
        loss, _ = vae_loss(vae, x)
        opt_vae.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt_vae.step()
        st["step"] += 1
        entry = {"stage": "vae", "step": st["step"], "loss": loss.item()}     # every step: the loss curve
        st["log"].append(entry)
        if st["step"] % args.log_every == 0 or st["step"] == args.vae_steps:     # the held-out check costs more
            with torch.no_grad():
                val = entry["psnr"] = psnr(vae.decode(vae.encode(held_out)), held_out)
            print(f"vae step {st['step']}/{args.vae_steps} loss {loss.item():.4f} held-out PSNR {val:.2f} dB "
                  f"({time.time() - t0:.0f} s)", flush=True)
        if st["step"] % args.save_every == 0:
            checkpoint()
    if st["stage"] == "vae":
        # -- stage 2: the latent scale factor, and the latent pool ------------------------------
        vae.eval().requires_grad_(False)
        lat, caps = [], []
        with torch.no_grad():
            for start in range(0, args.pool, 500):
                x, c = shapes.batch(args.seed + 2, start, min(500, args.pool - start))
                lat.append(vae.quant_conv(vae.encoder(x)).chunk(2, dim=1)[0])
                caps += c
        lat = torch.cat(lat)
        scale = (1 / lat.std()).item()
        print(f"latent std {lat.std():.4f} -> scale factor {scale:.5f}", flush=True)
        checkpoint(stage="unet", step=0, scale=scale, pool=lat * scale, captions=caps)
    vae.cfg.scale_factor = st["scale"]
    vae.eval().requires_grad_(False)
    # -- stage 3: UNet + text encoder -----------------------------------------------------------
    tok = Tokenizer()                                       # SD1: pads with eos, as the loader will
    unique = sorted(set(st["captions"])) + [""]
    ids = tok(unique)
    index = {c: i for i, c in enumerate(unique)}
    cap_idx = torch.tensor([index[c] for c in st["captions"]])
    pool, ac = st["pool"], alphas_cumprod()
    while st["step"] < args.unet_steps:
        step = st["step"]
        g = torch.Generator().manual_seed(args.seed * 104729 + step)
        for group in opt.param_groups:
            group["lr"] = args.lr * min(1.0, (step + 1) / 200)
        pick = torch.randint(0, len(pool), (args.batch,), generator=g)
        x0, tokens = pool[pick], ids[cap_idx[pick]]
        drop = torch.rand(args.batch, generator=g) < 0.1    # empty captions teach the unconditional branch
        tokens[drop] = ids[index[""]]
        t = torch.randint(0, 1000, (args.batch,), generator=g)
        eps = torch.randn(x0.shape, generator=g)
        a = ac[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * eps
        loss = F.mse_loss(unet(xt, t.float(), text(tokens)), eps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([*unet.parameters(), *text.parameters()], 1.0)
        opt.step()
        with torch.no_grad():
            decay = min(0.999, (1 + step) / (10 + step))
            for pe, p in zip(ema.parameters(), unet.parameters()):
                pe.lerp_(p, 1 - decay)
        st["step"] += 1
        st["log"].append({"stage": "unet", "step": st["step"], "loss": loss.item()})
        if st["step"] % args.log_every == 0 or st["step"] == args.unet_steps:
            print(f"unet step {st['step']}/{args.unet_steps} loss {loss.item():.4f} ({time.time() - t0:.0f} s)", flush=True)
        if st["step"] % args.save_every == 0:
            checkpoint()
            export(args, st, ema, vae, text)
    checkpoint()
    return export(args, st, ema, vae, text)


def export(args, st, ema, vae, text):
    """Writes the checkpoint (EMA UNet) with the training summary in its metadata."""
    losses = [e["loss"] for e in st["log"] if e["stage"] == "unet"]
    vae_log = [e for e in st["log"] if e["stage"] == "vae"]
    summary = {"seed": args.seed, "vae_steps": args.vae_steps, "unet_steps": st["step"], "batch": args.batch,
               "final_vae_psnr_db": round(vae_log[-1]["psnr"], 2) if vae_log else None,
               "final_unet_loss": round(sum(losses[-10:]) / max(1, len(losses[-10:])), 4) if losses else None,
               "scale_factor": round(st["scale"], 5)}
    tmp = args.out + ".tmp"
    save_single_file(tmp, ema, vae, text, family="sd1", dtype=torch.float16, native_size=64,
                     extra_metadata={"sdcore.training": json.dumps(summary, sort_keys=True)})
    os.replace(tmp, args.out)
    digest = hashlib.sha256(open(args.out, "rb").read()).hexdigest()
    print(f"wrote {args.out} ({os.path.getsize(args.out) / 1e6:.1f} MB) sha256 {digest}\n{json.dumps(summary)}", flush=True)
    return summary


if __name__ == "__main__":
    main()
