"""``python -m bench``: our engine against diffusers/transformers (and stable-diffusion.cpp) on the same
full-size SD1.5-shaped weights, in the same run, interleaved (ours, peer, ours, peer, ...), each
figure the median of --runs after a warm-up, printed as seconds and as the ratio ours/peer.
Appends the tables to bench/results/runs.md (see its header for how to read them); docs/BENCHMARKS.md
keeps the current figures.

    python -m bench --quick                       # 256² only, no whole pipelines (about 7 minutes on 2 busy cores)
    python -m bench --sizes 256,512 --dtypes float32,bfloat16
    python -m bench --only unet --sizes 512 --dtypes float32
    python -m bench --only pipelines --pipelines 256:4 --sdcpp
    python -m bench --model sdxl --only unet,vae --sizes 768 --dtypes float32
    python -m bench --model sdxl --only pipelines --pipelines 512:1:0      # SDXL-Turbo's use: 1 step, no guidance
"""
import argparse
import copy
import gc
import math
import re
import shlex
import shutil
import sys
import time
from dataclasses import replace

import numpy as np
import torch

from bench.util import (CACHE, NEGATIVE, PROMPT, ROOT, Stats, cfg_step_inputs, drop_page_cache, fmt, log,
                        loadavg, machine_info, paired_ratios, run_worker, sd15_files, sdxl_checkpoint)

SECTIONS = ("load", "rss", "http", "unet", "vae", "text", "pipelines")
# The weights measured on (--model): a full-size random checkpoint and its diffusers-folder twin, the sizes
# measured by default, and the budget of a generation's memory above the loaded model (MiB)
MODELS = {"sd15": dict(files=sd15_files, sizes="256,512",
                       pipelines="256:4,512:20", rss_budget=1536, rss_steps=2, peer="StableDiffusionPipeline"),
          "sdxl": dict(files=sdxl_checkpoint, sizes="768", pipelines="512:4,512:1:0", rss_budget=2560, rss_steps=1,
                       peer="StableDiffusionXLPipeline")}


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=MODELS, default="sd15",
                   help="sd15 (default): SD1.5's shapes; sdxl: SDXL base's (sd_xl_base_1.0), 6.9 GB, built once")
    p.add_argument("--quick", action="store_true", help="256² only (unless --sizes), no whole pipelines")
    p.add_argument("--sizes", help="image sizes for the UNet step and VAE decode (default 256,512; --quick: 256)")
    p.add_argument("--dtypes", help="network dtypes (default CPU: float32,bfloat16; CUDA: float16,bfloat16)")
    p.add_argument("--runs", type=int, default=3, help="timed runs of each after the warm-up (default 3)")
    p.add_argument("--only", help=f"comma-separated sections to run, of {','.join(SECTIONS)} (default all but "
                                  "pipelines; pipelines also when --pipelines is given)")
    p.add_argument("--pipelines", nargs="?", const="default", metavar="SIZE:STEPS[:CFG],...",
                   help="whole txt2img (euler_a, CFG 7 unless given) vs diffusers' pipeline (sd15: default 256:4, and "
                        "512:20 without --quick; sdxl: 512:4,512:1:0)")
    p.add_argument("--sdcpp", action="store_true",
                   help="also stable-diffusion.cpp in the whole-pipeline section, beside ours in the server's default "
                        "dtype (installs stable-diffusion-cpp-python into .cache/bench/sdcpp-venv on first use; "
                        "compiles for several minutes)")
    p.add_argument("--sdcpp-wtype", default="default", help="stable-diffusion.cpp weight type (default: the file's)")
    p.add_argument("--compile", nargs="?", const="default", metavar="MODE,...",
                   help="also time our UNet compiled, in each of the given modes: default (torch.compile, inductor "
                        "with frozen weights), reduce-overhead (the same with torch's CUDA graphs), ours (the server's "
                        "--compile: StableDiffusion.compile); the whole pipelines too, with ours. Compile time reported "
                        "apart. Without a value: default")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, help="torch CPU threads (default torch's: the cores)")
    p.add_argument("--peak-tflops", type=float,
                   help="the device's dense matmul peak in the measured dtype, to print the fraction of it a step reaches")
    p.add_argument("--out", default="bench/results/runs.md", help="Markdown file the run is appended to "
                                                                  "(default bench/results/runs.md)")
    args = p.parse_args(argv)
    cpu = not args.device.startswith("cuda")
    args.compile = args.compile.split(",") if args.compile else []
    if not set(args.compile) <= set(COMPILE_MODES):
        p.error(f"--compile: unknown mode(s) {sorted(set(args.compile) - set(COMPILE_MODES))}")
    model = MODELS[args.model]
    args.sizes = [int(s) for s in (args.sizes or ("256" if args.quick else model["sizes"])).split(",")]
    if args.sdcpp and args.pipelines is None:
        args.pipelines = "default"
    dtypes = (args.dtypes or ("float32,bfloat16" if cpu else "float16,bfloat16")).split(",")
    args.dtypes = sorted(dtypes, key=lambda d: d != "float32")  # float32 first: the reference for the others
    args.only = set((args.only or ",".join(s for s in SECTIONS if s != "pipelines" or args.pipelines)).split(","))
    if args.pipelines in (None, "default"):
        args.pipelines = model["pipelines"].split(",")[0] if args.quick else model["pipelines"]
    args.pipelines = [(*(int(v) for v in spec.split(":")[:2]), float((spec.split(":") + ["", "7"])[2] or 7))
                      for spec in args.pipelines.split(",")]
    if not args.only <= set(SECTIONS):
        p.error(f"--only: unknown section(s) {sorted(args.only - set(SECTIONS))}")
    return args


