"""stable-diffusion.cpp through stable-diffusion-cpp-python, in its own virtual environment (no torch,
nothing of ours imported): ``sdcpp-venv/bin/python bench/sdcpp_worker.py CHECKPOINT THREADS [WTYPE]``.

Loads the model, prints {"load_s", "rss", "peak"}; then for every JSON line on stdin
({"size", "steps", "seed", "sampler"}) generates one image and prints {"seconds", "rss", "peak",
"png"} (png: where the image was saved). An empty line or EOF ends it."""
import inspect
import json
import os
import sys
import tempfile
import time


def mem(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main(path, threads, wtype="default"):
    from stable_diffusion_cpp import StableDiffusion
    t0 = time.perf_counter()
    kw = dict(model_path=path, n_threads=int(threads), wtype=wtype, vae_decode_only=True, verbose=False)
    accepted = inspect.signature(StableDiffusion.__init__).parameters
    sd = StableDiffusion(**{k: v for k, v in kw.items() if k in accepted})
    print(json.dumps({"load_s": time.perf_counter() - t0, "rss": mem("VmRSS"), "peak": mem("VmHWM")}), flush=True)
    gen_params = inspect.signature(sd.generate_image).parameters
    out_dir = tempfile.mkdtemp(prefix="sdcpp-")
    for line in sys.stdin:
        if not line.strip():
            break
        req = json.loads(line)
        kw = dict(prompt=req["prompt"], negative_prompt=req["negative"], width=req["size"], height=req["size"],
                  cfg_scale=req.get("cfg", 7.0), seed=req.get("seed", 1), sample_method=req.get("sampler", "euler_a"))
        kw["sample_steps" if "sample_steps" in gen_params else "steps"] = req["steps"]
        t0 = time.perf_counter()
        images = sd.generate_image(**{k: v for k, v in kw.items() if k in gen_params})
        seconds = time.perf_counter() - t0
        png = os.path.join(out_dir, f"{req['size']}-{req['steps']}-{req.get('seed', 1)}.png")
        images[0].save(png)
        print(json.dumps({"seconds": seconds, "rss": mem("VmRSS"), "peak": mem("VmHWM"), "png": png}), flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
