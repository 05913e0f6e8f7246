"""Our networks against diffusers / transformers on identical random weights (tiny SD1 and SD2 shapes),
loaded through our loader from both file layouts."""
import dataclasses
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

import sdcore
from sdcore.clip import TextEncoder
from sdcore.formats.build import CAST_CHUNK, cast
from sdcore.formats.files import config_to_metadata
from sdcore.formats.write import ldm_state_dict, random_init_, save_single_file
from sdcore.unet import BasicTransformerBlock, UNet
from sdcore.vae import AutoencoderKL, VAEConfig
from bench import references as refs
from bench.harness import ROOT
from weights.make_default import UNET as TINY_UNET
from weights.make_default import build_tiny
from tiny_models import SD2_TEXT, SD2_UNET, SD2_VAE

TOL = 1e-5


def _inputs(context_dim, latent=(9, 11), seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, *latent, generator=g)
    ctx = torch.randn(2, 77, context_dim, generator=g)
    t = torch.tensor([3.25, 811.5])                       # float timesteps, not integers
    img = torch.rand(1, 3, 64, 72, generator=g) * 2 - 1
    ids = torch.randint(0, 49406, (2, 77), generator=g)
    return x, t, ctx, img, ids


def _check_against_refs(m, du, dv, dt, ref_text_layer=-1):
    x, t, ctx, img, ids = _inputs(m.unet.cfg.context_dim)
    with torch.no_grad():
        assert refs.max_abs(m.unet(x, t, ctx), du(x, t, encoder_hidden_states=ctx).sample) <= TOL
        assert refs.max_abs(m.vae.encode(img), dv.encode(img).latent_dist.mean * 0.18215) <= TOL
        assert refs.max_abs(m.vae.decode(x), dv.decode(x / 0.18215).sample) <= TOL
        hidden = dt(ids, output_hidden_states=True).hidden_states[ref_text_layer]
        assert refs.max_abs(m.text_encoder(ids), dt.final_layer_norm(hidden)) <= TOL


def test_tiny_sd1_from_diffusers_folder_and_single_file(tmp_path):
    du, dv, dt = (refs.diffusers_unet_from_ours(build_tiny()[0]), refs.diffusers_vae_from_ours(build_tiny()[1]),
                  refs.transformers_text_from_ours(build_tiny()[2]))
    folder = refs.save_diffusers_folder(tmp_path / "pipe", du, dv, dt)
    m = sdcore.load_model(folder, device="cpu", dtype=torch.float32)
    assert (m.family, m.prediction, m.tokenizer.pad_id) == ("sd1", "eps", 49407)
    _check_against_refs(m, du, dv, dt)

    # the same weights written in the single-file layout load to the same outputs
    save_single_file(tmp_path / "tiny.safetensors", m.unet, m.vae, m.text_encoder)
    s = sdcore.load_model(tmp_path / "tiny.safetensors", device="cpu", dtype=torch.float32)
    x, t, ctx, img, _ = _inputs(32)
    with torch.no_grad():
        assert torch.equal(s.unet(x, t, ctx), m.unet(x, t, ctx))
        assert torch.equal(s.vae.decode(x), m.vae.decode(x))
        assert torch.equal(s.encode_text(["a red circle", ""]), m.encode_text(["a red circle", ""]))


def test_tiny_sd1_clip_skip_and_encode_text(default_model_path):
    m = sdcore.load_model(default_model_path, device="cpu", dtype=torch.float32)
    dt = refs.transformers_text_from_ours(m.text_encoder)
    ids = m.tokenizer(["a red circle on a blue background", ""])
    assert ids[1, 1:].eq(49407).all()                              # SD1 pads with eos
    with torch.no_grad():
        out = dt(ids, output_hidden_states=True)
        assert refs.max_abs(m.encode_text(["a red circle on a blue background", ""]), out.last_hidden_state) <= TOL
        skip2 = dt.final_layer_norm(out.hidden_states[-2])
        assert refs.max_abs(m.encode_text(["a red circle on a blue background", ""], clip_skip=2), skip2) <= TOL
        assert refs.max_abs(skip2, out.last_hidden_state) > 1e-2          # clip skip really changes the output


def _sd2_parts(seed=7):
    torch.manual_seed(seed)
    return (random_init_(UNet(SD2_UNET), seed), random_init_(AutoencoderKL(SD2_VAE), seed + 1),
            random_init_(TextEncoder(SD2_TEXT), seed + 2))