class Report:
    """Rows of one run, grouped by section, rendered as Markdown."""

    def __init__(self):
        self.rows, self.notes = [], []

    def add(self, section, what, ours: Stats, peer: Stats | None = None, peer_name="", note=""):
        self.rows.append(dict(section=section, what=what, ours=ours, peer=peer, peer_name=peer_name, note=note))
        ratio = f"  ratio {ours.median / peer.median:.2f}" if peer and peer.seconds else ""
        log(f"{section} | {what}: ours {ours}" + (f" | {peer_name} {peer}{ratio}" if peer else "") +
            (f" | {note}" if note else ""))

    def markdown(self) -> str:
        out = []
        for section in dict.fromkeys(r["section"] for r in self.rows):
            out += [f"\n#### {section}\n", "| measurement | ours: median [min–max] | peer | peer: median [min–max] | "
                    "ours/peer (medians) | ours/peer per round | notes |", "|---|---|---|---|---|---|---|"]
            for r in (r for r in self.rows if r["section"] == section):
                ours, peer = r["ours"], r["peer"]
                ratio = rounds = "–"
                if peer is not None and peer.seconds:
                    ratio = f"**{ours.median / peer.median:.2f}**"
                    pr = paired_ratios(ours, peer)
                    rounds = f"{min(pr):.2f}–{max(pr):.2f}" if len(pr) > 1 else "–"
                out.append(f"| {r['what']} | {ours} | {r['peer_name'] or '–'} | {peer if peer else '–'} | {ratio} | "
                           f"{rounds} | {r['note']} |")
        return "\n".join(out) + "\n"


# ------------------------------------------------------------------------------------------------
# Load time and memory: fresh processes (bench/workers.py)
# ------------------------------------------------------------------------------------------------
def memory_dtype(args) -> str:
    """The one dtype the load and memory sections measure: float32 when asked for, else the first."""
    return "float32" if "float32" in args.dtypes else args.dtypes[0]


def weights_bytes(ckpt, dtype: str) -> int:
    """Bytes of the checkpoint's floating-point weights in ``dtype`` (what a load into that dtype allocates)."""
    from safetensors import safe_open
    with safe_open(str(ckpt), framework="pt") as f:
        slices = [f.get_slice(k) for k in f.keys()]
        n = sum(math.prod(s.get_shape()) for s in slices if s.get_dtype().startswith(("F", "BF")))
    return n * getattr(torch, dtype).itemsize


