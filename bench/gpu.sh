#!/bin/sh
# The benchmark on a lent GPU, as one device call (the device tool's `run`; see docs/BENCHMARKS.md).
#
# The device image has torch, transformers, safetensors, einops and pillow; diffusers, open_clip_torch
# (only its BPE vocabulary is read) and importlib_metadata travel as wheels. Once, here:
#   echo /.whl/ >> .git/info/exclude
#   python -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 -d .whl diffusers==0.42.1 open_clip_torch==3.3.0 importlib_metadata
# then run, with carry [".whl"] and timeout_s 600:
#   sh bench/gpu.sh
# Sized for one 10-minute call on an H100/H200: the 512² UNet step (eager and compiled, fp16 and bf16),
# VAE decode and text encoding, then whole 512² 20-step pipelines; each part writes its own table
# under $OUT, so a part that runs out of time leaves the other's. PEAK_TFLOPS: the card's dense
# fp16/bf16 peak (H100 SXM and H200: 989).
set -u
OUT=${OUT:-/tmp/bench-gpu}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
common="--device cuda --sizes 512 --dtypes float16,bfloat16 --runs 5 --peak-tflops ${PEAK_TFLOPS:-989}"
timeout 330 python3 -m bench $common --only unet,vae,text --compile --out "$OUT/networks.md" 2>&1 | tee "$OUT/networks.log"
timeout 200 python3 -m bench $common --only pipelines --pipelines 512:20 --out "$OUT/pipelines.md" 2>&1 | tee "$OUT/pipelines.log"