def test_tiny_sd2_single_file_without_metadata(tmp_path):
    """An SD2-style file (OpenCLIP text tower, linear proj, head dim 64) with no config in it:
    every hyperparameter is read off the shapes, the penultimate text block is used, pads are 0."""
    unet, vae, text = _sd2_parts()
    path = tmp_path / "sd2.safetensors"
    save_file(ldm_state_dict(unet, vae, text, family="sd2"), str(path))
    m = sdcore.load_model(path, device="cpu", dtype=torch.float32)
    assert m.family == "sd2" and m.tokenizer.pad_id == 0
    assert m.unet.cfg == SD2_UNET
    assert m.text_encoder.cfg.output_layer == -2 and m.text_encoder.cfg.act == "gelu"
    du, dv, dt = refs.diffusers_unet_from_ours(unet), refs.diffusers_vae_from_ours(vae), refs.transformers_text_from_ours(text)
    _check_against_refs(m, du, dv, dt, ref_text_layer=-2)


def test_odd_latent_sizes_follow_the_skip_connections():
    """520 px -> a 65×65 latent: the upsamplers take the size of the skip they meet (as diffusers)."""
    unet = build_tiny()[0]
    du = refs.diffusers_unet_from_ours(unet)
    x, t, ctx = torch.randn(1, 4, 65, 33), torch.tensor([500.0]), torch.randn(1, 77, 32)
    with torch.no_grad():
        out = unet(x, t, ctx)
        assert out.shape == x.shape
        assert refs.max_abs(out, du(x, t, encoder_hidden_states=ctx).sample) <= TOL


def _rows_seen(unet):
    """Batch rows reaching conv_in and the first transformer block's self- and cross-attention."""
    block = next(m for m in unet.modules() if isinstance(m, BasicTransformerBlock))
    rows, parts = {}, {"conv_in": unet.input_blocks[0], "attn1": block.attn1, "attn2": block.attn2}
    for name, m in parts.items():
        m.register_forward_pre_hook(lambda mod, args, name=name: rows.update({name: args[0].shape[0]}))
    return rows


@pytest.mark.parametrize("cfg", [TINY_UNET, SD2_UNET], ids=["sd1", "sd2-linear-proj"])
def test_guidance_runs_the_shared_latent_once_until_the_text_enters(cfg):
    """Classifier-free guidance: 2 latents given once against 4 conditionings ([uncond, cond], each
    latent with its own t) equal diffusers on the repeated batch; the layers before the first
    cross-attention ran on the 2 latents only."""
    unet = random_init_(UNet(cfg), 7)
    du = refs.diffusers_unet_from_ours(unet)
    g = torch.Generator().manual_seed(8)
    x, ctx = torch.randn(2, 4, 9, 11, generator=g), torch.randn(4, 77, cfg.context_dim, generator=g)
    t = torch.tensor([3.25, 811.5]).repeat(2)
    rows = _rows_seen(unet)
    with torch.no_grad():
        out = unet(x, t, ctx)
        assert refs.max_abs(out, du(x.repeat(2, 1, 1, 1), t, encoder_hidden_states=ctx).sample) <= TOL
    assert out.shape == (4, 4, 9, 11) and rows == {"conv_in": 2, "attn1": 2, "attn2": 4}
    with pytest.raises(ValueError, match="multiple"):
        unet(x, torch.tensor([3.25, 811.5, 9.0]), ctx[:3])


def test_guidance_with_a_label_vector_repeats_the_latent_first():
    """SDXL's label vector y differs per conditioning and enters with the time embedding, so nothing
    is shared: the result is that of the repeated batch from conv_in on."""
    cfg = dataclasses.replace(TINY_UNET, adm_in_channels=6)
    unet = random_init_(UNet(cfg), 9)
    g = torch.Generator().manual_seed(10)
    x, ctx, y = torch.randn(1, 4, 8, 8, generator=g), torch.randn(2, 77, 32, generator=g), torch.randn(2, 6, generator=g)
    t = torch.tensor([400.0, 400.0])
    rows = _rows_seen(unet)
    with torch.no_grad():
        out = unet(x, t, ctx, y=y)
        assert rows["conv_in"] == 2
        assert refs.max_abs(out, unet(x.repeat(2, 1, 1, 1), t, ctx, y=y)) <= 1e-6
        assert refs.max_abs(out[0], out[1]) > 0.01        # y reached the output