def bench_load(rep, args, ckpt, folder):
    """ours ``sdcore.load_model`` vs reading the file's bytes, and vs diffusers loading the same weights
    from a diffusers folder (fp16 variant), each in a fresh process (imports not timed), warm and cold;
    ours three ways: converting in memory, from the converted-weights cache (memory-mapped), and the
    first load that fills that cache."""
    dtype = memory_dtype(args)
    n_bytes = weights_bytes(ckpt, dtype)
    cached, filling = CACHE / f"weights-cache-{args.model}-{dtype}", CACHE / "weights-cache-first"
    tasks = {"read": ("read", ckpt), "ours": ("load-ours", ckpt, dtype, args.device),
             "ours mapped": ("load-ours", ckpt, dtype, args.device, cached),
             "ours first": ("load-ours", ckpt, dtype, args.device, filling),
             "diffusers": ("load-diffusers", folder, dtype, args.device), "touch": ("touch", n_bytes)}
    if args.device == "cpu":
        run_worker(*tasks["ours mapped"])                   # the cache holds this checkpoint's conversion
    else:                                                   # a GPU load copies to the card: no cache
        del tasks["ours mapped"], tasks["ours first"]
    reads = {"read": [ckpt], "ours": [ckpt], "ours mapped": sorted(cached.rglob("*.safetensors")), "ours first": [ckpt],
             "diffusers": sorted(folder.rglob("*.safetensors")), "touch": []}
    for cache in ("warm", "cold"):
        if cache == "cold" and not drop_page_cache():
            rep.notes.append("Cold-cache loads were not measured: emptying the page cache needs root.")
            break
        todo = tasks if cache == "warm" else {n: t for n, t in tasks.items() if n != "touch"}   # touch reads nothing
        res = {name: [] for name in todo}
        for _ in range(args.runs):
            for name, task in todo.items():
                if name == "ours first":
                    shutil.rmtree(filling, ignore_errors=True)
                if cache == "cold":
                    drop_page_cache()
                else:        # this task's files into the page cache just before it: all of them do not fit at once
                    for f in reads[name]:
                        run_worker("read", f)
                res[name].append(run_worker(*task))
        secs = {n: Stats([r["seconds"] for r in v]) for n, v in res.items()}
        size_gib = ckpt.stat().st_size / 2 ** 30
        rep.add("load", f"load {dtype}, {cache} page cache: ours converting in memory vs raw read of the file "
                        f"({size_gib:.2f} GiB)",
                secs["ours"], secs["read"], "read the bytes", f"read {size_gib / secs['read'].median:.2f} GiB/s")
        rep.add("load", f"load {dtype}, {cache} page cache: ours vs diffusers", secs["ours"], secs["diffusers"],
                "diffusers from_pretrained (diffusers folder, fp16 variant)")
        if "ours mapped" in secs:
            rep.add("load", f"load {dtype}, {cache} page cache: ours from the converted-weights cache vs raw read of "
                    f"the file", secs["ours mapped"], secs["read"], "read the bytes", "the converted networks "
                    "memory-mapped, every page faulted in (the server's default on the CPU; cold: read from disk)")
            rep.add("load", f"load {dtype}, {cache} page cache: ours' first load, converting and writing the cache, vs "
                    f"converting in memory", secs["ours first"], secs["ours"], "ours without the cache",
                    "once per checkpoint and dtype; the write is fsynced")
        if cache == "warm":
            rep.add("load", f"load {dtype}, warm page cache: ours vs only faulting in fresh memory of the weights' size",
                    secs["ours"], secs["touch"], f"allocate and fill {n_bytes / 2 ** 30:.2f} GiB",
                    "the floor of any load that builds the weights in new memory (a dtype conversion must): "
                    "one page fault per 4 KiB page")
            peak = {n: Stats([r["peak"] for r in v], "MiB") for n, v in res.items()}
            base = {n: Stats([r["base"] for r in v], "MiB") for n, v in res.items()}
            last = {n: v[-1] for n, v in res.items()}
            rep.add("memory", f"peak RSS of the loading process ({dtype})", peak["ours"], peak["diffusers"], "diffusers",
                    f"after imports: ours {fmt(base['ours'].median, 'MiB')}, diffusers {fmt(base['diffusers'].median, 'MiB')}; "
                    f"after the load: ours {fmt(last['ours']['anon'], 'MiB')} anonymous + {fmt(last['ours']['file'], 'MiB')} "
                    f"mapped file pages, diffusers {fmt(last['diffusers']['anon'], 'MiB')} + "
                    f"{fmt(last['diffusers']['file'], 'MiB')}"
                    + (f"; ours from the converted-weights cache peaks at {fmt(peak['ours mapped'].median, 'MiB')}"
                       if "ours mapped" in peak else ""))


