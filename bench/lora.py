"""What adapters and long prompts cost, on the full-size SD1.5-shaped checkpoint (python -m bench.lora).

  apply       a change of adapter set: read the file, match its layers, merge (after restoring the last set)
  same set    a request asking for the set already applied
  remove      copying the originals back
  originals   memory held while the adapter is on
  prompt      encoding a 3-chunk prompt against a 1-chunk one, interleaved
  LCM         a 512² image in 4 steps of the lcm sampler at cfg 1 with an LCM-LoRA-shaped adapter, against
              20 steps of euler_a at cfg 7 without it: the fastest useful path on a CPU

The adapter has LCM-LoRA SD1.5's shape (rank 64 over the attention, feed-forward, ResBlock and resampler
layers) with random weights, so the times are real and the images are noise. Results print as markdown.
"""
import argparse
import time

import torch

import sdcore
from bench.lora_files import write_lora
from bench.util import CACHE, Stats, fmt, interleave, log, machine_info, sd15_checkpoint
from sdcore.lora import apply_loras, remove_loras
from sdcore.pipeline import GenerationParams, generate

LONG_PROMPT = ", ".join(["a detailed photograph of a lighthouse on a rocky coast at dusk with waves"] * 12)


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--no-images", action="store_true", help="skip the LCM and 20-step images")
    args = ap.parse_args(argv)
    info = machine_info("cpu")
    model = sdcore.load_model(sd15_checkpoint(), device="cpu", dtype=args.dtype, cuda_graphs=False)
    adapter = CACHE / "lcm-lora-sd15-shaped.safetensors"
    if not adapter.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        log(f"writing {adapter} (once)")
        write_lora(adapter, model, convolutions=True, rank=64, seed=0)
    mib = adapter.stat().st_size / 2 ** 20
    rows = []
    apply, same, remove = Stats(), Stats(), Stats()
    for _ in range(args.runs):
        apply.seconds.append(timed(lambda: apply_loras(model, [(str(adapter), 1.0)])))
        same.seconds.append(timed(lambda: apply_loras(model, [(str(adapter), 1.0)])))
        held = sum(t.numel() * t.element_size() for t in model.lora_originals.values()) / 2 ** 20
        changed = len(model.lora_originals)
        remove.seconds.append(timed(lambda: remove_loras(model)))
    rows += [(f"apply (a change of set; file {mib:.0f} MiB, {changed} weights changed)", str(apply)),
             ("same set again", str(same)), ("remove", str(remove)),
             ("originals held while on", f"{held:.0f} MiB")]
    one, three = "a lighthouse on a rocky coast at dusk", LONG_PROMPT
    chunks = len(model.encode_text([three])[0]) // 77
    enc = interleave({"1": lambda: model.encode_text([one, ""]), "3": lambda: model.encode_text([three, ""])},
                     runs=args.runs * 3)
    rows.append((f"prompt + negative: {chunks} chunks vs 1", f"{fmt(enc['3'].median)} vs {fmt(enc['1'].median)} "
                 f"= {enc['3'].median / enc['1'].median:.2f}×"))
    if not args.no_images:
        lcm = GenerationParams("a lighthouse", steps=4, cfg_scale=1.0, sample_method="lcm", seed=1,
                               loras=[(str(adapter), 1.0)])
        base = GenerationParams("a lighthouse", steps=20, cfg_scale=7.0, sample_method="euler_a", seed=1)
        t_lcm = timed(lambda: generate(model, lcm))                  # includes applying the adapter
        t_lcm_again = timed(lambda: generate(model, lcm))
        remove_loras(model)
        t_base = timed(lambda: generate(model, base))
        rows += [("512² LCM: 4 steps, cfg 1, with the LCM-LoRA (first request, applying it)", fmt(t_lcm)),
                 ("512² LCM: the same again (adapter already on)", fmt(t_lcm_again)),
                 ("512² euler_a: 20 steps, cfg 7, no adapter", fmt(t_base)),
                 ("LCM speed-up", f"{t_base / t_lcm_again:.1f}×")]
    print(f"\n{info.get('cpu', '')}, {torch.get_num_threads()} threads, {model.dtype}, torch {torch.__version__}\n")
    print("| measured | value |\n|---|---|")
    for name, value in rows:
        print(f"| {name} | {value} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
