"""Tiled VAE passes (sdcore.tiling): the tiles and their blend cover the image exactly (checked with
tile-local functions, whose untiled output is the reference), a real VAE's tiled decode stays close to
its untiled one, the auto mode tiles only when the decode would not fit, and the pipeline and the server
use it."""
import pytest
import torch
import torch.nn.functional as F

import sdcore
from sdcore import tiling
from sdcore.pipeline import GenerationParams, generate
from bench.harness import ROOT

MODEL = ROOT / "weights" / "shapes-sd1.safetensors"


def _up(t):                   # a decoder-shaped local map: 4 latent channels -> 3 at 8x the size
    return F.interpolate(t, scale_factor=8, mode="nearest")[:, :3] * 0.5 + 0.1


def _down(t):                 # an encoder-shaped one: 3 channels -> 4 at 1/8 the size
    pooled = F.avg_pool2d(t, 8)
    return torch.cat([pooled, pooled[:, :1] * -2], dim=1)


@pytest.mark.parametrize("h, w", [(64, 64), (100, 80), (65, 130), (200, 49)])
def test_tiles_and_blend_reproduce_a_local_map_exactly(h, w):
    g = torch.Generator().manual_seed(h * w)
    z = torch.randn(1, 4, h, w, generator=g)
    assert torch.allclose(tiling.tiled(_up, z, tiling.DECODE_TILE, tiling.DECODE_OVERLAP, 8), _up(z), atol=1e-6)
    img = torch.randn(1, 3, h * 8, w * 8, generator=g)
    out = tiling.tiled(_down, img, tiling.ENCODE_TILE, tiling.ENCODE_OVERLAP, 1 / 8)
    assert out.shape == (1, 4, h, w) and torch.allclose(out, _down(img), atol=1e-6)


def test_blend_weights_ramp_across_overlaps_only():
    w = tiling._ramp(10, 4, rise=True, fall=True, device="cpu")
    assert torch.allclose(w, torch.tensor([0.2, 0.4, 0.6, 0.8, 1, 1, 0.8, 0.6, 0.4, 0.2]))
    assert torch.equal(tiling._ramp(6, 4, rise=False, fall=False, device="cpu"), torch.ones(6))
    assert tiling._starts(100, 64, 16) == [0, 36] and tiling._starts(64, 64, 16) == [0]
    assert tiling._starts(128, 64, 16) == [0, 32, 64] and tiling._starts(200, 64, 16) == [0, 45, 91, 136]
    assert tiling._starts(1040, 512, 128, align=8) == [0, 264, 528]                 # whole latent pixels


@pytest.fixture(scope="module")
def model():
    return sdcore.load_model(MODEL, device="cpu", dtype=torch.float32)


def test_a_real_vae_decodes_and_encodes_close_to_untiled(model):
    """The default model's VAE (trained) on a smooth 1024² picture (3 x 3 decoder tiles): with the GroupNorm
    statistics of the whole (shrunk) picture shared by every tile, tiled and untiled stay close; each tile
    normalised alone (the whole VAE run per tile) differs by far more, as would a misplaced or unblended tile."""
    g = torch.Generator().manual_seed(0)
    img = F.interpolate(torch.rand(1, 3, 12, 10, generator=g) * 2 - 1, size=(1024, 1024), mode="bicubic").clamp(-1, 1)
    px = lambda a: (a.float().clamp(-1, 1) + 1) * 127.5
    with torch.inference_mode():
        z = model.vae.encode(img)
        rel = lambda a: ((a - z).abs().mean() / z.abs().mean()).item()
        assert rel(tiling.encode(model.vae, img)) <= 0.008                                 # about twice what was measured
        assert rel(tiling.tiled(model.vae.encode, img, tiling.ENCODE_TILE, tiling.ENCODE_OVERLAP, 1 / 8)) >= 0.05
        whole = px(model.vae.decode(z))
        assert (px(tiling.decode(model.vae, z)) - whole).abs().mean().item() <= 2.0         # ≈ 2x measured
        alone = px(tiling.tiled(model.vae.decode, z, tiling.DECODE_TILE, tiling.DECODE_OVERLAP, 8))
        assert (alone - whole).abs().mean().item() >= 8.0


