"""Adapters for SD3's and FLUX's transformers (and T5) against diffusers and the formula.

The LoRA files are random, written by bench.lora_files.write_transformer_lora as the trainers people use write
them: diffusers/PEFT (``transformer.<diffusers path>``, q, k and v separate), sd-scripts (``lora_unet_<Black
Forest Labs' / Stability's path>``, q, k and v fused) and ComfyUI (``diffusion_model.<that path>``), the same change
in each. Reference: diffusers' own loader (FluxLoraLoaderMixin, which converts sd-scripts files itself;
SD3LoraLoaderMixin, which reads PEFT files only) fused into a diffusers transformer holding the same weights.
"""
import copy

import pytest
import torch
from diffusers import SD3Transformer2DModel
from diffusers.loaders import FluxLoraLoaderMixin, SD3LoraLoaderMixin
from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers
from safetensors.torch import load_file, save_file

import sdcore
from bench.lora_files import write_transformer_lora
from bench.references import max_rel
from sdcore.lora import LoraError, apply_loras, remove_loras
from tests.tiny_models import flux_diffusers_transformer, flux_files, sd3_mmdit_config, sd3_single_file

MULTIPLIER = 0.7
TOL = 1e-4


@pytest.fixture(scope="module")
def flux(tmp_path_factory):
    d = tmp_path_factory.mktemp("flux-lora")
    parts = flux_files(d, dev=True, seed=5)
    model = sdcore.load_model(d / "all_in_one.safetensors", device="cpu", dtype=torch.float32)
    ref = flux_diffusers_transformer(dev=True)
    ref.load_state_dict(parts["diffusers"])
    return model, ref


@pytest.fixture(scope="module")
def sd3(tmp_path_factory):
    d = tmp_path_factory.mktemp("sd3-lora")
    sd = sd3_single_file(d / "sd3.safetensors", seed=6)
    model = sdcore.load_model(d / "sd3.safetensors", device="cpu", dtype=torch.float32)
    cfg = sd3_mmdit_config()
    ref = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=16, num_layers=cfg.depth,
                                attention_head_dim=cfg.head_dim, num_attention_heads=cfg.heads,
                                joint_attention_dim=cfg.context_dim, caption_projection_dim=cfg.width,
                                pooled_projection_dim=cfg.pooled_dim, out_channels=16,
                                pos_embed_max_size=cfg.pos_embed_max_size).eval()
    missing, unexpected = ref.load_state_dict(convert_sd3_transformer_checkpoint_to_diffusers(dict(sd)), strict=False)
    assert not missing and not unexpected, (missing, unexpected)
    return model, ref


def _diffusers_loader(mixin, transformer):
    """diffusers' LoRA loading and fusing (``mixin``: a pipeline's) on its transformer alone."""
    class Loader(mixin):
        hf_device_map = None
        text_encoder = text_encoder_2 = None
        components = property(lambda self: {"transformer": self.transformer})

    loader = Loader()
    loader.transformer = transformer
    return loader


def _flux_io(model):
    """Our FLUX transformer's and diffusers' outputs on the same packed latent, text, ids, time and guidance."""
    g = torch.Generator().manual_seed(3)
    flux, cfg = model.unet.flux, model.unet.cfg               # the transformer on packed tokens, t in [0, 1]
    img = torch.randn(2, 16, cfg.in_channels, generator=g)
    txt = torch.randn(2, 7, cfg.context_dim, generator=g)
    y, t, guidance = torch.randn(2, cfg.pooled_dim, generator=g), torch.tensor([1.0, 0.4]), torch.tensor([3.5, 3.5])
    img_ids = torch.zeros(4, 4, 3)
    img_ids[..., 1], img_ids[..., 2] = torch.arange(4)[:, None], torch.arange(4)[None, :]
    img_ids, txt_ids = img_ids.reshape(16, 3), torch.zeros(7, 3)

    def ours():
        with torch.inference_mode():
            return flux(img, img_ids[None].expand(2, -1, -1), txt, txt_ids[None].expand(2, -1, -1), t, y, guidance)

    def theirs(ref):
        with torch.inference_mode():
            return ref(hidden_states=img, encoder_hidden_states=txt, pooled_projections=y, timestep=t, img_ids=img_ids,
                       txt_ids=txt_ids, guidance=guidance).sample
    return ours, theirs


def _sd3_io(model):
    g = torch.Generator().manual_seed(4)
    cfg = model.unet.cfg
    x, t = torch.randn(2, 16, 8, 8, generator=g), torch.tensor([900.0, 300.0])
    ctx, y = torch.randn(2, 9, cfg.context_dim, generator=g), torch.randn(2, cfg.pooled_dim, generator=g)

    def ours():
        with torch.inference_mode():
            return model.unet(x, t, context=ctx, y=y)

    def theirs(ref):
        with torch.inference_mode():
            return ref(hidden_states=x, encoder_hidden_states=ctx, pooled_projections=y, timestep=t).sample
    return ours, theirs