def test_prediction_type_sources(tmp_path):
    unet, vae, text = _sd2_parts()
    path = tmp_path / "sd2.safetensors"
    save_file(ldm_state_dict(unet, vae, text, family="sd2"), str(path), metadata={"modelspec.prediction_type": "v"})
    assert sdcore.load_model(path, device="cpu", dtype=torch.float32).prediction == "v"
    assert sdcore.load_model(path, prediction="eps", device="cpu", dtype=torch.float32).prediction == "eps"
    # the one-forward-pass heuristic: a UNet whose output is the constant b gives mean(out - 0.5) = b - 0.5
    for bias, expected in ((-3.0, "v"), (0.5, "eps")):
        with torch.no_grad():
            unet.out[2].weight.zero_()
            unet.out[2].bias.fill_(bias)
        save_file(ldm_state_dict(unet, vae, text, family="sd2"), str(path))
        assert sdcore.load_model(path, device="cpu", dtype=torch.float32).prediction == expected


def test_ema_weights_preferred_and_schedule_buffers_ignored(tmp_path, default_model_path):
    m = sdcore.load_model(default_model_path, device="cpu", dtype=torch.float32)
    sd = ldm_state_dict(m.unet, m.vae, m.text_encoder)
    ema = {"model_ema.diffusion_model" + k[len("model.diffusion_model"):].replace(".", ""): v + 1.0
           for k, v in sd.items() if k.startswith("model.diffusion_model.")}
    extra = {"betas": torch.linspace(0, 1, 1000), "alphas_cumprod": torch.rand(1000), "model_ema.decay": torch.tensor(0.9999),
             "model_ema.num_updates": torch.tensor(5, dtype=torch.int32)}
    save_file(sd | ema | extra, str(tmp_path / "full.safetensors"))
    e = sdcore.load_model(tmp_path / "full.safetensors", device="cpu", dtype=torch.float32)
    k = "input_blocks.0.0.weight"
    assert torch.equal(e.unet.state_dict()[k], m.unet.state_dict()[k] + 1.0)


def test_mixed_dtypes_cast_per_tensor_and_ckpt_layout(tmp_path, default_model_path):
    m = sdcore.load_model(default_model_path, device="cpu", dtype=torch.float32)
    sd = ldm_state_dict(m.unet, m.vae, m.text_encoder)
    mixed = {k: v.to([torch.float32, torch.float16, torch.bfloat16][i % 3]) if v.is_floating_point() else v
             for i, (k, v) in enumerate(sorted(sd.items()))}
    save_file(mixed, str(tmp_path / "mixed.safetensors"))
    a = sdcore.load_model(tmp_path / "mixed.safetensors", dtype=torch.float32)
    assert all(p.dtype == torch.float32 for p in a.unet.parameters())
    # .ckpt: a pickled, nested {"state_dict": {...}} as the original CompVis releases
    torch.save({"epoch": 3, "state_dict": {"state_dict": mixed}}, tmp_path / "m.ckpt")
    b = sdcore.load_model(tmp_path / "m.ckpt", device="cpu", dtype=torch.float32)
    for (ka, va), (kb, vb) in zip(a.unet.state_dict().items(), b.unet.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)
    bf = sdcore.load_model(tmp_path / "mixed.safetensors", dtype=torch.bfloat16)
    assert {p.dtype for p in bf.unet.parameters()} == {torch.bfloat16}


def test_fp16_to_bf16_load_cast_is_bit_identical_to_torchs():
    """The loader's two-step fp16 -> fp32 -> bf16 cast (in chunks) gives exactly torch's direct cast:
    specials, subnormals, ties, a tail shorter than a chunk, and a transposed (non-contiguous) source."""
    special = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), 65504.0, -65504.0, 2 ** -24, -(2 ** -24), 2 ** -14,
                            1 + 2 ** -8, 1 + 3 * 2 ** -8, 1 + 2 ** -10, 3.14159], dtype=torch.float16)
    every_fp16 = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(torch.float16)
    g = torch.Generator().manual_seed(11)
    t = torch.cat([special, every_fp16[~every_fp16.isnan()], (torch.randn(CAST_CHUNK, generator=g) * 30).half()])
    scratch = torch.empty(CAST_CHUNK, dtype=torch.float32)
    n = t.numel() // 1001 * 1001
    for src in (t, t[:n].view(1001, -1).T):
        out = cast(src, "cpu", torch.bfloat16, scratch)
        assert out.shape == src.shape and out.dtype == torch.bfloat16 and out.is_contiguous()
        assert torch.equal(out.view(torch.int16), src.to(torch.bfloat16).view(torch.int16))
    nan = torch.full((CAST_CHUNK,), float("nan"), dtype=torch.float16)
    assert cast(nan, "cpu", torch.bfloat16, scratch).isnan().all()


