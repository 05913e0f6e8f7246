"""SDXL, from the files people download: a single file in the original layout (conditioner.embedders.0 = CLIP
ViT-L in Hugging Face names, .1 = OpenCLIP bigG, no sdcore metadata) and its diffusers-folder twin, built here
with random weights in SDXL's shape at a small width. Text conditioning, UNet (with the pooled output and the
size conditioning) and a whole generation are checked against transformers' CLIPTextModel /
CLIPTextModelWithProjection and diffusers' UNet2DConditionModel (addition_embed_type "text_time") and
AutoencoderKL on the same weights."""
import io
import json
import os
from dataclasses import replace

import pytest
import torch
from PIL import Image

import sdcore
from bench import references as refs
from bench.harness import ROOT
from sdcore.clip import TextEncoder
from sdcore.formats import CheckpointError
from sdcore.formats.write import random_init_, save_single_file
from sdcore.pipeline import GenerationParams, generate
from sdcore.unet import UNet
from sdcore.vae import AutoencoderKL
from tiny_models import SDXL_REFINER_UNET, SDXL_TEXT, SDXL_TEXT_2, SDXL_UNET, SDXL_VAE, random_controlnet

PROMPTS = ["a lighthouse on a cliff, oil painting", ""]


@pytest.fixture(scope="module")
def nets():
    torch.manual_seed(0)
    return dict(unet=random_init_(UNet(SDXL_UNET), 1), vae=random_init_(AutoencoderKL(SDXL_VAE), 2, gain=0.5),
                text=random_init_(TextEncoder(SDXL_TEXT), 3), text_2=random_init_(TextEncoder(SDXL_TEXT_2), 4))


@pytest.fixture(scope="module")
def single_file(nets, tmp_path_factory):
    path = tmp_path_factory.mktemp("sdxl") / "sdxl-shaped.safetensors"
    save_single_file(path, nets["unet"], nets["vae"], nets["text"], family="sdxl", text_2=nets["text_2"],
                     dtype=torch.float16, with_config=False)
    return path


@pytest.fixture(scope="module")
def model(single_file):
    return sdcore.load_model(single_file, device="cpu", dtype=torch.float32)


def _reference_conditioning(model):
    return refs.sdxl_encode_prompt(model.text_encoder, model.text_encoder_2, PROMPTS)


def test_the_single_file_is_read_as_sdxl(model, nets):
    assert model.family == "sdxl" and model.native_size == 1024 and model.prediction == "eps"
    assert model.unet.cfg == SDXL_UNET                       # every hyperparameter read off the tensors
    assert model.text_encoder.cfg == SDXL_TEXT and model.text_encoder_2.cfg == SDXL_TEXT_2
    assert model.vae.cfg.scale_factor == 0.13025              # SDXL's latent scale, which files do not record
    assert model.tokenizer.pad_id == 49407 and model.tokenizer_2.pad_id == 0
    for ours, theirs in ((model.unet, nets["unet"]), (model.text_encoder_2, nets["text_2"])):
        a, b = ours.state_dict(), theirs.state_dict()
        assert all(torch.equal(a[k], b[k].half().float()) for k in b)


def test_text_conditioning_equals_transformers(model):
    context, pooled = model.encode_text(PROMPTS)
    ref_context, ref_pooled = _reference_conditioning(model)
    assert context.shape == (2, 77, 64 + 128) and pooled.shape == (2, 128)
    assert refs.max_rel(context, ref_context) <= 1e-5 and refs.max_rel(pooled, ref_pooled) <= 1e-5


