"""The rectified-flow families against their references: ``python -m bench.flow [--runs 2] [--size 512]
[--dtypes float32,bfloat16] [--only mmdit,t5,flux,flux-q8,rss]`` (prints markdown).

* mmdit: one SD3-medium transformer call at full size (24 blocks of 1536, 2.0 B parameters), ours against
  diffusers' SD3Transformer2DModel holding the same random weights (converted by diffusers' own single-file
  converter), at ``--size``² with the 333 text tokens of a T5 request, a guided pair (batch 2).
* t5: T5-XXL at full width (4096, 64 heads, feed-forward 10240) and ``--t5-layers`` of its 24 blocks, ours
  against transformers' T5EncoderModel, 256 tokens, batch 2 (the prompt and the negative one). The cost per
  block is the same at any depth: the ratio is the whole encoder's.
* flux: the transformer at full width (3072, heads of 128) with ``--flux-blocks`` double and as many single
  blocks, ours against diffusers' FluxTransformer2DModel, ``--size``², 512 text tokens, batch 1 (FLUX runs one
  pass per step).

* flux-q8: the same FLUX blocks read from one Q8_0 GGUF (random blocks), their linear layers kept as Q8_0 and
  expanded per call (``quantized_weights="keep"``) against the file dequantized at load: the ratio less 1 is the
  cost of the expansion per step.

* rss: in a fresh process per dtype, the full-size SD3-medium transformer loaded from its float16 single file
  (bench.util.sd3_medium_transformer, 4.2 GB) as the server loads it, then one guided step at ``--size``²: the
  load time, the step time, and the process's peak resident memory (VmHWM: the file's mapped pages count while they
  are read) and its own memory after the step (RssAnon).

Rounds are interleaved (ours, theirs, ours, ...) so a change in the machine's load hits both; the ratio column is
ours ÷ theirs of the medians.
"""
from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import time

import torch

from bench.util import interleave, log, machine_info
from sdcore.formats.write import random_init_


def _pair(fns_ours, fns_theirs, runs):
    stats = interleave({"ours": fns_ours, "theirs": fns_theirs}, runs)
    return stats["ours"], stats["theirs"]


def mmdit(size: int, dtype, runs: int):
    from diffusers import SD3Transformer2DModel
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

    from sdcore.mmdit import MMDiT, MMDiTConfig
    cfg = MMDiTConfig(depth=24, width=1536, pos_embed_max_size=192)
    with torch.no_grad():
        ours = random_init_(MMDiT(cfg), 0).to(dtype).eval()
        theirs = SD3Transformer2DModel(sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
                                       num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                                       pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192)
        state = convert_sd3_transformer_checkpoint_to_diffusers(
            {"model.diffusion_model." + k: v for k, v in ours.state_dict().items()})
        theirs.load_state_dict(state)
        theirs = theirs.to(dtype).eval()
        del state
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 16, size // 8, size // 8, generator=g).to(dtype)
    ctx, y = torch.randn(2, 333, 4096, generator=g).to(dtype), torch.randn(2, 2048, generator=g).to(dtype)
    t = torch.tensor([700.0, 700.0])
    with torch.inference_mode():
        return _pair(lambda: ours(x, t, ctx, y),
                     lambda: theirs(x, encoder_hidden_states=ctx, pooled_projections=y, timestep=t), runs)


