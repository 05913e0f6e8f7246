"""Correctness on a GPU (run by bench/gpu.sh on a lent card; CI has none): ``python -m bench.gpu_check``.

1. Every sampler, txt2img, and one img2img, with the embedded default model (trained, so its images
   mean something): the image generated on CUDA in float32, float16 and bfloat16 against the CPU
   float32 image of the same seed. The noise comes from a CPU generator, so a seed gives the same
   image on both; what differs is the arithmetic (TF32 convolutions, half precision). On CUDA the
   default model replays its UNet as CUDA graphs: every shape must have been captured.
2. The real server on CUDA, by default and with --compile: gunicorn started as in production, one
   b64_json generation over HTTP each.
3. The opt-in --compile path (inductor; on CUDA a CUDA graph per shape) against the eager image, at two
   sizes, with and without CFG, img2img, and called from a second thread.
4. The other paths through the UNet, against the CPU float32 image: a ControlNet (captured too; its
   residuals are inputs of the UNet's graph), a 9-channel inpainting UNet (captured with its mask
   channels) and a masked edit with the default model (the ControlNet and the inpainting UNet have random
   weights: none can be downloaded here; on the CPU their half-precision images lie 0.03-0.47/255 from
   float32).

``python -m bench.gpu_check [DEVICE [PART,...]]``, parts: pipeline, server, compiled, variants (default: all).

Prints one line per case (mean abs pixel difference, /255) and exits 1 when a float32 image differs
by more than FP32_LIMIT, a half-precision one by more than HALF_LIMIT, a compiled one from the eager one
by more than COMPILED_LIMIT, a default CUDA model ran a shape without its graph, or the server fails.
"""
import base64
import copy
import io
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import samplers
import sdcore
from sdcore.cuda_graphs import unwrapped
from sdcore.pipeline import GenerationParams, generate

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "weights" / "shapes-sd1.safetensors"
FP32_LIMIT, HALF_LIMIT, COMPILED_LIMIT = 1.0, 5.0, 1.0      # mean abs pixel difference, /255
# 20 steps: at a handful of steps this small model's image can flip to another mode (dpm2, 6 steps, seed 7:
# bfloat16 on the CPU turns the background from yellow to white, 73/255 from float32), which says
# nothing about the arithmetic. At 20 steps the CPU's own bfloat16 images of seeds 7-14 are within
# 0.2-4.1/255 of float32 for ipndm, 0.2-0.3 for euler; lcm, which re-noises its own prediction at every
# step (and this model is no LCM), spreads 0.3-9.6/255, so it gets a limit of its own.
LCM_HALF_LIMIT = 12.0


def pixel_diff(a: Image.Image, b: Image.Image) -> float:
    return float(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)).mean())


def cases():
    base = dict(prompt="a red circle on a blue background", negative_prompt="", width=64, height=64, steps=20, seed=7)
    for name in samplers.SAMPLERS:
        yield f"txt2img {name}", GenerationParams(**base, sample_method=name)
    init = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    yield "img2img euler_a", GenerationParams(**base, sample_method="euler_a", init_image=init, strength=0.6)


def check_pipeline(device) -> bool:
    ref = sdcore.load_model(str(MODEL), device="cpu", dtype=torch.float32)
    expected = {name: generate(ref, p)[0].image for name, p in cases()}
    ok = True
    for dtype, limit in ((torch.float32, FP32_LIMIT), (torch.float16, HALF_LIMIT), (torch.bfloat16, HALF_LIMIT)):
        model = sdcore.load_model(str(MODEL), device=device, dtype=dtype)
        for name, p in cases():
            d = pixel_diff(generate(model, p)[0].image, expected[name])
            case_limit = LCM_HALF_LIMIT if "lcm" in name and dtype != torch.float32 else limit
            ok &= bool(d <= case_limit)
            print(f"{'ok  ' if d <= case_limit else 'FAIL'} {name:<18} {device} {str(dtype)[6:]:<9} vs cpu float32: "
                  f"mean abs pixel diff {d:.2f}/255 (limit {case_limit})", flush=True)
        ok &= graphs_captured(model.unet, device)
    return ok


def graphs_captured(net, device) -> bool:
    """Print how many input shapes ``net`` (the UNet or ControlNet) replays as CUDA graphs; False on CUDA
    unless it is all of them."""
    graphs, name = getattr(net, "graphs", None), type(unwrapped(net)).__name__
    if graphs is None:
        print(f"{'FAIL' if device.startswith('cuda') else 'ok  '} CUDA graphs: none ({name} not wrapped)")
        return not device.startswith("cuda")
    captured = sum(g is not None for g in graphs.values())
    good = captured == len(graphs) > 0
    print(f"{'ok  ' if good else 'FAIL'} CUDA graphs: {captured} of {len(graphs)} input shapes of the {name} captured",
          flush=True)
    return good


def check_compiled(device) -> bool:
    """The --compile path (on CUDA: inductor + a CUDA graph per shape) draws the eager image: txt2img at
    two sizes, with CFG and without (cfg_scale 1: a batch of one), img2img, and from another thread."""
    eager = sdcore.load_model(str(MODEL), device=device, dtype=torch.float16)
    compiled = copy.copy(eager).compile()
    todo = [(name, p) for name, p in cases() if name in ("txt2img euler_a", "txt2img dpm++2m", "img2img euler_a")]
    todo += [("txt2img euler 96x64", GenerationParams("a red circle", width=96, height=64, steps=12, seed=5,
                                                      sample_method="euler")),
             ("txt2img euler cfg 1", GenerationParams("a red circle", width=64, height=64, steps=12, seed=5,
                                                      sample_method="euler", cfg_scale=1.0))]
    ok = True
    for name, p in todo:
        t0 = time.perf_counter()
        image = generate(compiled, p)[0].image
        first = time.perf_counter() - t0
        box = []
        thread = threading.Thread(target=lambda: box.append(generate(compiled, p)[0].image))
        thread.start()
        thread.join()
        expected = generate(eager, p)[0].image
        d, d_thread = pixel_diff(image, expected), pixel_diff(box[0], expected)
        good = d <= COMPILED_LIMIT and d_thread <= COMPILED_LIMIT
        ok &= good
        print(f"{'ok  ' if good else 'FAIL'} {name:<20} {device} float16 --compile vs eager: mean abs pixel diff "
              f"{d:.2f}/255, from another thread {d_thread:.2f}/255 (limit {COMPILED_LIMIT}; first call {first:.1f} s)",
              flush=True)
    return ok & graphs_captured(compiled.unet, device)