def bench_rss(rep, args, ckpt, folder):
    """Peak RSS of a whole generation (the model's rss_steps, the largest size) in a fresh process, ours vs diffusers: of
    the process (load included), and of the generation alone against the budget (the loaded model + the
    model's rss_budget)."""
    dtype, size = memory_dtype(args), max(args.sizes)
    steps = MODELS[args.model]["rss_steps"]
    res = {"ours": run_worker("gen-ours", ckpt, dtype, args.device, size, steps),
           "diffusers": run_worker("gen-diffusers", folder, dtype, args.device, size, steps)}
    loaded = {n: r["base"] + r["weights_rss"] for n, r in res.items()}
    rep.add("memory", f"peak RSS, load + {size}² txt2img ({steps} step{'s' * (steps > 1)}, {dtype})",
            Stats([res["ours"]["peak"]], "MiB"), Stats([res["diffusers"]["peak"]], "MiB"), "diffusers",
            f"the peak is the load's (ours {fmt(res['ours']['load_peak'], 'MiB')}, diffusers "
            f"{fmt(res['diffusers']['load_peak'], 'MiB')}), mapped file pages counted; RSS after the load, above the "
            f"imports: ours {fmt(res['ours']['weights_rss'], 'MiB')} (of it mapped file pages "
            f"{fmt(res['ours']['weights_file'], 'MiB')}), diffusers {fmt(res['diffusers']['weights_rss'], 'MiB')} "
            f"({fmt(res['diffusers']['weights_file'], 'MiB')})")
    above = {n: Stats([r["gen_peak"] - loaded[n]], "MiB") for n, r in res.items()}
    rep.add("memory", f"peak RSS of the {size}² txt2img alone, above the loaded model ({dtype})", above["ours"],
            above["diffusers"], "diffusers",
            f"budget {MODELS[args.model]['rss_budget']} MiB; VmHWM reset after the load: ours peaks at "
            f"{fmt(res['ours']['gen_peak'], 'MiB')}, "
            f"diffusers {fmt(res['diffusers']['gen_peak'], 'MiB')}")


def bench_workers(rep, args, ckpt):
    """Memory of two gunicorn workers serving the checkpoint: each converting its own weights, vs both
    mapping the converted-weights cache (the server's default)."""
    from bench.server import Server
    dtype, pss = memory_dtype(args), {}
    for name, cache in (("converting", "off"), ("cached", str(CACHE / "weights-cache"))):
        srv = Server(model=ckpt, threads=1, SD_WORKERS="2", SD_DTYPE=dtype, SD_WEIGHTS_CACHE=cache)
        try:
            pss[name] = srv.worker_pss(2)
        finally:
            srv.stop()
    rep.add("memory", f"2 gunicorn workers on the checkpoint ({dtype}), sum of their PSS: mapping the converted-weights "
            f"cache vs each converting", Stats([sum(pss["cached"])], "MiB"), Stats([sum(pss["converting"])], "MiB"),
            "each worker converting its own copy",
            f"per worker {', '.join(fmt(x, 'MiB') for x in pss['cached'])} vs "
            f"{', '.join(fmt(x, 'MiB') for x in pss['converting'])}: "
            "the mapped weights are page cache, one copy shared by every worker")


def bench_parallel(rep, args, ckpt):
    """Two requests sent at once to one server (the checkpoint in the server's default dtype, 256², 4
    steps), until both images are back: two workers (each taking half the cores; a worker leaves a new
    connection to the one that handles fewer) vs one worker (the second request waits)."""
    from concurrent.futures import ThreadPoolExecutor

    from bench.server import Server
    res = {}
    for workers in (2, 1):
        srv = Server(model=ckpt, SD_WORKERS=str(workers), SD_WEIGHTS_CACHE=str(CACHE / "weights-cache"))
        try:
            srv.wait_workers(workers)
            times = []
            for i in range(args.runs + 1):                # the first pair warms both workers up
                t0 = time.perf_counter()
                with ThreadPoolExecutor(2) as pool:
                    list(pool.map(lambda _: srv.generate(256, 4, "b64_json"), range(2)))
                times.append(time.perf_counter() - t0)
            res[workers] = Stats(times[1:])
            pids = re.findall(r"\[(\d+)\] INFO [\w.]+: request \S+: generating", srv.log_text())
            if workers == 2:
                spread = sum(a != b for a, b in zip(pids[::2], pids[1::2]))
        finally:
            srv.stop()
    rep.add("http", "two 256² txt2img requests at once (4 steps, SD1.5-shaped), until both are back: 2 workers vs 1",
            res[2], res[1], "1 worker (the second request waits)",
            f"with 2 workers {spread} of {args.runs + 1} pairs ran one request per worker; torch threads split among "
            "the workers")