def t5(layers: int, dtype, runs: int):
    import transformers

    from sdcore.t5 import T5Config, T5Encoder
    hf_cfg = transformers.T5Config(vocab_size=32128, d_model=4096, d_kv=64, num_heads=64, d_ff=10240, num_layers=layers,
                                   feed_forward_proj="gated-gelu", attn_implementation="sdpa")
    with torch.no_grad():
        theirs = random_init_(transformers.T5EncoderModel(hf_cfg), 0).eval()
        ours = T5Encoder(T5Config(layers=layers)).eval()
        ours.load_state_dict({k: v for k, v in theirs.state_dict().items() if k != "encoder.embed_tokens.weight"})
        ours, theirs = ours.to(dtype), theirs.to(dtype)
    ids = torch.randint(0, 32000, (2, 256), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        return _pair(lambda: ours(ids), lambda: theirs(ids).last_hidden_state, runs)


def flux(size: int, blocks: int, dtype, runs: int):
    from diffusers import FluxTransformer2DModel

    from sdcore.flux import Flux, FluxConfig, pack
    from sdcore.formats.files import Tensors
    from sdcore.formats.layouts import flux_from_diffusers
    with torch.no_grad():
        theirs = random_init_(FluxTransformer2DModel(num_layers=blocks, num_single_layers=blocks, guidance_embeds=True), 0)
        named = Tensors()
        for k, v in theirs.state_dict().items():
            named.add(k, lambda v=v: v, v.shape)
        ours = Flux(FluxConfig(depth=blocks, depth_single=blocks)).eval()
        ours.load_state_dict({k: thunk() for k, (thunk, _) in flux_from_diffusers(named).entries.items()})
        ours, theirs = ours.to(dtype), theirs.eval().to(dtype)
    g = torch.Generator().manual_seed(0)
    img, img_ids = pack(torch.randn(1, 16, size // 8, size // 8, generator=g))
    img = img.to(dtype)
    txt, y = torch.randn(1, 512, 4096, generator=g).to(dtype), torch.randn(1, 768, generator=g).to(dtype)
    txt_ids, t, guidance = torch.zeros(1, 512, 3), torch.tensor([0.7]), torch.tensor([3.5])
    with torch.inference_mode():
        return _pair(lambda: ours(img, img_ids, txt, txt_ids, t, y, guidance),
                     lambda: theirs(hidden_states=img, encoder_hidden_states=txt, pooled_projections=y, timestep=t,
                                    img_ids=img_ids[0], txt_ids=txt_ids[0], guidance=guidance), runs)


def flux_q8(size: int, blocks: int, dtype, runs: int):
    """The same FLUX blocks from one Q8_0 GGUF: weights kept as Q8_0 and expanded per call ("ours") against the
    same file dequantized at load ("reference")."""
    import tempfile

    from bench.flux_gguf import write_q8_gguf
    from sdcore.flux import Flux, FluxConfig, pack
    from sdcore.formats.build import build
    from sdcore.formats.checkpoints import FLUX_LAYOUT, read_transformer
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in Flux(FluxConfig(depth=blocks, depth_single=blocks)).state_dict().items()}
    with tempfile.TemporaryDirectory() as d:
        path = f"{d}/flux-Q8_0.gguf"
        write_q8_gguf(path, shapes, "flux", 0)
        part = read_transformer(path, FLUX_LAYOUT)
        kept = build(Flux, part.cfg, part.tensors, "cpu", dtype, "FLUX", path, keep_quantized=True)
        dense = build(Flux, part.cfg, part.tensors, "cpu", dtype, "FLUX", path)
        g = torch.Generator().manual_seed(0)
        img, img_ids = pack(torch.randn(1, 16, size // 8, size // 8, generator=g))
        img, txt, y = img.to(dtype), torch.randn(1, 512, 4096, generator=g).to(dtype), torch.randn(1, 768, generator=g).to(dtype)
        args = (img, img_ids, txt, torch.zeros(1, 512, 3), torch.tensor([0.7]), y, torch.tensor([3.5]))
        with torch.inference_mode():
            return _pair(lambda: kept(*args), lambda: dense(*args), runs)


def _status_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) / 1024


def rss_child(dtype_name: str, size: int) -> None:
    from bench.util import sd3_medium_transformer
    from sdcore.formats.build import build
    from sdcore.formats.checkpoints import MMDIT, read_transformer
    from sdcore.mmdit import MMDiT
    path, _ = sd3_medium_transformer()
    t0 = time.perf_counter()
    part = read_transformer(str(path), MMDIT)
    net = build(MMDiT, part.cfg, part.tensors, "cpu", getattr(torch, dtype_name), "MMDiT", str(path))
    load = time.perf_counter() - t0
    dtype = getattr(torch, dtype_name)
    x = torch.randn(1, 16, size // 8, size // 8).to(dtype)
    ctx, y = torch.randn(2, 333, 4096).to(dtype), torch.randn(2, 2048).to(dtype)
    with torch.inference_mode():
        t0 = time.perf_counter()
        net(x, torch.tensor([700.0, 700.0]), ctx, y)
        step = time.perf_counter() - t0
    print(json.dumps({"load_s": load, "step_s": step, "peak_mib": _status_mib("VmHWM"), "anon_mib": _status_mib("RssAnon")}))


def rss(size: int, dtypes: list[str]) -> list[tuple]:
    from bench.util import ROOT, sd3_medium_transformer
    sd3_medium_transformer()                               # built (once) before any measurement
    rows = []
    for name in dtypes:
        out = subprocess.run([sys.executable, "-m", "bench.flow", "--rss-child", name, "--size", str(size)], cwd=ROOT,
                             capture_output=True, text=True, check=True)
        rows.append((name, json.loads(out.stdout.strip().splitlines()[-1])))
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--only", default="mmdit,t5,flux")
    ap.add_argument("--t5-layers", type=int, default=4)
    ap.add_argument("--flux-blocks", type=int, default=2)
    ap.add_argument("--rss-child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.rss_child:
        return rss_child(args.rss_child, args.size)
    log(machine_info("cpu"))
    rows = []
    if "rss" in args.only.split(","):
        print(f"\n| SD3-medium transformer from its float16 file | load | one guided step, {args.size}² | peak RSS "
              "| own memory after |")
        print("|---|---|---|---|---|")
        for name, r in rss(args.size, args.dtypes.split(",")):
            print(f"| {name} | {r['load_s']:.1f} s | {r['step_s']:.1f} s | {r['peak_mib'] / 1024:.1f} GiB "
                  f"| {r['anon_mib'] / 1024:.1f} GiB |")
    for name in args.only.split(","):
        if name == "rss":
            continue
        for dtype_name in args.dtypes.split(","):
            dtype = getattr(torch, dtype_name)
            log(f"{name} {dtype_name} ...")
            if name == "mmdit":
                what, (o, t) = f"MMDiT SD3-medium (24 blocks), {args.size}², batch 2", mmdit(args.size, dtype, args.runs)
            elif name == "t5":
                what = f"T5-XXL width, {args.t5_layers} of 24 blocks, 256 tokens, batch 2"
                o, t = t5(args.t5_layers, dtype, args.runs)
            elif name == "flux":
                what, (o, t) = (f"FLUX width, {args.flux_blocks}+{args.flux_blocks} blocks, {args.size}², 512 tokens",
                                flux(args.size, args.flux_blocks, dtype, args.runs))
            else:
                what = (f"FLUX width, {args.flux_blocks}+{args.flux_blocks} blocks, {args.size}², Q8_0 kept vs "
                        "dequantized at load")
                o, t = flux_q8(args.size, args.flux_blocks, dtype, args.runs)
            rows.append((what, dtype_name, o, t))
            log(f"{what}, {dtype_name}: ours {o}, reference {t}, ratio {o.median / t.median:.2f}")
            gc.collect()
    if not rows:
        return
    print("\n| network | dtype | ours, median [min–max] | reference | ours ÷ reference |")
    print("|---|---|---|---|---|")
    for what, dtype_name, o, t in rows:
        print(f"| {what} | {dtype_name} | {o} | {t} | {o.median / t.median:.2f} |")


if __name__ == "__main__":
    main()