def check_server(device, compile: bool) -> bool:
    port = 18000 + os.getpid() % 1000 + compile
    how = "with --compile" if compile else "by default"
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, SD_DEVICE=device, SD_PORT=str(port), SD_DATA_DIR=tmp, API_KEY="",
                   SD_WEIGHTS_CACHE="off", SD_COMPILE=str(int(compile)))
        log = open(Path(tmp) / "server.log", "w+")
        server = subprocess.Popen([sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "wsgi:app"],
                                  cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 240          # --compile: compiled and captured before it answers
            while True:
                try:
                    urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5).read()
                    break
                except OSError:
                    if server.poll() is not None or time.monotonic() > deadline:
                        log.seek(0)
                        print("FAIL server did not start:\n" + log.read()[-3000:])
                        return False
                    time.sleep(0.5)
            body = json.dumps({"prompt": "a red circle", "size": "64x64", "steps": 4, "seed": 3,
                               "response_format": "b64_json"}).encode()
            req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/images/generations", body,
                                         {"Content-Type": "application/json"})
            t0 = time.perf_counter()
            reply = json.load(urllib.request.urlopen(req, timeout=120))
            seconds = time.perf_counter() - t0
            image = Image.open(io.BytesIO(base64.b64decode(reply["data"][0]["b64_json"])))
            log.seek(0)
            loaded = [line.strip() for line in log if "loaded model" in line or "compiled model" in line]
            print(f"ok   server on {device} {how}: {image.size} {image.mode} PNG in {seconds:.2f} s; "
                  + " / ".join(loaded))
            return image.size == (64, 64)
        except Exception as e:           # the HTTP error, the JSON or the image: all a failure here
            log.seek(0)
            print(f"FAIL server {how}: {e!r}\n" + log.read()[-3000:])
            return False
        finally:
            server.terminate()
            server.wait(30)


def check_variants(device) -> bool:
    import dataclasses

    from sdcore.controlnet import ControlNet
    from sdcore.formats.write import random_init_, save_controlnet, save_single_file
    from sdcore.unet import UNet
    base = sdcore.load_model(str(MODEL), device="cpu", dtype=torch.float32)
    circle = Image.new("RGB", (64, 64))
    circle.paste((255, 255, 255), (16, 16, 48, 48))
    photo = Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    mask = Image.new("RGBA", (64, 64), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (0, 0, 32, 64))                  # left half transparent: repaint it
    common = dict(prompt="a red circle on a blue background", width=64, height=64, steps=20, seed=7)
    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        control = Path(tmp) / "control.safetensors"
        save_controlnet(control, random_init_(ControlNet(base.unet.cfg), 21))
        inpaint = Path(tmp) / "inpaint.safetensors"
        unet9 = random_init_(UNet(dataclasses.replace(base.unet.cfg, in_channels=9)), 11)
        save_single_file(inpaint, unet9, base.vae, base.text_encoder)
        cases = [("controlnet", dict(control_net=str(control)), GenerationParams(**common, control_image=circle)),
                 ("inpainting unet", {}, GenerationParams(**common, init_image=photo, mask=mask, strength=1.0)),
                 ("masked edit", {}, GenerationParams(**common, init_image=photo, mask=mask, strength=0.7))]
        for name, load_kw, p in cases:
            path = str(inpaint if name == "inpainting unet" else MODEL)
            expected = generate(sdcore.load_model(path, **load_kw, device="cpu", dtype=torch.float32), p)[0].image
            for dtype in (torch.float32, torch.float16, torch.bfloat16):
                model = sdcore.load_model(path, device=device, dtype=dtype, **load_kw)
                d = pixel_diff(generate(model, p)[0].image, expected)
                limit = FP32_LIMIT if dtype == torch.float32 else HALF_LIMIT
                ok &= bool(d <= limit)
                print(f"{'ok  ' if d <= limit else 'FAIL'} {name:<16} {device} {str(dtype)[6:]:<9} vs cpu float32: mean "
                      f"abs pixel diff {d:.2f}/255 (limit {limit})", flush=True)
                for net in (model.unet, model.controlnet) if model.controlnet is not None else (model.unet,):
                    ok &= graphs_captured(net, device)
    return ok


PARTS = {"pipeline": check_pipeline, "server": lambda device: check_server(device, compile=False)
         & check_server(device, compile=True), "compiled": check_compiled, "variants": check_variants}


def main(argv=None) -> int:
    # a `timeout` stopping this script must still stop the server it started (the finally clause)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    argv = argv if argv is not None else sys.argv[1:]
    device = (argv or ["cuda"])[0]                                  # "cpu": a rehearsal of the script
    parts = argv[1].split(",") if len(argv) > 1 else list(PARTS)
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            print("no CUDA device")
            return 1
        print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    ok = True
    for part in parts:
        ok &= PARTS[part](device)
    print("gpu_check:", "passed" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