@pytest.mark.parametrize("family,layout", [("flux", "peft"), ("flux", "kohya"), ("sd3", "peft")])
def test_merged_adapter_equals_diffusers_fused(family, layout, flux, sd3, tmp_path):
    model, ref = flux if family == "flux" else sd3
    ours, theirs = (_flux_io if family == "flux" else _sd3_io)(model)
    plain = ours()
    assert max_rel(plain, theirs(ref)) < TOL, "without adapters"
    path = tmp_path / "adapter.safetensors"
    write_transformer_lora(path, model, layout=layout, seed=8)
    if layout == "kohya":
        # diffusers 0.42 splits a single block's linear1 at FLUX's full width (3072) only, and leaves the final
        # layer's modules of an sd-scripts file unapplied: those two are left out here (the PEFT case holds the final
        # layer to diffusers, test_every_layout_makes_the_same_change both to the PEFT file's change)
        adapter = load_file(path)
        save_file({k: v for k, v in adapter.items() if "_linear1." not in k and "final_layer" not in k}, str(path))
    ref = copy.deepcopy(ref)                          # the fixture's stays as it was
    loader = _diffusers_loader(FluxLoraLoaderMixin if family == "flux" else SD3LoraLoaderMixin, ref)
    loader.load_lora_weights(str(path), adapter_name="a")
    loader.fuse_lora(components=["transformer"], lora_scale=MULTIPLIER)
    loader.unload_lora_weights()                      # the fused weights stay
    want = theirs(ref)
    try:
        files = apply_loras(model, [(str(path), MULTIPLIER)])
        got = ours()
    finally:
        remove_loras(model)
    assert len(files[0].patches) > 0
    assert max_rel(plain, want) > 1e-3, "the adapter changed nothing"
    assert max_rel(got, want) < TOL
    assert torch.equal(ours(), plain), "removing it gives the weights back bit for bit"


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_every_layout_makes_the_same_change(family, flux, sd3, tmp_path):
    """sd-scripts' and ComfyUI's files name our fused projections; PEFT's the parts: the same weights result."""
    model = (flux if family == "flux" else sd3)[0]
    merged = {}
    for layout in ("peft", "kohya", "comfy"):
        path = tmp_path / f"{layout}.safetensors"
        write_transformer_lora(path, model, layout=layout, seed=9)
        try:
            apply_loras(model, [(str(path), MULTIPLIER)])
            merged[layout] = {k: v.clone() for k, v in model.unet.state_dict().items()}
        finally:
            remove_loras(model)
    changed = [k for k in merged["peft"] if not torch.equal(merged["peft"][k], model.unet.state_dict()[k])]
    assert any(".qkv." in k for k in changed) and any("final_layer.adaLN_modulation" in k for k in changed)
    for layout in ("kohya", "comfy"):
        for k in changed:
            assert max_rel(merged[layout][k], merged["peft"][k]) < 1e-5, (layout, k)


def test_a_t5_lora_changes_t5_by_the_formula(sd3, tmp_path):
    model = sd3[0]
    t5 = model.text_encoder_3
    key = "encoder.block.1.layer.0.SelfAttention.q.weight"
    w = t5.get_parameter(key).detach().clone()
    g = torch.Generator().manual_seed(2)
    up, down = torch.randn(w.shape[0], 4, generator=g), torch.randn(4, w.shape[1], generator=g)
    save_file({"lora_te3_encoder_block_1_layer_0_SelfAttention_q.lora_up.weight": up,
               "lora_te3_encoder_block_1_layer_0_SelfAttention_q.lora_down.weight": down,
               "lora_te3_encoder_block_1_layer_0_SelfAttention_q.alpha": torch.tensor(2.0)}, str(tmp_path / "t5.safetensors"))
    try:
        apply_loras(model, [(str(tmp_path / "t5.safetensors"), 0.5)])
        got = t5.get_parameter(key).detach().clone()
    finally:
        remove_loras(model)
    assert max_rel(got, w + 0.5 * (2.0 / 4) * up @ down) < 1e-6
    assert torch.equal(t5.get_parameter(key), w)


def test_a_flux_lora_on_sd3_and_an_sd1_lora_on_flux_are_refused(flux, sd3, default_model_path, tmp_path):
    write_transformer_lora(tmp_path / "flux.safetensors", flux[0], layout="kohya")
    before = {k: v.clone() for k, v in sd3[0].unet.state_dict().items()}
    with pytest.raises(LoraError, match="made for another model family"):
        apply_loras(sd3[0], [(str(tmp_path / "flux.safetensors"), 1.0)])
    assert all(torch.equal(v, sd3[0].unet.state_dict()[k]) for k, v in before.items())
    from bench.lora_files import write_lora
    sd1 = sdcore.load_model(default_model_path, device="cpu", dtype=torch.float32)
    write_lora(tmp_path / "sd1.safetensors", sd1, layout="kohya")
    with pytest.raises(LoraError, match="made for another model family"):
        apply_loras(flux[0], [(str(tmp_path / "sd1.safetensors"), 1.0)])
