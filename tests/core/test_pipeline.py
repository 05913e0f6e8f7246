"""The generation pipeline: against an independent reference (diffusers UNet/VAE, transformers CLIP,
k-diffusion's sampler and denoiser wrapper), and its seed / PNG / edit / mask behaviour."""
import io

import pytest
import torch
from PIL import Image

import samplers
import sdcore
from sdcore.pipeline import (INPAINT_FILLS, GenerationParams, PipelineError, cover_resize, fill_masked, generate,
                             image_to_tensor, mask_to_repaint, parse_infotext)
from bench.references import pixels, reference_image


@pytest.fixture(scope="module")
def model(default_model_path):
    return sdcore.load_model(default_model_path, device="cpu", dtype=torch.float32)


@pytest.mark.parametrize("sampler, kd_name", [("euler", "sample_euler"), ("euler_a", "sample_euler_ancestral")])
def test_txt2img_equals_reference_pipeline(model, sampler, kd_name):
    p = GenerationParams("a red circle on a blue background", negative_prompt="blurry", steps=6, cfg_scale=5.0,
                         width=64, height=64, seed=1234, sample_method=sampler, scheduler="discrete")
    ours = pixels(generate(model, p)[0].image)
    ref = reference_image(model, p.prompt, p.negative_prompt, 1234, 6, 5.0, 64, kd_name)
    assert (ours.int() - ref.int()).abs().max() <= 1
    assert ours.float().std() > 5                                # not a blank image


def test_seeds_and_replay_from_png(model):
    p = GenerationParams("a green triangle", n=3, steps=3, width=64, height=48, seed=7, sample_method="dpm++2m")
    images = generate(model, p)
    assert [im.seed for im in images] == [7, 8, 9]
    assert images[0].png != images[1].png
    again = generate(model, p)
    assert [im.png for im in again] == [im.png for im in images]          # same seed, same bytes
    # the "parameters" chunk of image 2 replays it alone
    info = parse_infotext(Image.open(io.BytesIO(images[2].png)).text["parameters"])
    assert info["seed"] == 9 and (info["width"], info["height"]) == (64, 48) and info["model"] == model.name
    replay = generate(model, GenerationParams(**{k: v for k, v in info.items() if k != "model"}))
    assert replay[0].png == images[2].png
    rnd = generate(model, GenerationParams("x", steps=1, width=64, height=64, seed=-1, n=2))
    assert rnd[0].seed >= 0 and rnd[1].seed == rnd[0].seed + 1


def test_infotext_survives_awkward_prompts(model):
    p = GenerationParams("line one\nline two, with: colons, 東京 😀", negative_prompt="a, b: c", steps=1, width=64,
                         height=64, seed=3, sample_method="heun", scheduler="karras", cfg_scale=4.5)
    info = parse_infotext(Image.open(io.BytesIO(generate(model, p)[0].png)).text["parameters"])
    assert info == dict(prompt=p.prompt, negative_prompt=p.negative_prompt, steps=1, sample_method="heun",
                        scheduler="karras", cfg_scale=4.5, seed=3, width=64, height=64, model=model.name)


def test_odd_multiple_of_8_sizes_and_bad_sizes(model):
    img = generate(model, GenerationParams("x", steps=1, width=72, height=40))[0].image
    assert img.size == (72, 40)
    with pytest.raises(PipelineError) as e:
        generate(model, GenerationParams("x", width=60, height=64))
    assert e.value.field == "width" and "multiple of 8" in e.value.message
    with pytest.raises(PipelineError) as e:
        generate(model, GenerationParams("x", sample_method="ddim"))
    assert e.value.field == "sample_method" and "euler_a" in e.value.message
    for kw in ({"sample_method": "lcm"}, {"sample_method": "dpm++2m", "scheduler": "lcm"}):
        with pytest.raises(PipelineError) as e:
            generate(model, GenerationParams("x", steps=51, **kw))
        assert e.value.field == "steps" and "at most 50" in e.value.message