def bench_http(rep, args):
    """End-to-end latency through a real gunicorn on the tiny default model, minus the pipeline time
    the server logs ("done in X s", 10 ms resolution; it includes the PNG encoding)."""
    from bench.server import Server
    srv = Server(threads=torch.get_num_threads())
    try:
        for size in (512,):
            fmts = {"b64_json": lambda: srv.generate(size, 1, "b64_json"),
                    "url": lambda: srv.generate(size, 1, "url", download=True)}
            for f in fmts.values():
                f()                                           # warm-up
            res = {name: [] for name in fmts}
            for _ in range(args.runs):
                for name, f in fmts.items():
                    res[name].append(f())
            for name, rs in res.items():
                over = Stats([r["e2e"] - r["pipeline"] for r in rs])
                note = (f"end to end {Stats([r['e2e'] for r in rs])}, pipeline (server log) "
                        f"{Stats([r['pipeline'] for r in rs])}, response body {rs[0]['bytes']:,} bytes")
                if name == "url":
                    note += f"; then GET of the PNG {Stats([r['download'] for r in rs])}"
                rep.add("http", f"HTTP overhead, {size}² (tiny default model, 1 step), response_format={name}", over, note=note)
    finally:
        srv.stop()


# ------------------------------------------------------------------------------------------------
# Networks and pipelines: in this process, ours and the peer holding the same weights
# ------------------------------------------------------------------------------------------------
def flops(module_fn) -> float:
    """FLOPs of one call, counted on the meta device (nothing computed)."""
    from torch.utils.flop_counter import FlopCounterMode
    with torch.device("meta"), FlopCounterMode(display=False) as fc:
        module_fn()
    return fc.get_total_flops()


def rel_err(a, b) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def timed_pair(args, ours, peer, runs=None, extra=None):
    """Warm-up (whose outputs are returned for the agreement check), then interleaved runs."""
    from bench.util import interleave
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    with torch.inference_mode():
        out = ours(), peer(), *(f() for f in (extra or {}).values())
        fns = {"ours": ours, "peer": peer, **(extra or {})}
        return out, interleave(fns, runs or args.runs, warmup=0, sync=sync)


def gflops_note(args, n_flops, ours: Stats, peer: Stats) -> str:
    note = (f"{n_flops / 1e12:.3f} TFLOP; ours {n_flops / ours.median / 1e9:.0f} GFLOP/s, "
            f"diffusers {n_flops / peer.median / 1e9:.0f} GFLOP/s")
    if args.peak_tflops:
        note += f"; {n_flops / ours.median / 1e12 / args.peak_tflops:.1%} of the {args.peak_tflops} TFLOP/s peak"
    return note


COMPILE_MODES = {"default": "torch.compile", "reduce-overhead": "torch.compile (mode reduce-overhead: its CUDA graphs)",
                 "ours": "--compile (StableDiffusion.compile: torch.compile, on CUDA + a CUDA graph per shape)"}


def without_cuda_graphs(model):
    """A copy of ``model`` that runs its UNet eagerly, or None where it replays no CUDA graphs anyway."""
    from sdcore.cuda_graphs import unwrapped
    plain = unwrapped(model.unet)
    if plain is model.unet:
        return None
    model = copy.copy(model)
    model.unet = plain
    return model


def compiled_unet(model, mode, x, t, ctx):
    """(a call of ``model``'s UNet compiled in ``mode`` (COMPILE_MODES), inductor with frozen weights;
    its compile + first call in s)."""
    from torch._inductor import config as inductor_config
    inductor_config.freezing = True
    if mode == "ours":
        compiled = copy.copy(model).compile().unet
    else:
        from sdcore.cuda_graphs import unwrapped
        compiled = torch.compile(unwrapped(model.unet), mode=None if mode == "default" else mode)
    # CUDA graphs replay into the same output buffer: keep each result apart (a copy of [1, 4, h, w])
    call = (lambda: compiled(x, t, ctx).clone()) if mode == "reduce-overhead" else (lambda: compiled(x, t, ctx))
    t0 = time.perf_counter()
    with torch.inference_mode():                # as the timed calls (a change of grad mode recompiles)
        call()
    if x.is_cuda:
        torch.cuda.synchronize()
    return call, time.perf_counter() - t0


