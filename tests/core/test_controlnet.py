"""ControlNet: our network against diffusers' ControlNetModel + UNet2DConditionModel on identical random
weights, its checkpoint layouts, the base-family check, and how the pipeline applies it."""
import dataclasses
import io

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import sdcore
from sdcore.canny import canny
from sdcore.controlnet import attach_controlnet
from sdcore.formats.write import random_init_, save_controlnet
from sdcore.pipeline import (GenerationParams, control_residuals, cover_resize, generate, image_to_tensor,
                             parse_infotext, tensor_to_image)
from sdcore.unet import UNet
from bench import references as refs
from bench.references import pixels
from tiny_models import SD2_UNET, random_controlnet
from weights.make_default import UNET as TINY_UNET

TOL = 1e-5


def _inputs(context_dim, latent=(9, 11), seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, *latent, generator=g)
    ctx = torch.randn(2, 77, context_dim, generator=g)
    t = torch.tensor([3.25, 811.5])
    hint = torch.rand(1, 3, latent[0] * 8, latent[1] * 8, generator=g)      # one image for the whole batch
    return x, t, ctx, hint


def _residuals(cn, x, t, ctx, hint):
    with torch.no_grad():
        return cn(x, t, ctx, cn.embed_hint(hint))


@pytest.mark.parametrize("cfg", [TINY_UNET, SD2_UNET], ids=["sd1-every-block", "sd2-linear-proj"])
def test_parity_with_diffusers_controlnet_and_unet(cfg, tmp_path):
    """ControlNet residuals, and the UNet they are added to, against diffusers on the same weights;
    the weights reach diffusers through our layout map and come back through our loader."""
    cn = random_controlnet(cfg)
    unet = random_init_(UNet(cfg), 6)
    dcn, du = refs.diffusers_controlnet_from_ours(cn), refs.diffusers_unet_from_ours(unet)
    dcn.save_pretrained(tmp_path / "cn")                                   # config.json + safetensors
    loaded = sdcore.load_controlnet(tmp_path / "cn", dtype=torch.float32)
    assert loaded.cfg == cn.cfg and sum(p.numel() for p in loaded.parameters()) == sum(p.numel() for p in dcn.parameters())
    x, t, ctx, hint = _inputs(cfg.context_dim)
    ours = _residuals(loaded, x, t, ctx, hint)
    with torch.no_grad():
        down, mid = dcn(x, t, ctx, controlnet_cond=hint, conditioning_scale=0.7, return_dict=False)
        assert len(ours) == len(down) + 1 == 3 * len(cfg.channel_mult) + 1
        for r, ref in zip(ours, [*down, mid]):
            assert r.shape == ref.shape and refs.max_abs(0.7 * r, ref) <= TOL
        out = unet(x, t, ctx, control=[0.7 * r for r in ours])
        ref = du(x, t, encoder_hidden_states=ctx, down_block_additional_residuals=down,
                 mid_block_additional_residual=mid).sample
        assert refs.max_abs(out, ref) <= TOL
        assert refs.max_abs(out, unet(x, t, ctx)) > 0.1                   # the control really changes the output


def test_guidance_runs_the_shared_latent_once_in_the_controlnet_too():
    """The latent given once against [uncond, cond]: the ControlNet's residuals are diffusers' on the
    repeated batch (the ControlNet is the UNet's encoder, so it shares the same way)."""
    cn = random_controlnet(TINY_UNET)
    dcn = refs.diffusers_controlnet_from_ours(cn)
    x, _, ctx, hint = _inputs(TINY_UNET.context_dim)
    x, t = x[:1], torch.tensor([640.0, 640.0])
    ours = _residuals(cn, x, t, ctx, hint)
    with torch.no_grad():
        down, mid = dcn(x.repeat(2, 1, 1, 1), t, ctx, controlnet_cond=hint, return_dict=False)
    for r, ref in zip(ours, [*down, mid], strict=True):          # residuals reach |10|: relative
        assert r.shape == ref.shape and refs.max_abs(r, ref) <= TOL * ref.abs().max().clamp(min=1)
    assert refs.max_abs(ours[-1][0], ours[-1][1]) > 0.01     # the two conditionings differ after the text