def test_unet_with_size_conditioning_equals_diffusers(model):
    width, height = 96, 64
    cond = model.conditioning(PROMPTS, width, height)
    du = refs.diffusers_unet_from_ours(model.unet)
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(1, 4, height // 8, width // 8, generator=g), torch.tensor([700.0, 700.0])
    ref_context, ref_pooled = _reference_conditioning(model)
    time_ids = torch.tensor([[height, width, 0, 0, height, width]] * 2, dtype=torch.float32)
    with torch.no_grad():
        ours = model.unet(x, t, cond["context"], y=cond["y"])            # the latent shared by both prompts
        ref = du(torch.cat([x, x]), t, encoder_hidden_states=ref_context,
                 added_cond_kwargs={"text_embeds": ref_pooled, "time_ids": time_ids}).sample
    assert refs.max_rel(ours, ref) <= 1e-4
    assert refs.max_rel(ours[0], ours[1]) > 1e-3                # the two prompts condition differently
    other = model.conditioning(PROMPTS, 64, 96)["y"]            # the size enters the label vector
    assert not torch.equal(other, cond["y"]) and torch.equal(other[:, :128], cond["y"][:, :128])


def test_micro_conditioning_fields_equal_diffusers_time_ids(model):
    """original_size / crop / target_size as diffusers' pipeline takes them ((height, width) tuples there,
    (width, height) sizes here), put in the same order as its _get_add_time_ids; the UNet then agrees."""
    cond = model.conditioning(PROMPTS, 64, 64, original_size=(96, 80), target_size=(64, 48), crop=(8, 16))
    original_size, crops_coords_top_left, target_size = (80, 96), (8, 16), (48, 64)     # diffusers' arguments
    time_ids = torch.tensor([list(original_size + crops_coords_top_left + target_size)] * 2, dtype=torch.float32)
    x, t = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1)), torch.tensor([500.0, 500.0])
    ref_context, ref_pooled = _reference_conditioning(model)
    with torch.no_grad():
        ours = model.unet(x, t, cond["context"], y=cond["y"])
        ref = refs.diffusers_unet_from_ours(model.unet)(torch.cat([x, x]), t, encoder_hidden_states=ref_context,
                                                        added_cond_kwargs={"text_embeds": ref_pooled,
                                                                           "time_ids": time_ids}).sample
    assert refs.max_rel(ours, ref) <= 1e-4
    assert not torch.equal(cond["y"], model.conditioning(PROMPTS, 64, 64)["y"])


def test_the_diffusers_folder_is_the_same_model(model, nets, tmp_path):
    folder = tmp_path / "sdxl-folder"
    refs.save_sdxl_folder(folder, model.unet, model.vae, model.text_encoder, model.text_encoder_2)
    twin = sdcore.load_model(folder, device="cpu", dtype=torch.float32)
    assert twin.family == "sdxl" and twin.native_size == 1024 and twin.unet.cfg == model.unet.cfg
    assert twin.text_encoder.cfg == model.text_encoder.cfg and twin.text_encoder_2.cfg == model.text_encoder_2.cfg
    assert twin.vae.cfg.scale_factor == 0.13025
    a, b = twin.conditioning(PROMPTS, 64, 64), model.conditioning(PROMPTS, 64, 64)
    assert torch.equal(a["context"], b["context"]) and torch.equal(a["y"], b["y"])
    p = GenerationParams("a red circle", steps=2, width=64, height=64, seed=3)
    assert generate(twin, p)[0].image.tobytes() == generate(model, p)[0].image.tobytes()


def test_turbo_native_size_from_the_file(nets, model, tmp_path):
    """SDXL-Turbo draws at 512: its single file says so in the model-spec metadata ("modelspec.resolution",
    as Stability's files and kohya's trainers write it), a diffusers folder in the UNet's sample_size
    (latent pixels: 64 * 8 = 512, what diffusers' pipeline defaults to); without either, SDXL's 1024."""
    path = tmp_path / "turbo.safetensors"
    save_single_file(path, nets["unet"], nets["vae"], nets["text"], family="sdxl", text_2=nets["text_2"], with_config=False,
                     extra_metadata={"modelspec.architecture": "stable-diffusion-xl-v1-base", "modelspec.resolution": "512x512"})
    assert sdcore.load_model(path, device="cpu").native_size == 512 and model.native_size == 1024
    folder = tmp_path / "turbo-folder"
    refs.save_sdxl_folder(folder, model.unet, model.vae, model.text_encoder, model.text_encoder_2)
    unet_json = folder / "unet" / "config.json"
    unet_json.write_text(json.dumps({**json.loads(unet_json.read_text()), "sample_size": 64}))
    assert sdcore.load_model(folder, device="cpu").native_size == 512


