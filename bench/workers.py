"""Measurements that need a fresh process (load time, peak memory): ``python -m bench.workers TASK ARGS``.
Prints one JSON line: seconds of the measured call, and the process's memory (MiB): VmRSS after its
imports ("base"), after the call ("rss", of which "anon" is anonymous memory and "file" pages of mapped
files such as a checkpoint still mapped) and VmHWM, its peak ("peak"); the generation tasks also the peak
of the generation alone ("gen_peak": VmHWM reset after the load, through /proc/self/clear_refs)."""
import json
import os
import sys
import time
from pathlib import Path


def mem(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def reset_peak():
    """Start VmHWM again from the current RSS (Linux: writing 5 to clear_refs)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def loaded(out: dict, base: float, t0: float) -> float:
    """Record the load (seconds, memory, peak) and start the generation's own peak; -> its start time."""
    out.update(load_s=time.perf_counter() - t0, weights_rss=mem("VmRSS") - base, weights_file=mem("RssFile"),
               load_peak=mem("VmHWM"))
    reset_peak()
    return time.perf_counter()


def read(path):
    """The bytes of the file, as ``cat file > /dev/null`` reads them (one reused buffer)."""
    buf = bytearray(16 << 20)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while f.readinto(view):
            pass


def main(task, *args):
    import torch
    if os.environ.get("BENCH_THREADS"):
        torch.set_num_threads(int(os.environ["BENCH_THREADS"]))
    from bench.peers import pipeline_from_folder, run_pipeline
    if task.endswith("-ours"):                  # the engines' imports, before the clock starts
        import sdcore.pipeline  # noqa: F401
    elif task.endswith("-diffusers"):
        import diffusers.models  # noqa: F401
        import transformers.models.clip  # noqa: F401
        from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel  # noqa: F401
        from transformers import CLIPTextModel  # noqa: F401
    base = mem("VmRSS")
    out = {}
    t0 = time.perf_counter()
    if task == "read":
        read(args[0])
    elif task == "touch":                       # BYTES: the page faults of that much fresh memory, nothing read
        torch.empty(int(args[0]), dtype=torch.uint8).fill_(1)
    elif task == "load-ours":                   # PATH DTYPE DEVICE [CACHE_DIR: the converted-weights cache]
        import sdcore
        sdcore.load_model(args[0], device=args[2], dtype=getattr(torch, args[1]), cache_dir=(args[3:] or [None])[0])
    elif task == "load-diffusers":
        pipeline_from_folder(Path(args[0]), getattr(torch, args[1]), args[2])
    elif task == "gen-ours":                    # PATH DTYPE DEVICE SIZE STEPS [VAE_TILING]
        import sdcore
        from sdcore.pipeline import GenerationParams, generate
        from bench.util import NEGATIVE, PROMPT
        model = sdcore.load_model(args[0], device=args[2], dtype=getattr(torch, args[1]), vae_tiling=(args[5:] or ["auto"])[0])
        t0 = loaded(out, base, t0)
        generate(model, GenerationParams(PROMPT, NEGATIVE, width=int(args[3]), height=int(args[3]), steps=int(args[4]), seed=1))
    elif task == "gen-diffusers":               # FOLDER DTYPE DEVICE SIZE STEPS
        pipe = pipeline_from_folder(Path(args[0]), getattr(torch, args[1]), args[2])
        t0 = loaded(out, base, t0)
        run_pipeline(pipe, int(args[3]), int(args[4]))
    else:
        raise SystemExit(f"unknown task {task}")
    if "load_peak" in out:
        out["gen_peak"] = mem("VmHWM")
    out.update(seconds=time.perf_counter() - t0, base=base, rss=mem("VmRSS"), peak=max(mem("VmHWM"), out.get("load_peak", 0)),
               anon=mem("RssAnon"), file=mem("RssFile"))
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