def bench_networks(rep, args, model, refs, dtype, fp32_out):
    from sdcore.unet import UNet
    from sdcore.vae import AutoencoderKL
    du, dv, dt, _ = refs
    dev, dt_ = args.device, getattr(torch, dtype)
    g = torch.Generator().manual_seed(0)
    for size in args.sizes if "unet" in args.only else ():
        x, x_pair, t, ctx, kw, peer_kw = cfg_step_inputs(size, dt_, dev, cfg=model.unet.cfg)
        # the FLOPs of the whole batch-2 step (diffusers' work; ours skips the shared part's second copy)
        meta = lambda v: v.to("meta", torch.float32)
        n = flops(lambda: UNet(model.unet.cfg)(meta(x_pair), t.to("meta"), meta(ctx), **{k: meta(v) for k, v in kw.items()}))
        extra, compile_notes = {}, {}
        for mode in args.compile:
            extra[f"compiled {mode}"], compile_notes[mode] = compiled_unet(model, mode, x, t, ctx)
        eager = without_cuda_graphs(model)
        if eager is not None:
            extra["no graphs"] = lambda: eager.unet(x, t, ctx, **kw)
        (o, p, *c), st = timed_pair(args, lambda: model.unet(x, t, ctx, **kw),
                                    lambda: du(x_pair, t, encoder_hidden_states=ctx, **peer_kw).sample, extra=extra)
        outs = dict(zip(extra, c))
        for mode in args.compile:
            rep.add("unet", f"UNet step, batch 2 (CFG), {size}², {dtype}, ours under {COMPILE_MODES[mode]}",
                    st[f"compiled {mode}"],
                    st["peer"], "diffusers UNet2DConditionModel (SDPA), eager",
                    f"agree with ours eager: max rel {rel_err(outs[f'compiled {mode}'], o):.1e}; compile + first call "
                    f"{fmt(compile_notes[mode])};" + gflops_note(args, n, st[f"compiled {mode}"], st["peer"]).partition(";")[2])
        note = f"agree: max rel {rel_err(o, p):.1e}; " + gflops_note(args, n, st["ours"], st["peer"])
        if dtype == "float32":
            fp32_out[("unet", size)] = o.float().cpu()
        elif ("unet", size) in fp32_out:
            note += f"; vs ours float32: max rel {rel_err(o.cpu(), fp32_out[('unet', size)]):.1e}"
        if eager is not None:
            note += "; ours replays its CUDA graph (the default on CUDA)"
        rep.add("unet", f"UNet step, batch 2 (CFG), {size}², {dtype}", st["ours"], st["peer"],
                "diffusers UNet2DConditionModel (SDPA)", note)
        if eager is not None:
            rep.add("unet", f"UNet step, batch 2 (CFG), {size}², {dtype}, ours eager without CUDA graphs (--no-cuda-graphs)",
                    st["no graphs"], st["peer"], "diffusers UNet2DConditionModel (SDPA)",
                    f"agree with ours (CUDA graphs): max rel {rel_err(outs['no graphs'], o):.1e};"
                    + gflops_note(args, n, st["no graphs"], st["peer"]).partition(";")[2])
    for size in args.sizes if "vae" in args.only else ():
        z = torch.randn(1, 4, size // 8, size // 8, generator=g).to(dev, dt_)
        scale = model.vae.cfg.scale_factor
        (o, p), st = timed_pair(args, lambda: model.vae.decode(z), lambda: dv.decode(z / scale).sample)
        n = flops(lambda: AutoencoderKL(model.vae.cfg).decode(z.to("meta", torch.float32)))
        note = f"agree: max rel {rel_err(o, p):.1e}; " + gflops_note(args, n, st["ours"], st["peer"])
        if dtype == "float32":
            fp32_out[("vae", size)] = o.float().cpu()
        elif ("vae", size) in fp32_out:
            px = ((o.float().cpu().clamp(-1, 1) - fp32_out[("vae", size)].clamp(-1, 1)).abs().mean() * 127.5).item()
            note += f"; vs ours float32: mean abs pixel diff {px:.2f}/255"
        rep.add("vae", f"VAE decode, {size}², {dtype}", st["ours"], st["peer"], "diffusers AutoencoderKL", note)
    if "text" in args.only and args.model != "sd15":
        rep.notes.append("Text encoding is timed on SD1.5's encoder only (SDXL's two are measured by the pipelines).")
    elif "text" in args.only:
        from bench.util import clip_tokenizer
        tok = clip_tokenizer()
        prompts = [PROMPT, NEGATIVE]

        def peer():
            ids = tok(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
            return dt(ids.to(dev)).last_hidden_state

        (o, p, *_), st = timed_pair(args, lambda: model.encode_text(prompts), peer, runs=max(args.runs, 5))
        rep.add("text", f"text encoding, 2 prompts (tokenizer + CLIP), {dtype}", st["ours"], st["peer"],
                "transformers CLIPTokenizer + CLIPTextModel", f"agree: max rel {rel_err(o, p):.1e}")


def bench_pipelines(rep, args, model, refs, dtype, fp32_images, sdcpp=None):
    """Whole txt2img (euler_a, CFG 7, one image), ours ``generate`` vs diffusers' StableDiffusionPipeline on
    the same modules (and stable-diffusion.cpp on the same file)."""
    from bench.peers import pipeline, run_pipeline
    from sdcore.pipeline import GenerationParams, generate
    pipe = pipeline(*refs)
    peer_name = MODELS[args.model]["peer"]
    compiled = copy.copy(model).compile() if "ours" in args.compile else None
    for size, steps, cfg in args.pipelines:
        params = GenerationParams(PROMPT, NEGATIVE, width=size, height=size, steps=steps, seed=1, sample_method="euler_a",
                                  cfg_scale=cfg)
        extra = {"sdcpp": lambda: sdcpp.generate(size, steps)} if sdcpp is not None else {}
        if compiled is not None:
            t0 = time.perf_counter()
            generate(compiled, replace(params, steps=1))
            compile_s = time.perf_counter() - t0
            extra["compiled"] = lambda: generate(compiled, params)[0].image
        eager = without_cuda_graphs(model)
        if eager is not None:
            extra["no graphs"] = lambda: generate(eager, params)[0].image
        (o, p, *c), st = timed_pair(args, lambda: generate(model, params)[0].image,
                                    lambda: run_pipeline(pipe, size, steps, cfg=cfg), extra=extra)
        px = lambda a, b: float(np.abs(np.asarray(a, dtype=np.float32) - np.asarray(b, dtype=np.float32)).mean())
        outs = dict(zip(extra, c))
        note = f"mean abs pixel diff ours vs diffusers {px(o, p):.2f}/255"
        if dtype == "float32":
            fp32_images[(size, steps, cfg)] = (o, p)
        elif (size, steps, cfg) in fp32_images:
            o32, p32 = fp32_images[(size, steps, cfg)]
            note += f"; vs float32: ours {px(o, o32):.2f}/255, diffusers {px(p, p32):.2f}/255"
        what = f"txt2img {size}², {steps} steps euler_a, CFG {cfg:g}"
        rep.add("pipelines", f"{what}, {dtype}", st["ours"], st["peer"], f"diffusers {peer_name}", note)
        if compiled is not None:
            rep.add("pipelines", f"{what}, {dtype}, ours with --compile", st["compiled"],
                    st["peer"], f"diffusers {peer_name}",
                    f"mean abs pixel diff vs ours eager {px(outs['compiled'], o):.2f}/255; "
                    f"compile + capture (a 1-step image) {fmt(compile_s)}")
        if eager is not None:
            rep.add("pipelines", f"{what}, {dtype}, ours without CUDA graphs", st["no graphs"],
                    st["peer"], f"diffusers {peer_name}",
                    f"mean abs pixel diff vs ours (CUDA graphs) {px(outs['no graphs'], o):.2f}/255")
        if sdcpp is not None:
            rep.add("pipelines", f"{what}: ours {dtype} vs stable-diffusion.cpp",
                    st["ours"], st["sdcpp"], f"stable-diffusion.cpp ({args.sdcpp_wtype} weights)",
                    f"sd.cpp load {fmt(sdcpp.load_s)}, peak RSS {fmt(sdcpp.peak, 'MiB')}")


# ------------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    args = parse_args(argv)
    import diffusers
    import transformers
    diffusers.utils.logging.set_verbosity_error()        # dtype-cast and scheduler-config chatter
    transformers.utils.logging.set_verbosity_error()
    if args.threads:
        torch.set_num_threads(args.threads)
    command = "python -m bench " + " ".join(map(shlex.quote, sys.argv[1:] if argv is None else argv))
    started, load_start = time.time(), loadavg()
    info = machine_info(args.device)
    log(f"{command}\n{info}")
    ckpt, folder = MODELS[args.model]["files"]()
    rep = Report()
    if args.model != "sd15":
        rep.notes.append(f"Weights: {ckpt.name} ({args.model} base shapes), its diffusers twin {folder.name}.")
    if "load" in args.only:
        bench_load(rep, args, ckpt, folder)
    if "rss" in args.only:
        bench_rss(rep, args, ckpt, folder)
        if args.device == "cpu" and args.model == "sd15":   # the cache is a CPU load's; two SDXL copies do not fit
            bench_workers(rep, args, ckpt)
    if "http" in args.only:
        bench_http(rep, args)
        bench_parallel(rep, args, ckpt)
    sdcpp, sdcpp_dtype = None, None
    if "pipelines" in args.only and args.sdcpp:
        from sdcore.device import resolve_dtype
        from bench.sdcpp import SdCpp
        sdcpp = SdCpp(ckpt, threads=torch.get_num_threads(), wtype=args.sdcpp_wtype)
        default = str(resolve_dtype("auto", args.device)).removeprefix("torch.")
        sdcpp_dtype = default if default in args.dtypes else args.dtypes[0]   # beside what our server runs
    fp32_out, fp32_images = {}, {}
    if args.only & {"unet", "vae", "text", "pipelines"}:
        import sdcore
        from bench.peers import reference_modules
        for dtype in args.dtypes:
            log(f"loading ours and the references in {dtype}")
            model = sdcore.load_model(str(ckpt), device=args.device, dtype=getattr(torch, dtype))
            refs = tuple(m if m is None else m.to(args.device, getattr(torch, dtype)) for m in reference_modules(model))
            bench_networks(rep, args, model, refs, dtype, fp32_out)
            if "pipelines" in args.only:
                bench_pipelines(rep, args, model, refs, dtype, fp32_images, sdcpp if dtype == sdcpp_dtype else None)
            del model, refs
            gc.collect()
    if sdcpp is not None:
        sdcpp.close()
    write_markdown(args, command, info, rep, load_start, time.time() - started)
    return 0


HEADER = """# Benchmarks

Produced by `bench/` (`python -m bench --help`); not part of the test suite. Every figure compares our
engine with the peer a user would pick instead, **in the same run, interleaved** (ours, peer, ours,
peer, ...; the first call of each is a warm-up and also checks that both compute the same thing), on the
**same weights**: a full-size SD1.5-shaped checkpoint with random weights (single-file LDM layout, fp16
on disk, `.cache/sd15-random-v1.safetensors`; random weights cost exactly what real ones do), handed to
diffusers/transformers through our own layout map (`bench/references.py`). Figures are median [min–max] of
the timed runs; the ratio is ours/peer of the medians (below 1: we are faster), and "per round" the
range of the ratios of the pairs that ran back to back. The machines these runs come from are shared
(the load average is recorded): read the ratios, not the absolute seconds.
"""


def write_markdown(args, command, info, rep, load_start, duration):
    out = ROOT / args.out
    machine = (f"{info['cpu']}, {info['cores']} cores ({info['cpu_features']}), {info['memory']} RAM; "
               f"torch {info['torch']} (threads: {info['torch_threads']}, {info['torch_cpu_capability']}), "
               f"diffusers {info['diffusers']}, transformers {info['transformers']}, Python {info['python']}; "
               f"device {info['device']}" + (f" ({info['gpu']})" if "gpu" in info else ""))
    block = [f"\n## Run of {time.strftime('%Y-%m-%d %H:%M', time.localtime())}\n", f"```\n{command}\n```\n",
             f"- machine: {machine}",
             f"- load average (1/5/15 min) at the start: {load_start}; at the end: {loadavg()}; "
             f"the run took {duration / 60:.1f} min",
             f"- runs: warm-up + {args.runs} timed (text encoding: at least 5)"]
    if args.threads:
        block.append(f"- torch threads set to {args.threads} (`--threads`) in this process, the load/memory workers and "
                     "the gunicorn worker")
    block += [f"- {n}" for n in rep.notes]
    text = "\n".join(block) + "\n" + rep.markdown()
    old = out.read_text() if out.exists() else HEADER
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(old.rstrip("\n") + "\n" + text)
    log(f"wrote {out}")
