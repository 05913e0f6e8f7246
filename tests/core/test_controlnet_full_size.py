"""A full-size SD1.5 ControlNet (random weights, fp16 single file as lllyasviel's releases, no config
inside) loads through the path a user's ``control_v11p_sd15_canny`` file takes and agrees with
diffusers' ControlNetModel. The file (≈720 MB) is built once and cached under .cache/."""
import os

import pytest
import torch

import sdcore
from sdcore.controlnet import ControlNet
from sdcore.formats.write import random_init_, save_controlnet
from sdcore.unet import UNetConfig
from bench import references as refs

pytestmark = pytest.mark.slow
GENERATOR_VERSION = 1          # bump when the recipe below changes, so the cache is rebuilt
SD15_CONTROLNET_PARAMS = 361_279_120


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
