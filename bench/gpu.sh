#!/bin/sh
# The GPU checks and benchmark on a lent card, as one device call (the device tool's `run`; see docs/BENCHMARKS.md).
#
# The device image has torch, transformers, safetensors, einops, pillow, regex, werkzeug and jinja2; the
# rest travels as wheels. Once, here:
#   echo /.whl/ >> .git/info/exclude
#   python -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl diffusers==0.42.1 \
#       open_clip_torch==3.3.0 importlib_metadata==8.7.0 ftfy==6.3.1 wcwidth==0.9.4 flask==3.1.3 \
#       blinker==1.9.0 itsdangerous==2.2.0 gunicorn==27.0.1
# then run, with carry [".whl"] and timeout_s 590 (a 15-minute lease holds two such calls):
#   sh bench/gpu.sh [PART ...]
# Each part runs under its own timeout and writes its own files under $OUT, so a part that runs out of
# time leaves the others'. Together they need two calls of under 10 minutes (H200, 2026-11-26; the first
# call also builds the 2 GiB checkpoint, ~20 s): `sh bench/gpu.sh check ceiling bf16`, then
# `sh bench/gpu.sh fp16 compiled pipelines`; `graphs` alone fits in the same first call. The parts
# (default: all, in that order):
#   check      (~5 min; each new shape compiles for 40-85 s) bench/gpu_check.py: every sampler on CUDA
#              (float32/float16/bfloat16) against the CPU, the real server on CUDA by default and with
#              --compile, the --compile path (CUDA graphs) against eager, and the variants below;
#   variants   (~1 min) bench/gpu_check.py's last part alone: ControlNet, inpainting UNet, masked edit on
#              CUDA against the CPU;
#   ceiling    (~10 s) the card's bf16/fp16 matmul rate, the ceiling to read the UNet's fraction of peak against;
#   bf16       (~20 s) the 512² UNet step in bfloat16, eager, vs diffusers; VAE decode; text encoding;
#   fp16       (~3 min) the same in float16, and the UNet step also under torch.compile, torch.compile with
#              its CUDA graphs (mode reduce-overhead), and ours --compile;
#   compiled   (~2.5 min) the 512² UNet step and whole 20-step txt2img in float16 with ours --compile;
#   pipelines  (~1 min) whole 512² 20-step txt2img in float32, float16, bfloat16 (pixel difference
#              against float32);
#   graphs     (~2 min) the default (the UNet replayed as CUDA graphs) against --no-cuda-graphs and
#              diffusers: the 512² UNet step and the whole 512² 20-step txt2img, in all three dtypes;
#   memory     (~1 min) bench/gpu_memory.py: what the CUDA graphs cost in first-image time and GPU memory.
# PEAK_TFLOPS: the card's dense fp16/bf16 peak by its datasheet (H100 SXM and H200: 989).
set -u
OUT=${OUT:-/tmp/bench-gpu}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 PATH=/tmp/site/bin:$PATH
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,driver_version --format=csv | tee -a "$OUT/gpu.txt"
common="--device cuda --sizes 512 --runs 5 --peak-tflops ${PEAK_TFLOPS:-989}"
ceiling='
import torch, time
for dt in (torch.bfloat16, torch.float16):
    a, b = (torch.randn(8192, 8192, device="cuda", dtype=dt) for _ in range(2))
    for _ in range(3): a @ b
    torch.cuda.synchronize(); t0 = time.perf_counter()
    for _ in range(20): a @ b
    torch.cuda.synchronize()
    print(f"{dt} 8192³ matmul on random data: {20 * 2 * 8192 ** 3 / (time.perf_counter() - t0) / 1e12:.0f} TFLOP/s")
'
for part in ${@:-check ceiling bf16 fp16 compiled pipelines graphs memory}; do
    case $part in
    check) timeout 420 python3 -m bench.gpu_check cuda 2>&1 | tee "$OUT/gpu_check.log" ;;
    variants) timeout 150 python3 -m bench.gpu_check cuda variants 2>&1 | tee "$OUT/gpu_variants.log" ;;
    ceiling) timeout 40 python3 -c "$ceiling" 2>&1 | tee -a "$OUT/gpu.txt" ;;
    fp16) timeout 300 python3 -m bench $common --dtypes float16 --only unet,vae,text --compile default,reduce-overhead,ours \
            --out "$OUT/fp16.md" 2>&1 | tee "$OUT/fp16.log" ;;
    bf16) timeout 70 python3 -m bench $common --dtypes bfloat16 --only unet,vae,text --out "$OUT/bf16.md" 2>&1 | tee "$OUT/bf16.log" ;;
    pipelines) timeout 130 python3 -m bench --device cuda --runs 3 --dtypes float32,float16,bfloat16 --only pipelines \
            --pipelines 512:20 --out "$OUT/pipelines.md" 2>&1 | tee "$OUT/pipelines.log" ;;
    compiled) timeout 200 python3 -m bench $common --dtypes float16 --only unet,pipelines --compile ours --pipelines 512:20 \
            --out "$OUT/compiled.md" 2>&1 | tee "$OUT/compiled.log" ;;
    graphs) timeout 240 python3 -m bench $common --dtypes float32,float16,bfloat16 --only unet,pipelines --pipelines 512:20 \
            --out "$OUT/graphs.md" 2>&1 | tee "$OUT/graphs.log" ;;
    memory) timeout 150 python3 -m bench.gpu_memory 2>&1 | tee "$OUT/memory.log" ;;
    *) echo "unknown part: $part"; exit 2 ;;
    esac
done
