"""Our FLUX transformer (sdcore.flux) against diffusers' FluxTransformer2DModel on the same random weights,
read through our diffusers -> Black Forest Labs name table (sdcore.formats.layouts.flux_from_diffusers): dev
(guidance embedded) and schnell (none), image ids on a grid and text ids at zero as the pipelines make them."""
import pytest
import torch
from diffusers import FluxTransformer2DModel

from bench.references import max_rel
from sdcore.flux import Flux, FluxConfig
from sdcore.formats.files import Tensors
from sdcore.formats.layouts import flux_from_diffusers


def _randomised(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and p.ndim == 1:                 # RMS-norm gains around 1
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                fan_in = p[0].numel() if p.ndim > 1 else p.numel()
                p.copy_(torch.randn(p.shape, generator=g) / fan_in ** 0.5)
    return model.eval()


def _as_tensors(state: dict) -> Tensors:
    t = Tensors()
    for k, v in state.items():
        t.add(k, lambda v=v: v, v.shape)
    return t


def _ids(h: int, w: int, text: int):
    img = torch.zeros(h, w, 3)
    img[..., 1], img[..., 2] = torch.arange(h)[:, None], torch.arange(w)[None, :]
    return img.reshape(h * w, 3), torch.zeros(text, 3)


@pytest.mark.parametrize("guidance", [True, False], ids=["dev", "schnell"])
def test_flux_equals_diffusers(guidance):
    ref = _randomised(FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2,
                                             attention_head_dim=16, num_attention_heads=2, joint_attention_dim=24,
                                             pooled_projection_dim=20, guidance_embeds=guidance,
                                             axes_dims_rope=(4, 6, 6)), seed=int(guidance))
    cfg = FluxConfig(in_channels=16, width=32, heads=2, depth=2, depth_single=2, context_dim=24, pooled_dim=20,
                     axes_dim=(4, 6, 6), guidance_embed=guidance)
    ours = Flux(cfg).eval()
    state = {k: thunk() for k, (thunk, _) in
             flux_from_diffusers(_as_tensors(ref.state_dict())).entries.items()}
    ours.load_state_dict(state, strict=True)
    assert "double_blocks.0.img_attn.norm.query_norm.scale" in ours.state_dict()      # BFL's own names
    g = torch.Generator().manual_seed(3)
    img_ids, txt_ids = _ids(4, 6, 7)
    img, txt = torch.randn(2, 24, 16, generator=g), torch.randn(2, 7, 24, generator=g)
    y, t = torch.randn(2, 20, generator=g), torch.tensor([1.0, 0.3])
    scale = torch.tensor([3.5, 3.5]) if guidance else None
    with torch.no_grad():
        want = ref(hidden_states=img, encoder_hidden_states=txt, pooled_projections=y, timestep=t, img_ids=img_ids,
                   txt_ids=txt_ids, guidance=scale).sample
        got = ours(img, img_ids[None].expand(2, -1, -1), txt, txt_ids[None].expand(2, -1, -1), t, y, scale)
    assert want.std() > 0.1
    assert max_rel(got, want) < 1e-5, max_rel(got, want)


