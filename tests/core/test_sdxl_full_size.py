"""A full-size SDXL base checkpoint (sd_xl_base_1.0's key names and shapes, random weights, fp16 on disk, no
config inside) and its diffusers-folder twin (the fp16 variant) load through the path a user's files take, and
agree with transformers' CLIPTextModel / CLIPTextModelWithProjection and diffusers' UNet2DConditionModel and
AutoencoderKL on the loaded weights. Both are built once and cached under .cache/ (≈7 GB each); the refiner is
checked at its full width with fewer transformer blocks. One model sits in memory at a time: the folder is
compared with the file tensor by tensor, straight from disk."""
from dataclasses import replace

import pytest
import torch

import sdcore
from bench import references as refs
from bench.references import SDXL_BASE_UNET, SDXL_BASE_VAE, SDXL_BIGG, SDXL_CLIP_L, SDXL_REFINER_FULL_UNET
from bench.util import random_float16, sdxl_checkpoint
from sdcore.clip import TextEncoder
from sdcore.formats import read_model
from sdcore.formats.write import save_single_file
from sdcore.unet import UNet
from sdcore.vae import AutoencoderKL

pytestmark = pytest.mark.slow
SDXL_PARAMS = {"unet": 2_567_463_684, "vae": 83_653_863, "text": 123_060_480, "text_2": 694_659_840}
PROMPTS = ["a lighthouse on a cliff, oil painting", ""]


def _count(module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.fixture(scope="module")
def sdxl_paths():
    return sdxl_checkpoint()


@pytest.fixture(scope="module")
def sdxl(sdxl_paths):
    return sdcore.load_model(sdxl_paths[0], device="cpu", dtype=torch.float32)


def test_a_refiner_at_full_width_loads_and_equals_diffusers(tmp_path):
    """sd_xl_refiner_1.0's widths (384 channels, bigG's 1280, five label numbers), one transformer block where
    it has four and four bigG layers of 32, so that the test does not hold a second 7 GB model."""
    unet_cfg = replace(SDXL_REFINER_FULL_UNET, transformer_depth=(0, 1, 1, 0), transformer_depth_middle=1)
    text_cfg = replace(SDXL_BIGG, layers=4)
    path = tmp_path / "refiner.safetensors"
    save_single_file(path, random_float16(UNet, unet_cfg, 11), random_float16(AutoencoderKL, SDXL_BASE_VAE, 12),
                     random_float16(TextEncoder, text_cfg, 13), family="sdxl_refiner", with_config=False)
    m = sdcore.load_model(path, device="cpu", dtype=torch.float32)
    assert (m.family, m.native_size, m.unet.cfg, m.text_encoder.cfg) == ("sdxl_refiner", 1024, unet_cfg, text_cfg)
    cond = m.conditioning(PROMPTS, 64, 64, negative=[False, True])
    _, ids = refs.sdxl_tokens(PROMPTS)
    with torch.no_grad():
        out = refs.transformers_text_from_ours(m.text_encoder)(ids, output_hidden_states=True)
    assert refs.max_rel(cond["context"], out.hidden_states[-2]) <= 1e-4
    # diffusers' img2img pipeline's defaults: aesthetic_score 6.0, negative_aesthetic_score 2.5
    time_ids = torch.tensor([[64, 64, 0, 0, 6.0], [64, 64, 0, 0, 2.5]])
    x, t = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(5)), torch.tensor([300.0, 300.0])
    with torch.no_grad():
        ours = m.unet(x, t, cond["context"], y=cond["y"])
        ref = refs.diffusers_unet_from_ours(m.unet)(torch.cat([x, x]), t, encoder_hidden_states=out.hidden_states[-2],
                                                    added_cond_kwargs={"text_embeds": out.text_embeds,
                                                                       "time_ids": time_ids}).sample
    assert refs.max_rel(ours, ref) <= 1e-4


def test_the_single_file_is_read_as_sdxl_base(sdxl):
    counts = {k: _count(getattr(sdxl, n)) for k, n in
              (("unet", "unet"), ("vae", "vae"), ("text", "text_encoder"), ("text_2", "text_encoder_2"))}
    assert counts == SDXL_PARAMS
    assert (sdxl.unet.cfg, sdxl.vae.cfg, sdxl.text_encoder.cfg, sdxl.text_encoder_2.cfg) == \
        (SDXL_BASE_UNET, SDXL_BASE_VAE, SDXL_CLIP_L, SDXL_BIGG)          # every hyperparameter read off the shapes
    assert (sdxl.family, sdxl.prediction, sdxl.native_size) == ("sdxl", "eps", 1024)


def test_text_unet_and_vae_equal_diffusers(sdxl):
    cond = sdxl.conditioning(PROMPTS, 64, 64)
    ref_context, ref_pooled = refs.sdxl_encode_prompt(sdxl.text_encoder, sdxl.text_encoder_2, PROMPTS)
    assert cond["context"].shape == (2, 77, 2048) and cond["y"].shape == (2, 2816)
    assert refs.max_rel(cond["context"], ref_context) <= 1e-4
    assert refs.max_rel(cond["y"][:, :1280], ref_pooled) <= 1e-4
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(1, 4, 8, 8, generator=g), torch.tensor([700.0, 700.0])
    time_ids = torch.tensor([[64, 64, 0, 0, 64, 64]] * 2, dtype=torch.float32)
    with torch.no_grad():
        ours = sdxl.unet(x, t, cond["context"], y=cond["y"])            # one latent, the CFG pair of prompts
        ref = refs.diffusers_unet_from_ours(sdxl.unet)(torch.cat([x, x]), t, encoder_hidden_states=ref_context,
                                                       added_cond_kwargs={"text_embeds": ref_pooled,
                                                                          "time_ids": time_ids}).sample
        assert refs.max_rel(ours, ref) <= 1e-4
        z = torch.randn(1, 4, 4, 4, generator=g)
        assert refs.max_rel(sdxl.vae.decode(z), refs.diffusers_vae_from_ours(sdxl.vae).decode(z / 0.13025).sample) <= 1e-4


def test_the_diffusers_folder_holds_the_same_networks(sdxl_paths):
    """The fp16-variant folder, read through diffusers' names, gives every network the same configuration
    and, tensor by tensor, the same weights as the single file (the build from there on is shared)."""
    a, b = read_model(sdxl_paths[0]), read_model(sdxl_paths[1])
    assert (a.family, a.prediction, a.native_size) == ("sdxl", None, 1024) and b.family == "sdxl"
    for part in ("unet", "vae", "text", "text_2"):
        pa, pb = getattr(a, part), getattr(b, part)
        assert pa.cfg == pb.cfg, part
        assert set(pa.tensors.keys()) == set(pb.tensors.keys()), part
        for key in pa.tensors.keys():
            assert torch.equal(pa.tensors.get(key), pb.tensors.get(key)), (part, key)