def test_generation_equals_a_reference_loop(model):
    """txt2img with guidance, Euler on the discrete schedule, against k-diffusion's sampler driving diffusers'
    UNet (text_time conditioning) and VAE, with the conditioning from transformers' encoders."""
    from bench.kdiff import external, sampling
    size, steps, cfg, seed = 64, 4, 5.0, 11
    p = GenerationParams(PROMPTS[0], negative_prompt=PROMPTS[1], steps=steps, cfg_scale=cfg, width=size, height=size,
                         seed=seed, sample_method="euler", scheduler="discrete")
    ours = refs.pixels(generate(model, p)[0].image)
    du, dv = refs.diffusers_unet_from_ours(model.unet), refs.diffusers_vae_from_ours(model.vae)
    ctx, pooled = _reference_conditioning(model)
    cond, uncond = ctx.chunk(2)
    pool_c, pool_u = pooled.chunk(2)
    time_ids = torch.tensor([[size, size, 0, 0, size, size]] * 2, dtype=torch.float32)

    class GuidedEps(torch.nn.Module):
        def forward(self, x, t, **_):
            out = du(torch.cat([x, x]), torch.cat([t, t]), encoder_hidden_states=torch.cat([uncond, cond]),
                     added_cond_kwargs={"text_embeds": torch.cat([pool_u, pool_c]), "time_ids": time_ids}).sample
            u, c = out.chunk(2)
            return u + cfg * (c - u)
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    denoiser = external.DiscreteEpsDDPMDenoiser(GuidedEps(), torch.cumprod(1 - betas, 0).float(), quantize=False)
    with torch.no_grad():
        sigmas = denoiser.get_sigmas(steps)
        x = torch.randn(1, 4, size // 8, size // 8, generator=torch.Generator().manual_seed(seed)) * sigmas[0]
        x = sampling.sample_euler(denoiser, x, sigmas, disable=True)
        img = dv.decode(x / 0.13025).sample[0]
    ref = ((img.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    assert (ours.int() - ref.int()).abs().max() <= 1
    assert ours.float().std() > 1                                # not a flat image


@pytest.mark.parametrize("cfg", [0.0, 1.0])
def test_cfg_0_and_1_run_without_the_unconditional_pass(model, cfg):
    """SDXL-Turbo is run at guidance 0 (its model card; diffusers turns guidance off for any scale <= 1):
    the conditional prediction alone, one UNet row per step, the same image as at 1."""
    calls = []
    forward = model.unet.forward
    model.unet.forward = lambda x, t, context, **kw: (calls.append(context.shape[0]), forward(x, t, context, **kw))[1]
    p = GenerationParams("x", negative_prompt="blurry", steps=2, width=64, height=64, cfg_scale=cfg)
    try:
        image = generate(model, p)[0].image
    finally:
        del model.unet.forward
    assert calls == [1, 1]
    assert image.tobytes() == generate(model, replace(p, cfg_scale=1.0))[0].image.tobytes()
    assert image.tobytes() != generate(model, replace(p, cfg_scale=0.5))[0].image.tobytes()   # the formula


def test_over_http(model, tmp_path):
    from app import create_app
    client = create_app({"data_dir": str(tmp_path / "d"), "api_key": None, "max_pixels": 64 * 64}, model=model).test_client()
    r = client.post("/v1/images/generations", json={"prompt": "a red circle", "steps": 2, "response_format": "b64_json"})
    assert r.status_code == 200, r.get_json()
    import base64
    im = Image.open(io.BytesIO(base64.b64decode(r.get_json()["data"][0]["b64_json"])))
    assert im.size == (64, 64)            # the native 1024 does not fit --max-pixels: the largest square that does
    assert client.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": 1, "width": 64, "height": 64}).status_code == 200
    micro = {"original_size": "96x80", "target_size": "64x48", "crop_top": 8, "crop_left": 16}
    body = {"prompt": "a red circle", "steps": 2, "size": "64x64", "seed": 5, "response_format": "b64_json"}
    r = client.post("/v1/images/generations", json={**body, **micro})
    assert r.status_code == 200, r.get_json()
    direct = generate(model, GenerationParams("a red circle", steps=2, width=64, height=64, seed=5, original_size=(96, 80),
                                              target_size=(64, 48), crop_top=8, crop_left=16))[0]
    plain = client.post("/v1/images/generations", json=body).get_json()["data"][0]["b64_json"]
    assert base64.b64decode(r.get_json()["data"][0]["b64_json"]) == direct.png and plain != r.get_json()["data"][0]["b64_json"]
    for field, bad in (("original_size", "96"), ("target_size", "0x64"), ("crop_top", -1), ("aesthetic_score", 11)):
        r = client.post("/v1/images/generations", json={**body, field: bad})
        assert r.status_code == 400 and r.get_json()["error"]["param"] == field, (field, r.get_json())
    # A1111's options for the crop: stored with POST /options, or per request in override_settings
    a1111 = {"prompt": "a red circle", "steps": 2, "width": 64, "height": 64, "seed": 5, "sampler_name": "Euler a"}
    cropped = generate(model, GenerationParams("a red circle", steps=2, width=64, height=64, seed=5, sample_method="euler_a",
                                               crop_top=8, crop_left=16))[0]
    over = client.post("/sdapi/v1/txt2img", json={**a1111, "override_settings": {"sdxl_crop_top": 8, "sdxl_crop_left": 16}})
    assert base64.b64decode(over.get_json()["images"][0]) == cropped.png
    assert client.get("/sdapi/v1/options").get_json()["sdxl_refiner_low_aesthetic_score"] == 2.5
    assert client.post("/sdapi/v1/options", json={"sdxl_crop_top": "x"}).status_code == 422     # A1111: a 422
    assert client.post("/sdapi/v1/options", json={"sdxl_crop_top": 8, "sdxl_crop_left": 16}).status_code == 200
    assert base64.b64decode(client.post("/sdapi/v1/txt2img", json=a1111).get_json()["images"][0]) == cropped.png
    bad = client.post("/sdapi/v1/txt2img", json={**a1111, "override_settings": {"sdxl_crop_left": -3}})
    assert bad.status_code == 422, bad.get_json()
    assert "sdxl_crop_left" in json.dumps(bad.get_json())


def test_refused_files_say_why(nets, tmp_path, model):
    from safetensors.torch import save_file
    from sdcore.formats.write import ldm_state_dict
    sd = ldm_state_dict(nets["unet"], nets["vae"], nets["text"], "sdxl", torch.float16, nets["text_2"])
    truncated = {k: v for k, v in sd.items() if ".output_blocks.5." not in k}
    save_file(truncated, str(tmp_path / "truncated.safetensors"))
    with pytest.raises(CheckpointError, match="lacks"):
        sdcore.load_model(tmp_path / "truncated.safetensors", device="cpu")
    from sdcore.controlnet import attach_controlnet
    from weights.make_default import UNET as SD1_UNET
    with pytest.raises(CheckpointError, match="context_dim 32.*context_dim 192"):
        attach_controlnet(model, random_controlnet(SD1_UNET))
    # files mixing an SD1 and an SDXL checkpoint: an SDXL UNet beside an SD1 text encoder, or both encoders' keys
    from safetensors.torch import load_file
    sd1_text = {k: v for k, v in load_file(ROOT / "weights" / "shapes-sd1.safetensors").items()
                if k.startswith("cond_stage_model.")}
    sdxl_only = {k: v for k, v in sd.items() if not k.startswith("conditioner.")}
    for name, tensors, words in (("unet-of-sdxl", sdxl_only | sd1_text, "do not fit together"),
                                 ("both-encoders", sd | sd1_text, "mixes SD1/SD2 text-encoder tensors")):
        save_file(tensors, str(tmp_path / f"{name}.safetensors"))
        with pytest.raises(CheckpointError, match=words):
            sdcore.load_model(tmp_path / f"{name}.safetensors", device="cpu")


def test_sdxl_controlnet_equals_diffusers(model, tmp_path):
    """An SDXL ControlNet (diffusers folder layout) gets the label vector too; its residuals equal
    diffusers' ControlNetModel's, and a controlled generation runs."""
    cn = random_controlnet(SDXL_UNET, seed=9)
    dcn = refs.diffusers_controlnet_from_ours(cn)
    dcn.save_pretrained(tmp_path / "controlnet")
    loaded = sdcore.load_controlnet(tmp_path / "controlnet", device="cpu", dtype=torch.float32)
    assert loaded.cfg == SDXL_UNET
    cond = model.conditioning(PROMPTS, 64, 64)
    ref_context, ref_pooled = _reference_conditioning(model)
    g = torch.Generator().manual_seed(1)
    x, t, hint = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([500.0, 500.0]), torch.rand(1, 3, 64, 64, generator=g)
    time_ids = torch.tensor([[64, 64, 0, 0, 64, 64]] * 2, dtype=torch.float32)
    with torch.no_grad():
        ours = loaded(x, t, cond["context"], loaded.embed_hint(hint), y=cond["y"])
        down, mid = dcn(x, t, ref_context, controlnet_cond=hint, return_dict=False,
                        added_cond_kwargs={"text_embeds": ref_pooled, "time_ids": time_ids})
    for r, ref in zip(ours, [*down, mid], strict=True):
        assert refs.max_abs(r, ref) <= 1e-4 * ref.abs().max().clamp(min=1)
    from sdcore.controlnet import attach_controlnet
    attach_controlnet(model, loaded)
    try:
        control = Image.new("RGB", (64, 64), (255, 255, 255))
        p = GenerationParams("x", steps=2, width=64, height=64, seed=1, control_image=control, control_strength=1.0)
        assert generate(model, p)[0].image.tobytes() != generate(model, GenerationParams(
            "x", steps=2, width=64, height=64, seed=1))[0].image.tobytes()
    finally:
        model.controlnet = None


def test_sdxl_inpainting_shape_loads_and_matches_diffusers(nets, tmp_path):
    """A 9-channel SDXL UNet (latent + mask + masked-image latent), as SDXL inpainting files hold."""
    import dataclasses
    cfg = dataclasses.replace(SDXL_UNET, in_channels=9)
    unet = random_init_(UNet(cfg), 12)
    save_single_file(tmp_path / "inpaint.safetensors", unet, nets["vae"], nets["text"], family="sdxl",
                     text_2=nets["text_2"], with_config=False)
    m = sdcore.load_model(tmp_path / "inpaint.safetensors", device="cpu", dtype=torch.float32)
    assert m.inpainting and m.unet.cfg == cfg
    cond = m.conditioning(PROMPTS, 64, 64)
    ref_context, ref_pooled = _reference_conditioning(m)
    x = torch.randn(2, 9, 8, 8, generator=torch.Generator().manual_seed(2))
    t = torch.tensor([300.0, 300.0])
    with torch.no_grad():
        ours = m.unet(x, t, cond["context"], y=cond["y"])
        ref = refs.diffusers_unet_from_ours(m.unet)(x, t, encoder_hidden_states=ref_context, added_cond_kwargs={
            "text_embeds": ref_pooled, "time_ids": torch.tensor([[64, 64, 0, 0, 64, 64]] * 2, dtype=torch.float32)}).sample
    assert refs.max_rel(ours, ref) <= 1e-4
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (32, 0, 64, 64))
    out = generate(m, GenerationParams("x", steps=2, width=64, height=64, init_image=Image.new("RGB", (64, 64), "red"),
                                       mask=mask, strength=1.0))[0].image
    assert out.size == (64, 64)


def test_a_float16_vae_overflow_is_decoded_again_in_float32():
    """SDXL's original VAE overflows float16; the decode then runs again in float32 instead of
    returning a black image. A stand-in VAE overflows in float16 the way it does (past 65504)."""
    from types import SimpleNamespace

    from sdcore.pipeline import decode_latent

    class OverflowingVAE(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = torch.nn.Parameter(torch.tensor(1e3))

        def decode(self, z):
            big = z * self.scale * self.scale                  # 5e5: past float16's 65504, so inf there
            return torch.tanh(z * self.scale / 1e3) + big * 0  # inf*0 = nan in float16, 0 in float32
    vae = OverflowingVAE().half()
    z = torch.full((1, 3, 2, 2), 0.5)
    img = decode_latent(SimpleNamespace(vae=vae, dtype=torch.float16, vae_tiling="off", taesd=None, taesd_decode=False), z)
    assert torch.isfinite(img).all() and torch.allclose(img, torch.tanh(z))
    assert vae.scale.dtype == torch.float16                       # the VAE is back in its dtype


@pytest.mark.parametrize("layout", ["single file", "diffusers folder"])
def test_pruned_shapes_load_and_match_diffusers(nets, tmp_path, layout):
    """Segmind's SSD-1B and Vega prune SDXL unevenly: the middle block keeps one ResBlock and no transformer,
    and decoder blocks of one level hold different numbers of transformer blocks. Nothing is assumed: the
    depths are read off the file (or the folder's config) and the result equals diffusers' UNet built from the
    same config (mid_block_type "UNetMidBlock2D", reverse_transformer_layers_per_block)."""
    import dataclasses
    cfg = dataclasses.replace(SDXL_UNET, transformer_depth_middle=0, transformer_depth_output=(3, 2, 1, 1, 2, 1, 0, 0, 0))
    unet = random_init_(UNet(cfg), 13)
    assert "middle_block.1.in_layers.0.weight" not in unet.state_dict()     # one ResBlock, no transformer
    path = tmp_path / "pruned.safetensors"
    if layout == "single file":
        save_single_file(path, unet, nets["vae"], nets["text"], family="sdxl", text_2=nets["text_2"], with_config=False)
    else:
        path = tmp_path / "pruned"
        refs.save_sdxl_folder(path, unet, nets["vae"], nets["text"], nets["text_2"])
        assert json.loads((path / "unet" / "config.json").read_text())["mid_block_type"] == "UNetMidBlock2D"
    m = sdcore.load_model(path, device="cpu", dtype=torch.float32)
    assert m.family == "sdxl" and m.unet.cfg == cfg
    cond = m.conditioning(PROMPTS, 64, 64)
    ref_context, ref_pooled = _reference_conditioning(m)
    x, t = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(4)), torch.tensor([600.0, 600.0])
    with torch.no_grad():
        ours = m.unet(x, t, cond["context"], y=cond["y"])
        ref = refs.diffusers_unet_from_ours(m.unet)(torch.cat([x, x]), t, encoder_hidden_states=ref_context, added_cond_kwargs={
            "text_embeds": ref_pooled, "time_ids": torch.tensor([[64, 64, 0, 0, 64, 64]] * 2, dtype=torch.float32)}).sample
    assert refs.max_rel(ours, ref) <= 1e-4


# ------------------------------------------------------------------------------------------------
# The refiner: bigG alone (conditioner.embedders.0.model.*), aesthetic-score conditioning
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def refiner(nets, tmp_path_factory):
    path = tmp_path_factory.mktemp("refiner") / "refiner-shaped.safetensors"
    save_single_file(path, random_init_(UNet(SDXL_REFINER_UNET), 21), nets["vae"], nets["text_2"],
                     family="sdxl_refiner", dtype=torch.float16, with_config=False)
    return sdcore.load_model(path, device="cpu", dtype=torch.float32, name="refiner")


def _reference_refiner_y(model, size, n_negative=1):
    """The refiner's text and label inputs as diffusers' StableDiffusionXLImg2ImgPipeline builds them:
    bigG's hidden_states[-2], its text_embeds, and time_ids (h, w, crop top, left, aesthetic score) with
    its defaults aesthetic_score 6.0 / negative_aesthetic_score 2.5."""
    _, ids_g = refs.sdxl_tokens(PROMPTS)
    te = refs.transformers_text_from_ours(model.text_encoder)
    with torch.no_grad():
        out = te(ids_g, output_hidden_states=True)
    time_ids = torch.tensor([[size, size, 0, 0, 6.0], [size, size, 0, 0, 2.5]], dtype=torch.float32)
    return out.hidden_states[-2], out.text_embeds, time_ids


def test_the_refiner_file_loads_and_its_unet_equals_diffusers(refiner):
    assert refiner.family == "sdxl_refiner" and refiner.native_size == 1024 and refiner.text_encoder_2 is None
    assert refiner.unet.cfg == SDXL_REFINER_UNET and refiner.text_encoder.cfg == SDXL_TEXT_2
    assert refiner.vae.cfg.scale_factor == 0.13025
    cond = refiner.conditioning(PROMPTS, 64, 64, negative=[False, True])
    ctx, pooled, time_ids = _reference_refiner_y(refiner, 64)
    assert refs.max_rel(cond["context"], ctx) <= 1e-5
    x, t = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(5)), torch.tensor([300.0, 300.0])
    with torch.no_grad():
        ours = refiner.unet(x, t, cond["context"], y=cond["y"])
        ref = refs.diffusers_unet_from_ours(refiner.unet)(torch.cat([x, x]), t, encoder_hidden_states=ctx,
                                                          added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
    assert refs.max_rel(ours, ref) <= 1e-4
    # the aesthetic score is what tells the two rows' labels apart beyond the text
    both_positive = refiner.conditioning(PROMPTS, 64, 64)["y"]
    assert torch.equal(both_positive[0], cond["y"][0]) and not torch.equal(both_positive[1], cond["y"][1])
    # other scores, a crop and an original size, in diffusers' order (h, w, top, left, score)
    cond = refiner.conditioning(PROMPTS, 64, 64, negative=[False, True], original_size=(96, 80), crop=(8, 16),
                                aesthetic_scores=(7.5, 1.0))
    time_ids = torch.tensor([[80, 96, 8, 16, 7.5], [80, 96, 8, 16, 1.0]], dtype=torch.float32)
    with torch.no_grad():
        ours = refiner.unet(x, t, cond["context"], y=cond["y"])
        ref = refs.diffusers_unet_from_ours(refiner.unet)(torch.cat([x, x]), t, encoder_hidden_states=ctx,
                                                          added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
    assert refs.max_rel(ours, ref) <= 1e-4


def test_the_refiner_folder_is_the_same_model(refiner, tmp_path):
    """diffusers' refiner folder: "text_encoder": [null, null], its bigG (with projection) in text_encoder_2/."""
    folder = tmp_path / "refiner-folder"
    refs.diffusers_unet_from_ours(refiner.unet).save_pretrained(folder / "unet")
    refs.diffusers_vae_from_ours(refiner.vae).save_pretrained(folder / "vae")
    refs.transformers_text_from_ours(refiner.text_encoder).save_pretrained(folder / "text_encoder_2")
    os.makedirs(folder / "tokenizer_2")
    (folder / "tokenizer_2" / "special_tokens_map.json").write_text(json.dumps({"pad_token": "!"}))
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionXLImg2ImgPipeline", "requires_aesthetics_score": True,
        "text_encoder": [None, None], "tokenizer": [None, None],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "tokenizer_2": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"]}))
    twin = sdcore.load_model(folder, device="cpu", dtype=torch.float32)
    assert twin.family == "sdxl_refiner" and twin.unet.cfg == refiner.unet.cfg
    assert twin.text_encoder.cfg == refiner.text_encoder.cfg
    a = twin.conditioning(PROMPTS, 64, 64, negative=[False, True])
    b = refiner.conditioning(PROMPTS, 64, 64, negative=[False, True])
    assert torch.equal(a["context"], b["context"]) and torch.equal(a["y"], b["y"])


def test_base_then_refiner_equals_a_reference_loop(model, refiner):
    """The ensemble of experts: the base takes the first steps, the refiner the rest on the same noise
    stream. Reference: k-diffusion's Euler ancestral run twice over the two slices of the schedule, each
    slice driving its own diffusers UNet with the conditioning transformers' encoders give."""
    from bench.kdiff import external, sampling
    size, steps, cfg, seed, switch = 64, 5, 5.0, 12, 0.6
    p = GenerationParams(PROMPTS[0], negative_prompt=PROMPTS[1], steps=steps, cfg_scale=cfg, width=size, height=size,
                         seed=seed, sample_method="euler_a", scheduler="discrete", refiner=refiner, refiner_switch_at=switch)
    got = generate(model, p)[0]
    ours = refs.pixels(got.image)
    assert "Refiner: refiner, Refiner switch at: 0.6" in got.parameters

    def guided(unet, ctx, pooled, time_ids):
        cond, uncond = ctx.chunk(2)
        pool_c, pool_u = pooled.chunk(2)

        class GuidedEps(torch.nn.Module):
            def forward(self, x, t, **_):
                out = unet(torch.cat([x, x]), torch.cat([t, t]), encoder_hidden_states=torch.cat([uncond, cond]),
                           added_cond_kwargs={"text_embeds": torch.cat([pool_u, pool_c]),
                                              "time_ids": torch.cat([time_ids[1:], time_ids[:1]])}).sample
                u, c = out.chunk(2)
                return u + cfg * (c - u)
        betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
        return external.DiscreteEpsDDPMDenoiser(GuidedEps(), torch.cumprod(1 - betas, 0).float(), quantize=False)
    ctx, pooled = _reference_conditioning(model)
    base = guided(refs.diffusers_unet_from_ours(model.unet), ctx, pooled,
                  torch.tensor([[size, size, 0, 0, size, size]] * 2, dtype=torch.float32))
    finisher = guided(refs.diffusers_unet_from_ours(refiner.unet), *_reference_refiner_y(refiner, size))
    g = torch.Generator().manual_seed(seed)
    shape = (1, 4, size // 8, size // 8)
    with torch.no_grad():
        sigmas = base.get_sigmas(steps)
        k = round(switch * steps)
        x = torch.randn(shape, generator=g) * sigmas[0]
        for denoiser, part in ((base, sigmas[:k + 1]), (finisher, sigmas[k:])):
            x = sampling.sample_euler_ancestral(denoiser, x, part, disable=True,
                                                noise_sampler=lambda s, sn: torch.randn(shape, generator=g))
        img = refs.diffusers_vae_from_ours(model.vae).decode(x / 0.13025).sample[0]
    ref = ((img.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    assert (ours.int() - ref.int()).abs().max() <= 1
    alone = refs.pixels(generate(model, replace(p, refiner=None))[0].image)
    assert (alone.int() - ours.int()).abs().max() > 3       # the refiner's (low-noise) steps changed the image


def test_a_refiner_is_refused_as_the_model_of_txt2img(refiner, model):
    from sdcore.pipeline import PipelineError
    with pytest.raises(PipelineError, match="is an SDXL refiner"):
        generate(refiner, GenerationParams("x", steps=1, width=64, height=64))
    edited = generate(refiner, GenerationParams("x", steps=2, width=64, height=64, init_image=Image.new("RGB", (64, 64)),
                                                strength=0.5))[0]
    assert edited.image.size == (64, 64)                               # it refines an image it is given


def test_the_refiner_over_http(model, refiner, tmp_path):
    """Both APIs name the refiner by a served model's id (A1111: its checkpoint title); a base drawn
    with it differs from one drawn without; an unknown refiner and a refiner as txt2img model are 400s."""
    import base64

    from app import create_app
    client = create_app({"data_dir": str(tmp_path / "d"), "api_key": None, "max_pixels": 64 * 64},
                        model={"base": model, "refiner": refiner}).test_client()
    body = {"prompt": "a red circle", "steps": 3, "size": "64x64", "response_format": "b64_json", "seed": 4}

    def b64(r):
        assert r.status_code == 200, r.get_json()
        return base64.b64decode(r.get_json()["data"][0]["b64_json"])
    plain = b64(client.post("/v1/images/generations", json=body))
    refined = b64(client.post("/v1/images/generations", json={**body, "refiner": "refiner", "refiner_switch_at": 0.5}))
    direct = generate(model, GenerationParams("a red circle", steps=3, width=64, height=64, seed=4, refiner=refiner,
                                              refiner_switch_at=0.5))[0]
    assert refined == direct.png and plain != refined
    a1111 = client.post("/sdapi/v1/txt2img", json={"prompt": "a red circle", "steps": 3, "width": 64, "height": 64, "seed": 4,
                                                   "sampler_name": "Euler a", "refiner_checkpoint": "refiner",
                                                   "refiner_switch_at": 0.5})
    assert a1111.status_code == 200, a1111.get_json()
    assert "Refiner: refiner, Refiner switch at: 0.5" in json.loads(a1111.get_json()["info"])["infotexts"][0]
    r = client.post("/v1/images/generations", json={**body, "refiner": "nope"})
    assert r.status_code == 400 and r.get_json()["error"]["param"] == "refiner"
    r = client.post("/v1/images/generations", json={**body, "refiner": "refiner", "refiner_switch_at": 1.5})
    assert r.status_code == 400 and r.get_json()["error"]["param"] == "refiner_switch_at"
    r = client.post("/v1/images/generations", json={**body, "model": "refiner"})
    assert r.status_code == 400 and "SDXL refiner" in r.get_json()["error"]["message"]
    assert client.get("/health").status_code == 200