def test_img2img_strength_and_mask(model):
    src = Image.new("RGB", (96, 64), (200, 30, 30))
    base = dict(prompt="x", steps=8, width=64, height=64, seed=5, sample_method="euler", init_image=src)
    with torch.no_grad():
        encoded = model.vae.encode(image_to_tensor(cover_resize(src, 64, 64)))
        roundtrip = pixels(__import__("sdcore.pipeline", fromlist=["x"]).tensor_to_image(model.vae.decode(encoded)[0]))
    weak = pixels(generate(model, GenerationParams(**base, strength=0.1))[0].image).float()
    strong = pixels(generate(model, GenerationParams(**base, strength=0.9))[0].image).float()
    # little strength stays near the (VAE round-tripped) input; more strength departs further
    assert (weak - roundtrip).abs().mean() < (strong - roundtrip).abs().mean()
    # mask: left half opaque (kept), right half transparent (repainted). Checked on the latent the VAE
    # decodes: a random VAE's global attention mixes the halves in pixel space.
    mask = Image.new("RGBA", (64, 64), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (32, 0, 64, 64))
    decoded = []
    decode = model.vae.decode
    model.vae.decode = lambda z: (decoded.append(z.clone()), decode(z))[1]
    try:
        generate(model, GenerationParams(**base, strength=1.0, mask=mask))
        generate(model, GenerationParams(**base, strength=1.0))
    finally:
        model.vae.decode = decode
    masked, free = decoded
    assert (masked[..., :4] - encoded[..., :4]).abs().max() < 1e-4          # kept: the original latent
    assert (masked[..., 4:] - encoded[..., 4:]).abs().mean() > 0.1          # repainted
    assert (free[..., :4] - encoded[..., :4]).abs().mean() > 0.1            # without a mask nothing is kept


def test_mask_semantics():
    rgba = Image.new("RGBA", (4, 2), (9, 9, 9, 255))
    rgba.putpixel((1, 0), (9, 9, 9, 0))
    assert mask_to_repaint(rgba).flatten().tolist() == [0, 1, 0, 0, 0, 0, 0, 0]
    grey = Image.new("L", (2, 1), 0)
    grey.putpixel((1, 0), 255)
    assert mask_to_repaint(grey).flatten().tolist() == [0, 1]


def test_cover_resize_center_crops():
    img = Image.new("RGB", (200, 100), (0, 0, 0))
    img.paste((255, 255, 255), (50, 0, 150, 100))        # a white centre band, 100 px wide
    out = cover_resize(img, 64, 64)
    assert out.size == (64, 64)
    assert out.getpixel((32, 32)) == (255, 255, 255) and out.getpixel((0, 32))[0] > 200


def test_inpainting_unet_gets_mask_and_masked_latent(tmp_path, model):
    """A 9-channel UNet loads, and receives [x, mask, masked-image latent] at every call."""
    from sdcore.formats.write import random_init_, save_single_file
    from sdcore.unet import UNet
    import dataclasses
    unet9 = random_init_(UNet(dataclasses.replace(model.unet.cfg, in_channels=9)), 11)
    save_single_file(tmp_path / "inpaint.safetensors", unet9, model.vae, model.text_encoder)
    m = sdcore.load_model(tmp_path / "inpaint.safetensors", device="cpu", dtype=torch.float32)
    assert m.inpainting
    seen = []
    forward = m.unet.forward
    m.unet.forward = lambda x, t, ctx, **kw: (seen.append(x[:, 4:].clone()), forward(x, t, ctx, **kw))[1]
    mask = Image.new("RGBA", (64, 64), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (0, 0, 32, 64))
    generate(m, GenerationParams("x", steps=2, width=64, height=64, sample_method="euler",
                                 init_image=Image.new("RGB", (64, 64), (250, 250, 250)), mask=mask))
    assert len(seen) == 2 and seen[0].shape == (1, 5, 8, 8)         # the latent once for [uncond, cond]
    assert seen[0][0, 0, :, :4].eq(1).all() and seen[0][0, 0, :, 4:].eq(0).all()     # mask channel: 1 = repaint


def _first_unet_inputs(model, params_list):
    """The latent each generation hands the UNet first (its first batch row)."""
    seen, forward = [], model.unet.forward
    model.unet.forward = lambda x, *a, **k: (seen.append(x[:1].float().clone()), forward(x, *a, **k))[1]
    try:
        for p in params_list:
            seen_before = len(seen)
            generate(model, p)
            del seen[seen_before + 1:]
    finally:
        del model.unet.forward
    return seen