def test_separate_vae_file_overrides_the_checkpoint_vae(tmp_path, default_model_path):
    m = sdcore.load_model(default_model_path, device="cpu", dtype=torch.float32)
    other = random_init_(AutoencoderKL(m.vae.cfg), 123)
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(tmp_path / "vae.safetensors"))   # bare LDM VAE keys
    v = sdcore.load_model(default_model_path, vae=str(tmp_path / "vae.safetensors"), device="cpu", dtype=torch.float32)
    x = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        assert torch.equal(v.vae.decode(x), other.decode(x))
        assert not torch.equal(v.vae.decode(x), m.vae.decode(x))
    # the same VAE as a diffusers vae/ folder
    dv = refs.diffusers_vae_from_ours(other)
    dv.save_pretrained(tmp_path / "vae_folder")
    w = sdcore.load_model(default_model_path, vae=str(tmp_path / "vae_folder"), device="cpu", dtype=torch.float32)
    with torch.no_grad():
        assert refs.max_abs(w.vae.decode(x), other.decode(x)) <= TOL


def test_vae_norm_groups_other_than_32_match_diffusers_and_survive_both_layouts(tmp_path, default_model_path):
    """The default model's VAE normalises 32 channels in 8 groups (not SD's 32): the group count must
    reach the modules from the single file's metadata, from a diffusers folder's norm_num_groups and from
    the metadata of a VAE file in diffusers naming."""
    m = sdcore.load_model(default_model_path, device="cpu", dtype=torch.float32)
    vae = random_init_(AutoencoderKL(VAEConfig(ch=32, ch_mult=(1, 2, 2, 2), num_res_blocks=1, norm_groups=8)), 7)
    assert vae.decoder.norm_out.num_groups == 8
    dv = refs.diffusers_vae_from_ours(vae)
    x, img = torch.randn(1, 4, 8, 8), torch.rand(1, 3, 64, 64) * 2 - 1
    save_single_file(tmp_path / "g8.safetensors", m.unet, vae, m.text_encoder)
    dv.save_pretrained(tmp_path / "vae_folder")
    # a VAE alone in one file with diffusers' names, its configuration in our metadata entry
    save_file({k: v.contiguous() for k, v in dv.state_dict().items()}, str(tmp_path / "g8-vae-diffusers.safetensors"),
              metadata=config_to_metadata(vae=vae.cfg))
    with torch.no_grad():
        ref = dv.decode(x / vae.cfg.scale_factor).sample
        assert refs.max_abs(vae.decode(x), ref) <= TOL
        assert refs.max_abs(vae.encode(img), dv.encode(img).latent_dist.mean * vae.cfg.scale_factor) <= TOL
        fp32 = dict(device="cpu", dtype=torch.float32)
        for loaded in (sdcore.load_model(tmp_path / "g8.safetensors", **fp32).vae,
                       sdcore.load_model(default_model_path, vae=str(tmp_path / "vae_folder"), **fp32).vae,
                       sdcore.load_model(default_model_path, vae=str(tmp_path / "g8-vae-diffusers.safetensors"), **fp32).vae):
            assert loaded.cfg.norm_groups == 8
            assert refs.max_abs(loaded.decode(x), ref) <= TOL
        # read with SD's 32 groups the same weights decode to something else: the count matters
        wrong = AutoencoderKL(VAEConfig(ch=32, ch_mult=(1, 2, 2, 2), num_res_blocks=1))
        wrong.load_state_dict(vae.state_dict())
        assert refs.max_abs(wrong.decode(x), ref) > 1e-2


def test_loading_builds_on_meta_and_keeps_one_copy(default_model_path):
    """Every parameter is the tensor read from the file (assigned, not copied into a second init)."""
    m = sdcore.load_model(default_model_path, device="cpu", dtype=torch.float32)
    assert not any(p.is_meta for p in m.unet.parameters())
    assert not any(p.requires_grad for p in m.unet.parameters())


def test_loading_does_not_import_the_compiler(default_model_path):
    """Initialisers run on the meta device go through Python decompositions that import torch._dynamo
    (~1 s and ~900 modules at every server start); building for a load must skip them."""
    code = ("import sys, torch, sdcore; sdcore.load_model(sys.argv[1], device='cpu', dtype=torch.float32)\n"
            # every other family's networks as loading builds them (SDXL's and SD3's text projection among them)
            "from sdcore import clip, flux, mmdit, t5, unet, vae\n"
            "with torch.device('meta'):\n"
            "    clip.TextEncoder(clip.TextConfig(projection_dim=1280)), unet.UNet(unet.UNetConfig())\n"
            "    mmdit.MMDiT(mmdit.MMDiTConfig()), flux.Flux(flux.FluxConfig()), t5.T5Encoder(t5.T5Config())\n"
            "    vae.AutoencoderKL(vae.VAEConfig())\n"
            "print(sorted(m for m in sys.modules if m.startswith(('torch._dynamo', 'sympy')))[:5])")
    out = subprocess.run([sys.executable, "-c", code, str(default_model_path)], capture_output=True, text=True,
                         check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]", out.stdout


