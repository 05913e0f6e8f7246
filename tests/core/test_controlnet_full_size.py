"""A full-size SD1.5 ControlNet (random weights, fp16 single file as lllyasviel's releases, no config
inside) loads through the path a user's ``control_v11p_sd15_canny`` file takes, and a full-size SDXL
ControlNet in the diffusers folder layout likewise; both agree with diffusers' ControlNetModel. The files
(≈720 MB, ≈2.5 GB) are built once and cached under .cache/."""
import os

import pytest
import torch

import sdcore
from sdcore.controlnet import ControlNet
from sdcore.formats.write import random_init_, save_controlnet
from sdcore.unet import UNetConfig
from bench import references as refs
from bench.references import SDXL_BASE_UNET
from bench.util import random_float16

pytestmark = pytest.mark.slow
GENERATOR_VERSION = 1          # bump when the recipe below changes, so the cache is rebuilt
SD15_CONTROLNET_PARAMS = 361_279_120
SDXL_CONTROLNET_PARAMS = 1_251_014_160     # diffusers' count for controlnet-canny-sdxl-1.0's config.json


@pytest.fixture(scope="module")
def controlnet_file(cache_dir):
    path = os.path.join(cache_dir, f"controlnet-sd15-random-v{GENERATOR_VERSION}.safetensors")
    if not os.path.exists(path):
        with torch.device("meta"):
            cn = ControlNet(UNetConfig())
        random_init_(cn.to_empty(device="cpu"), 4)
        save_controlnet(path + ".tmp", cn, dtype=torch.float16, with_config=False)
        os.replace(path + ".tmp", path)
    return path


def test_sd15_controlnet_loads_and_matches_diffusers(controlnet_file):
    cn = sdcore.load_controlnet(controlnet_file, dtype=torch.float32)
    assert cn.cfg == UNetConfig()                                   # every hyperparameter read off the shapes
    assert sum(p.numel() for p in cn.parameters()) == SD15_CONTROLNET_PARAMS
    dcn = refs.diffusers_controlnet_from_ours(cn)                    # shares the loaded tensors
    assert sum(p.numel() for p in dcn.parameters()) == SD15_CONTROLNET_PARAMS
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, 768, generator=g)
    t, hint = torch.tensor([999.0, 261.75]), torch.rand(1, 3, 64, 64, generator=g)
    with torch.inference_mode():
        ours = cn(x, t, ctx, cn.embed_hint(hint))
        down, mid = dcn(x, t, ctx, controlnet_cond=hint, return_dict=False)
    assert [r.shape[1] for r in ours] == [320] * 4 + [640] * 3 + [1280] * 6
    assert max(refs.max_rel(a, b) for a, b in zip(ours, [*down, mid])) <= 1e-4


def test_sdxl_controlnet_in_the_diffusers_layout_matches_diffusers(cache_dir):
    """A full-size SDXL ControlNet as diffusers/controlnet-canny-sdxl-1.0 ships it (a folder with config.json and
    the fp16 weights variant): its configuration is read from config.json, its residuals (with the label
    vector of pooled text and size numbers) equal diffusers' ControlNetModel's on the same weights."""
    folder = os.path.join(cache_dir, f"controlnet-sdxl-random-v{GENERATOR_VERSION}")
    if not os.path.exists(os.path.join(folder, "config.json")):
        cn = random_float16(ControlNet, SDXL_BASE_UNET, 6)
        refs.diffusers_controlnet_from_ours(cn, dtype=None).save_pretrained(folder + ".tmp", variant="fp16")
        del cn
        os.replace(folder + ".tmp", folder)
    cn = sdcore.load_controlnet(folder, dtype=torch.float32)
    assert cn.cfg == SDXL_BASE_UNET
    assert sum(p.numel() for p in cn.parameters()) == SDXL_CONTROLNET_PARAMS
    dcn = refs.diffusers_controlnet_from_ours(cn)                    # shares the loaded tensors
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, 2048, generator=g)
    pooled = torch.randn(2, 1280, generator=g)
    t, hint = torch.tensor([999.0, 261.75]), torch.rand(1, 3, 64, 64, generator=g)
    time_ids = torch.tensor([[1024, 1024, 0, 0, 1024, 1024], [768, 1024, 32, 0, 64, 64]], dtype=torch.float32)
    with torch.inference_mode():
        # the label vector as diffusers' ControlNetModel builds it from text_embeds and time_ids
        y = torch.cat([pooled, dcn.add_time_proj(time_ids.flatten()).reshape(2, -1)], dim=-1)
        ours = cn(x, t, ctx, cn.embed_hint(hint), y=y)
        down, mid = dcn(x, t, ctx, controlnet_cond=hint, return_dict=False,
                        added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids})
    assert [r.shape[1] for r in ours] == [320] * 4 + [640] * 3 + [1280] * 2 + [1280]    # 9 skips and the middle
    assert max(refs.max_rel(a, b) for a, b in zip(ours, [*down, mid], strict=True)) <= 1e-4