def test_inpaint_fills_start_the_repainted_area_as_named(model):
    src = Image.new("RGB", (64, 64), (200, 30, 30))
    src.paste((20, 40, 220), (32, 0, 64, 64))                    # the right half, to be repainted, is blue
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (32, 0, 64, 64))                             # white: repaint
    base = dict(prompt="x", steps=10, width=64, height=64, seed=3, sample_method="euler", init_image=src, mask=mask,
                strength=0.5, cfg_scale=1.0)
    starts = dict(zip(INPAINT_FILLS, _first_unet_inputs(model, [GenerationParams(**base, inpaint_fill=f)
                                                                for f in INPAINT_FILLS])))
    # the formula, from the same seeded draws: start = (latent, with the fill where the mask repaints) + σ₀·noise,
    # scaled by the eps-model input scaling 1/sqrt(σ₀² + 1)
    with torch.no_grad():
        encoded = model.vae.encode(image_to_tensor(src))
        filled = model.vae.encode(fill_masked(image_to_tensor(src), mask_to_repaint(mask)))
    sigma0 = samplers.img2img_sigmas(samplers.get_sigmas("discrete", 10), 0.5)[0]
    gen = torch.Generator().manual_seed(3)
    n1, n2 = (torch.randn(encoded.shape, generator=gen) for _ in range(2))
    keep = torch.ones_like(encoded)
    keep[..., 4:] = 0
    expected = {"original": encoded + sigma0 * n1, "latent_nothing": encoded * keep + sigma0 * n1,
                "latent_noise": encoded * keep + n1 * (1 - keep) + sigma0 * n2, "fill": filled + sigma0 * n1}
    for fill, start in starts.items():
        assert torch.allclose(start, expected[fill].float() / (sigma0 ** 2 + 1) ** 0.5, atol=1e-4), fill
    assert (filled[..., 4:] - encoded[..., 4:]).abs().mean() > 0.01 * encoded.abs().mean()  # the fill replaced the blue


def test_fill_masked_takes_the_surrounding_colours():
    img = Image.new("RGB", (64, 32), (250, 0, 0))
    img.paste((0, 0, 250), (0, 0, 16, 32))                        # a blue left quarter, a red rest
    repaint = torch.zeros(1, 1, 32, 64)
    repaint[..., 40:] = 1                                         # repaint the right part (inside the red)
    x = image_to_tensor(img)
    out = fill_masked(x, repaint)
    assert torch.equal(out[..., :40], x[..., :40])                # kept pixels are untouched
    right = (out[..., 40:] + 1) * 127.5
    assert right[0, 0].min() > 200 and right[0, 2].max() < 60    # red, from its neighbours, not the blue


def test_clip_skip_bounds(model):
    cfg = model.text_encoder.cfg
    most = cfg.output_layer % cfg.layers + 1
    generate(model, GenerationParams("x", steps=1, width=64, height=64, clip_skip=most))
    for bad in (0, most + 1):
        with pytest.raises(PipelineError) as e:
            generate(model, GenerationParams("x", steps=1, width=64, height=64, clip_skip=bad))
        assert e.value.field == "clip_skip"


RELEASE_SCRIPT = """
import torch
from sdcore.device import release_freed_memory
def anon():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("RssAnon:")) / 1024
held = [torch.ones(25_000) for _ in range(3000)]      # 100 kB each: below glibc's mmap threshold, in the heap
last = torch.ones(25_000)                             # allocated after them: the heap's top stays in use
del held
before = anon()
release_freed_memory("{device}")
print(before, anon())
"""


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_freed_heap_memory_goes_back_to_the_system_before_the_decode(device, model, monkeypatch):
    """A fresh process frees 300 MB of small tensors below a live one: the C heap keeps those pages until
    release_freed_memory hands them back (on the CPU only); the pipeline does that right before it decodes."""
    import subprocess
    import sys
    out = subprocess.run([sys.executable, "-c", RELEASE_SCRIPT.format(device=device)], capture_output=True, text=True,
                         check=True).stdout
    before, after = map(float, out.split())
    assert before > 250 and (before - after > 250 if device == "cpu" else abs(before - after) < 10), (before, after)
    from sdcore import pipeline
    calls = []
    monkeypatch.setattr(pipeline, "release_freed_memory", lambda device: calls.append(("release", str(device))))
    real = pipeline.decode_latent
    monkeypatch.setattr(pipeline, "decode_latent", lambda *a: calls.append(("decode",)) or real(*a))
    generate(model, GenerationParams("a cat", width=64, height=64, steps=2, seed=1))
    assert calls == [("release", "cpu"), ("decode",)]