def test_fresh_modules_start_from_finite_weights():
    """Modules built for training (not loaded) must not start from uninitialised memory."""
    garbage = torch.full((1 << 22,), float("nan"))          # leave NaNs in memory the allocator may reuse
    del garbage
    for module in (TextEncoder(SD2_TEXT), UNet(SD2_UNET), AutoencoderKL(SD2_VAE)):
        assert all(torch.isfinite(p).all() for p in module.parameters())
    text = TextEncoder(SD2_TEXT)
    w = text.transformer.resblocks[0].attn.in_proj_weight
    bound = (6 / (w.shape[0] + w.shape[1])) ** 0.5                  # xavier-uniform, as nn.MultiheadAttention
    assert w.abs().max() <= bound and w.std() > 0.5 * bound / 3 ** 0.5
    assert abs(text.positional_embedding.std().item() - 0.01) < 0.002
    assert abs(text.token_embedding.weight.std().item() - 0.02) < 0.002


def test_a_16_channel_vae_without_quant_convs_and_with_a_shift_matches_diffusers(tmp_path):
    """SD3's and FLUX's autoencoder: 16 latent channels, no 1×1 quant convolutions, latent = (mean − shift)·scale;
    diffusers applies scale and shift in its pipelines, so the reference is scaled by hand. Loaded back from a
    diffusers folder, its config.json gives the shift and the missing convolutions."""
    cfg = VAEConfig(ch=32, ch_mult=(1, 2, 2, 2), num_res_blocks=1, z_channels=16, norm_groups=8,
                    scale_factor=1.5305, shift_factor=0.0609, quant_conv=False)
    vae = random_init_(AutoencoderKL(cfg), 11)
    assert not any("quant_conv" in k for k in vae.state_dict())
    dv = refs.diffusers_vae_from_ours(vae)
    z, img = torch.randn(1, 16, 8, 8), torch.rand(1, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        ref = dv.decode(z / cfg.scale_factor + cfg.shift_factor).sample
        assert ref.std() > 0.05 and refs.max_abs(vae.decode(z), ref) <= TOL
        want = (dv.encode(img).latent_dist.mean - cfg.shift_factor) * cfg.scale_factor
        assert refs.max_abs(vae.encode(img), want) <= TOL
        dv.save_pretrained(tmp_path / "vae")
        from sdcore.formats.checkpoints import read_vae
        part = read_vae(str(tmp_path / "vae"))
        assert (part.cfg.z_channels, part.cfg.quant_conv, part.cfg.shift_factor) == (16, False, pytest.approx(0.0609))


def test_vae_full_resolution_layers_in_bands_match_diffusers(monkeypatch):
    """With bands a few rows high (so that every full-resolution layer runs in several, and the last band
    is short), decode and encode still equal diffusers' AutoencoderKL, which convolves whole maps; while
    training (gradients on) no layer runs in bands, and the gradient reaches the weights."""
    from sdcore import vae as vae_module
    vae = random_init_(AutoencoderKL(VAEConfig(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, norm_groups=8)), 11)
    dv = refs.diffusers_vae_from_ours(vae)
    g = torch.Generator().manual_seed(3)
    x, img = torch.randn(2, 4, 13, 9, generator=g), torch.rand(1, 3, 52, 44, generator=g) * 2 - 1
    bands = []
    real = vae_module.in_bands
    monkeypatch.setattr(vae_module, "in_bands", lambda conv, rows, height, band: bands.append(-(-height // band))
                        or real(conv, rows, height, band))
    monkeypatch.setattr(vae_module, "BAND_BYTES", 2 * 32 * 44 * 4 * 5)       # 5 rows of a 32-channel, 44-wide map
    with torch.no_grad():
        assert refs.max_abs(vae.decode(x), dv.decode(x / vae.cfg.scale_factor).sample) <= TOL
        assert min(bands) >= 2 and len(bands) >= 10
        bands.clear()
        assert refs.max_abs(vae.encode(img), dv.encode(img).latent_dist.mean * vae.cfg.scale_factor) <= TOL
        assert min(bands) >= 2
    bands.clear()
    loss = vae.decode(x).square().mean()
    loss.backward()
    assert bands == [] and vae.decoder.up[0].block[0].conv1.weight.grad.abs().sum() > 0