def test_single_file_layouts_load_the_same_network(tmp_path):
    """control_model.* (as in a whole-pipeline file), bare LDM names, and diffusers names in one file;
    fp16 on disk; without any config in the file every hyperparameter is read off the shapes."""
    cn = random_controlnet(SD2_UNET)                          # head_dim 64 and context 64: inferable from shapes
    x, t, ctx, hint = _inputs(SD2_UNET.context_dim)
    expected = _residuals(cn, x, t, ctx, hint)

    save_file({f"control_model.{k}": v.contiguous() for k, v in cn.state_dict().items()}
              | {"model.diffusion_model.out.2.bias": torch.zeros(4), "betas": torch.zeros(1000)},
              str(tmp_path / "whole.safetensors"))
    save_controlnet(tmp_path / "bare.safetensors", cn, dtype=torch.float16, prefix="", with_config=False)
    dcn = refs.diffusers_controlnet_from_ours(cn)
    save_file({k: v.contiguous() for k, v in dcn.state_dict().items()}, str(tmp_path / "diffusers.safetensors"))
    torch.save({"state_dict": {f"control_model.{k}": v for k, v in cn.state_dict().items()}}, tmp_path / "cn.pth")

    for name, tol in (("whole.safetensors", 0), ("diffusers.safetensors", 0), ("cn.pth", 0), ("bare.safetensors", 2e-2)):
        loaded = sdcore.load_controlnet(tmp_path / name, dtype=torch.float32)
        assert loaded.cfg == SD2_UNET, name
        assert all(p.dtype == torch.float32 for p in loaded.parameters())
        got = _residuals(loaded, x, t, ctx, hint)
        assert max(refs.max_rel(a, b) for a, b in zip(got, expected)) <= tol, name
    half = sdcore.load_controlnet(tmp_path / "bare.safetensors", dtype=torch.bfloat16)
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}


def test_wrong_files_and_families_are_refused(tmp_path, default_model_path):
    with pytest.raises(sdcore.CheckpointError, match="is a base model, not a ControlNet"):
        sdcore.load_controlnet(default_model_path)
    save_controlnet(tmp_path / "sd2cn.safetensors", random_controlnet(SD2_UNET))
    with pytest.raises(sdcore.CheckpointError, match="ControlNet, not a base model: pass it with --control-net"):
        sdcore.load_model(tmp_path / "sd2cn.safetensors", device="cpu", dtype=torch.float32)
    # an SD2-shaped ControlNet (context_dim 64) next to the tiny SD1 model (context_dim 32): refused at start
    with pytest.raises(sdcore.CheckpointError, match=r"context_dim 64.*context_dim 32"):
        sdcore.load_model(default_model_path, control_net=str(tmp_path / "sd2cn.safetensors"), device="cpu", dtype=torch.float32)
    wider = random_controlnet(dataclasses.replace(TINY_UNET, model_channels=64))
    model = sdcore.load_model(default_model_path, device="cpu", dtype=torch.float32)
    with pytest.raises(sdcore.CheckpointError, match="does not fit"):
        attach_controlnet(model, wider)
    assert model.controlnet is None
    save_file({"x.weight": torch.zeros(2)}, str(tmp_path / "junk.safetensors"))
    with pytest.raises(sdcore.CheckpointError, match="not a ControlNet"):
        sdcore.load_controlnet(tmp_path / "junk.safetensors")


# ------------------------------------------------------------------------------------------------
# In the pipeline
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def controlled(default_model_path, tmp_path_factory):
    path = tmp_path_factory.mktemp("cn") / "tiny-cn.safetensors"
    save_controlnet(path, random_controlnet(TINY_UNET), dtype=torch.float16)
    model = sdcore.load_model(default_model_path, control_net=str(path), device="cpu", dtype=torch.float32)
    assert model.controlnet.cfg == TINY_UNET and model.controlnet.source == str(path)
    return model


def _control_image(size=64):
    img = Image.new("RGB", (size, size), (20, 30, 40))
    img.paste((240, 200, 10), (16, 8, 48, 40))
    img.paste((10, 220, 250), (4, 44, 60, 58))
    return img


