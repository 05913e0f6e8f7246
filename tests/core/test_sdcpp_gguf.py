"""GGUF files written by stable-diffusion.cpp's own converter (stable-diffusion-cpp-python's ``convert``, run in
bench/sdcpp.py's virtual environment, built on first use), from the random FLUX-shaped files of
tests/tiny_models.py: the transformer alone and ComfyUI's all-in-one file (whose names the converter rewrites:
``vae.`` becomes ``first_stage_model.``), in F16, Q8_0, Q4_0 and Q4_K. Every tensor reads as the gguf package's
reference dequantization of the converter's bytes (F16: the float32 source rounded to float16, bit for bit), the
kept layers expand to the same numbers, and the model draws close to the float32 safetensors one (bounds
measured and stated)."""
import json
import subprocess

import gguf
import numpy as np
import pytest
import torch

import sdcore
from sdcore.formats.files import TensorFile
from sdcore.pipeline import GenerationParams, generate
from sdcore.quant import QuantLinear
from tiny_models import flux_files

pytestmark = pytest.mark.slow

CONVERT = r"""
import json, sys
from stable_diffusion_cpp import StableDiffusion
sd = StableDiffusion.__new__(StableDiffusion)       # convert() needs no model loaded
sd.verbose, sd._stack = False, None
for src, dst, kind in json.loads(sys.argv[1]):
    assert StableDiffusion.convert(sd, src, output_path=dst, output_type=kind), (src, kind)
"""
# bounds on the mean and max |difference| per pixel (of 255) from the float32 image. Measured (2 steps, 64², this
# model; transformer alone / all-in-one, whose encoders are converted too): f16 0.01/0.04 mean, 1 max; q8_0 0.22/0.64,
# 2/6; q4_0 3.4/10.7, 31/69; q4_k 2.7/4.7, 20/32. The image itself spreads with a std of about 60.
IMAGE_BOUNDS = {"f16": (0.5, 4), "q8_0": (1.5, 12), "q4_0": (16, 96), "q4_k": (8, 48)}


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    from bench.sdcpp import ensure_venv
    d = tmp_path_factory.mktemp("sdcpp-gguf")
    flux_files(d, dev=False, seed=7)
    jobs = [(str(d / f"{src}.safetensors"), str(d / f"{src}-{kind}.gguf"), kind)
            for src in ("transformer", "all_in_one") for kind in IMAGE_BOUNDS]
    subprocess.run([str(ensure_venv()), "-c", CONVERT, json.dumps(jobs)], check=True, capture_output=True)
    return d


def _reference(path, key):
    """The gguf package's own reading of one tensor: its dequantization of the stored bytes, float32."""
    t = next(t for t in gguf.GGUFReader(str(path)).tensors if t.name == key)
    values = gguf.quants.dequantize(t.data, t.tensor_type)
    return torch.from_numpy(np.array(values, dtype=np.float32)).reshape(tuple(reversed(t.shape.tolist())))


@pytest.mark.parametrize("kind", list(IMAGE_BOUNDS))
def test_each_tensor_reads_as_the_gguf_package_reads_the_converters_bytes(converted, kind):
    path = converted / f"transformer-{kind}.gguf"
    source, ours = TensorFile(converted / "transformer.safetensors"), TensorFile(path)
    assert sorted(ours.keys()) == sorted(source.keys())             # the transformer's names are kept as they are
    stored = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors}
    for k in source.keys():
        want = _reference(path, k)
        assert torch.equal(ours.get(k).float(), want), k
        if stored[k] in ("F16", "F32"):                             # (it keeps the norms' scales in F32)
            assert torch.equal(want, source.get(k).to(getattr(torch, {"F16": "float16", "F32": "float32"}[stored[k]]))
                               .float()), k
    assert kind.upper() in stored.values()                          # the converter did convert


@pytest.mark.parametrize("kind", list(IMAGE_BOUNDS))
def test_the_converted_files_load_kept_or_dequantized_and_draw_close(converted, kind):
    d = converted
    encoders = dict(vae=d / "ae.safetensors", clip_l=d / "clip_l.safetensors", t5xxl=d / "t5xxl.safetensors")
    p = GenerationParams(prompt="a lantern", width=64, height=64, steps=2, cfg_scale=1.0, sample_method="euler", seed=3)
    ref = np.asarray(generate(sdcore.load_model(d / "transformer.safetensors", device="cpu", dtype=torch.float32,
                                                **encoders), p)[0].image, float)
    mean_bound, max_bound = IMAGE_BOUNDS[kind]
    for name, extra in (("transformer", encoders), ("all_in_one", {})):
        images = {}
        for how in ("dequantize", "keep"):
            model = sdcore.load_model(d / f"{name}-{kind}.gguf", device="cpu", dtype=torch.float32,
                                      quantized_weights=how, **extra)
            kept = [m for m in model.unet.modules() if isinstance(m, QuantLinear)]
            assert bool(kept) == (how == "keep" and kind != "f16"), (name, how)
            images[how] = np.asarray(generate(model, p)[0].image, float)
        assert np.array_equal(images["keep"], images["dequantize"]), name
        diff = np.abs(images["keep"] - ref)
        print(f"\n{name}-{kind}: mean {diff.mean():.2f}, max {diff.max():.0f} of 255")
        assert ref.std() > 10 and diff.mean() < mean_bound and diff.max() <= max_bound, (name, diff.mean(), diff.max())