def test_tiles_in_bands_are_normalised_with_the_shared_statistics(model, monkeypatch):
    """A tile large enough to run its full-resolution layers in bands (sdcore.vae.in_bands) takes the
    whole picture's shared GroupNorm statistics there too: the tiled decode is the same with bands as
    with every layer over the whole tile."""
    from sdcore import vae as vae_module
    z = torch.randn(1, 4, 80, 72, generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        monkeypatch.setattr(vae_module, "BAND_BYTES", float("inf"))
        at_once = tiling.decode(model.vae, z)
        monkeypatch.setattr(vae_module, "BAND_BYTES", 1 << 20)                # 512-wide 32-channel rows: 16 a band
        banded = tiling.decode(model.vae, z)
    assert (banded - at_once).abs().max().item() <= 1e-4 and at_once.abs().max().item() > 0.5


def test_shared_norm_statistics_normalise_with_the_first_input_seen():
    from sdcore.vae import GroupNorm, shared_norm_statistics
    norm = GroupNorm(4, 8, eps=1e-6)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5), norm.bias.uniform_(-0.5, 0.5)
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(2, 8, 6, 6, generator=g), 3 + 2 * torch.randn(2, 8, 5, 7, generator=g)
    with torch.no_grad():
        assert torch.allclose(norm(b), F.group_norm(b, 4, norm.weight, norm.bias, 1e-6), atol=1e-6)   # outside: torch's
        with shared_norm_statistics():
            assert torch.allclose(norm(a), F.group_norm(a, 4, norm.weight, norm.bias, 1e-6), atol=1e-5)
            groups = a.reshape(2, 4, -1)
            mean, var = groups.mean(-1)[:, :, None, None], groups.var(-1, unbiased=False)[:, :, None, None]
            expect = ((b.reshape(2, 4, 2, 5, 7) - mean[..., None]) / (var[..., None] + 1e-6).sqrt()).reshape(b.shape)
            assert torch.allclose(norm(b), expect * norm.weight[:, None, None] + norm.bias[:, None, None], atol=1e-5)
        assert torch.allclose(norm(b), F.group_norm(b, 4, norm.weight, norm.bias, 1e-6), atol=1e-6)   # and after


def test_auto_tiles_only_when_the_decode_would_not_fit(monkeypatch):
    big, small = (128, 128), (32, 32)
    assert not tiling.should_tile("on", *small, torch.float32, torch.device("cpu"))       # one tile: nothing to split
    assert tiling.should_tile("on", *big, torch.float32, torch.device("cpu"))
    assert not tiling.should_tile("off", *big, torch.float32, torch.device("cpu"))
    need = tiling.decode_bytes(*big, 4)
    monkeypatch.setattr(tiling, "available_bytes", lambda device: need - 1)
    assert tiling.should_tile("auto", *big, torch.float32, torch.device("cpu"))
    monkeypatch.setattr(tiling, "available_bytes", lambda device: need)
    assert not tiling.should_tile("auto", *big, torch.float32, torch.device("cpu"))
    assert tiling.decode_bytes(*big, 2) < need < tiling.decode_bytes(256, 256, 4)


def test_the_pipeline_tiles_when_asked(model, monkeypatch):
    calls = []
    real = tiling.tiled
    monkeypatch.setattr(tiling, "tiled", lambda fn, x, *a: (calls.append(fn.__name__), real(fn, x, *a))[1])
    p = GenerationParams("a red circle", steps=1, width=528, height=64, seed=1)       # two tiles side by side
    model.vae_tiling = "on"
    try:
        tiled_image = generate(model, p)[0].image
    finally:
        model.vae_tiling = "auto"
    assert calls == ["upsample"] and tiled_image.size == (528, 64)
    from PIL import Image
    edit = GenerationParams("a red circle", steps=2, width=528, height=64, seed=1, strength=0.5,
                            init_image=Image.new("RGB", (528, 64), (200, 30, 30)))
    model.vae_tiling, calls[:] = "on", []
    try:
        generate(model, edit)
    finally:
        model.vae_tiling = "auto"
    assert calls == ["downsample", "upsample"]