def _params(**kw):
    base = dict(prompt="a red circle", negative_prompt="blurry", steps=4, cfg_scale=5.0, width=64, height=64,
                seed=99, sample_method="euler", scheduler="discrete")
    return GenerationParams(**base | kw)


def test_controlled_txt2img_equals_reference_pipeline(controlled):
    control = _control_image()
    got = generate(controlled, _params(control_image=control, control_strength=0.6))[0]
    hint = torch.tensor(list(control.getdata()), dtype=torch.float32).T.reshape(1, 3, 64, 64) / 255
    ref = refs.reference_image(controlled, "a red circle", "blurry", 99, 4, 5.0, 64, control=hint, control_strength=0.6)
    assert (pixels(got.image).int() - ref.int()).abs().max() <= 1
    plain = pixels(generate(controlled, _params())[0].image)
    assert (pixels(got.image).int() - plain.int()).abs().float().mean() > 2          # the control is visible
    info = parse_infotext(Image.open(io.BytesIO(got.png)).text["parameters"])
    assert info["control_strength"] == 0.6 and info["apply_canny_preprocessor"] is False


def test_strength_zero_is_the_uncontrolled_image_and_strength_scales_linearly(controlled, monkeypatch):
    plain = generate(controlled, _params())[0]
    zero = generate(controlled, _params(control_image=_control_image(), control_strength=0.0))[0]
    assert torch.equal(pixels(zero.image), pixels(plain.image))
    text = lambda g: Image.open(io.BytesIO(g.png)).text["parameters"]
    assert "Control strength: 0.0" in text(zero) and "Control" not in text(plain)

    # what the pipeline hands the UNet at the first step: residuals × strength, for both CFG halves
    seen = []
    forward = controlled.unet.forward
    monkeypatch.setattr(controlled.unet, "forward", lambda x, t, ctx, control=None, **kw: (
        seen.append((x.clone(), t.clone(), ctx.clone(), control)), forward(x, t, ctx, control=control, **kw))[1])
    for strength in (1.0, 0.5, 1.75):
        generate(controlled, _params(control_image=_control_image(), control_strength=strength, steps=1))
    (x, t, ctx, full), (_, _, _, half), (_, _, _, more) = seen
    cn = controlled.controlnet
    with torch.no_grad():
        hint = torch.tensor(list(_control_image().getdata()), dtype=torch.float32).T.reshape(1, 3, 64, 64) / 255
        direct = cn(x, t, ctx, cn.embed_hint(hint))
    assert x.shape[0] == 1 and ctx.shape[0] == 2 and not torch.equal(ctx[0], ctx[1])    # latent once, [uncond, cond]
    # (the pipeline's hint is (x/127.5 - 1 + 1)/2, this one x/255: equal to a few ulp)
    assert len(full) == 13 and max(refs.max_rel(a, b) for a, b in zip(full, direct)) <= 1e-5
    # exact: the strength-1 residuals are the raw ones, and the others the same tensors × strength
    assert all(torch.equal(h, 0.5 * f) and torch.equal(m, 1.75 * f) for h, m, f in zip(half, more, full))
    assert all(f.abs().max() > 0.1 for f in full)
    residuals = control_residuals(cn, x, t, ctx, cn.embed_hint(hint), 0.25)
    assert all(torch.equal(r, 0.25 * d) for r, d in zip(residuals, direct))


def test_canny_preprocessor_sends_the_edge_map(controlled):
    photo = _control_image().resize((96, 64))            # not the output size: covered, then cropped
    edged = generate(controlled, _params(control_image=photo, apply_canny_preprocessor=True))[0]
    edges = canny((image_to_tensor(cover_resize(photo, 64, 64)) + 1) / 2)
    assert 50 < edges[0, 0].sum() < 64 * 64 / 4                                  # an edge map, not a photo
    as_image = tensor_to_image(edges[0] * 2 - 1)
    sent = generate(controlled, _params(control_image=as_image))[0]
    raw = generate(controlled, _params(control_image=photo))[0]
    assert torch.equal(pixels(edged.image), pixels(sent.image))
    assert not torch.equal(pixels(edged.image), pixels(raw.image))
    info = parse_infotext(Image.open(io.BytesIO(edged.png)).text["parameters"])
    assert info["apply_canny_preprocessor"] is True and info["control_strength"] == 0.9