def test_flux_files_in_both_layouts_load_equal(tmp_path):
    """A diffusers transformer folder, the same weights in one file under diffusers' names, and Black Forest Labs'
    layout (bare, as flux1-dev.safetensors, and under model.diffusion_model.): each gives diffusers' output, the
    configuration read off the shapes (the RoPE axes, not in them, from our metadata entry)."""
    from safetensors.torch import save_file

    from sdcore.formats.build import build
    from sdcore.formats.checkpoints import FLUX_LAYOUT, read_transformer
    from sdcore.formats.files import config_to_metadata
    ref = _randomised(FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=2,
                                             attention_head_dim=16, num_attention_heads=2, joint_attention_dim=24,
                                             pooled_projection_dim=20, guidance_embeds=True, axes_dims_rope=(4, 6, 6)), 5)
    cfg = FluxConfig(in_channels=16, width=32, heads=2, depth=1, depth_single=2, context_dim=24, pooled_dim=20,
                     axes_dim=(4, 6, 6), guidance_embed=True)
    ours = Flux(cfg).eval()
    ours.load_state_dict({k: thunk() for k, (thunk, _) in flux_from_diffusers(
        _as_tensors(ref.state_dict())).entries.items()})
    ref.save_pretrained(tmp_path / "transformer")
    axes = config_to_metadata(flux={"axes_dim": [4, 6, 6]})
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(tmp_path / "diffusers-names.safetensors"),
              metadata=axes)
    bfl = {k: v.contiguous() for k, v in ours.state_dict().items()}
    save_file(bfl, str(tmp_path / "flux1.safetensors"), metadata=axes)
    save_file({f"model.diffusion_model.{k}": v for k, v in bfl.items()}, str(tmp_path / "comfy.safetensors"),
              metadata=axes)
    g = torch.Generator().manual_seed(4)
    img_ids, txt_ids = _ids(2, 3, 5)
    img, txt, y = torch.randn(1, 6, 16, generator=g), torch.randn(1, 5, 24, generator=g), torch.randn(1, 20, generator=g)
    t, scale = torch.tensor([0.6]), torch.tensor([4.0])
    with torch.no_grad():
        want = ref(hidden_states=img, encoder_hidden_states=txt, pooled_projections=y, timestep=t, img_ids=img_ids,
                   txt_ids=txt_ids, guidance=scale).sample
    for name in ("transformer", "diffusers-names.safetensors", "flux1.safetensors", "comfy.safetensors"):
        part = read_transformer(str(tmp_path / name), FLUX_LAYOUT)
        assert part.cfg == cfg, (name, part.cfg)
        model = build(Flux, part.cfg, part.tensors, "cpu", torch.float32, "FLUX", part.source)
        with torch.no_grad():
            got = model(img, img_ids[None], txt, txt_ids[None], t, y, scale)
        assert max_rel(got, want) < 1e-5, name


@pytest.mark.slow
def test_full_width_flux_file_equals_diffusers(tmp_path, guidance=True):
    """FLUX.1-dev at its full width (3072, 24 heads of 128, T5's 4096, CLIP-L's 768, the guidance embedding) with one
    double- and one single-stream block: a file in Black Forest Labs' names, read by read_transformer, against
    diffusers' FluxTransformer2DModel holding the weights diffusers' own single-file converter makes of that file
    (which assumes the full width: here it applies). Schnell differs only by the guidance embedding's absence,
    which the small test above covers."""
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers
    from safetensors.torch import save_file

    from sdcore.formats.build import build
    from sdcore.formats.checkpoints import FLUX_LAYOUT, read_transformer
    from sdcore.formats.write import random_init_
    cfg = FluxConfig(depth=1, depth_single=1, guidance_embed=guidance)
    with torch.no_grad():
        state = {k: v.contiguous() for k, v in random_init_(Flux(cfg), 8).state_dict().items()}
    save_file(state, str(tmp_path / "flux1.safetensors"))
    part = read_transformer(str(tmp_path / "flux1.safetensors"), FLUX_LAYOUT)
    assert part.cfg == cfg
    g = torch.Generator().manual_seed(6)
    img_ids, txt_ids = _ids(4, 6, 9)
    img, txt, y = torch.randn(1, 24, 64, generator=g), torch.randn(1, 9, 4096, generator=g), torch.randn(1, 768, generator=g)
    t, scale = torch.tensor([0.8]), torch.tensor([3.5]) if guidance else None
    ours = build(Flux, part.cfg, part.tensors, "cpu", torch.float32, "FLUX", part.source)
    with torch.no_grad():
        got = ours(img, img_ids[None], txt, txt_ids[None], t, y, scale)
    del ours
    ref = FluxTransformer2DModel(num_layers=1, num_single_layers=1, guidance_embeds=guidance).eval()
    missing, unexpected = ref.load_state_dict(convert_flux_transformer_checkpoint_to_diffusers(
        {f"model.diffusion_model.{k}": v for k, v in state.items()}), strict=False)
    assert not missing and not unexpected, (missing, unexpected)
    with torch.no_grad():
        want = ref(hidden_states=img, encoder_hidden_states=txt, pooled_projections=y, timestep=t, img_ids=img_ids,
                   txt_ids=txt_ids, guidance=scale).sample
    assert want.std() > 0.1
    assert max_rel(got, want) < 1e-4, max_rel(got, want)
