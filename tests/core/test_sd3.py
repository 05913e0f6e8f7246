"""SD3/SD3.5 end to end on small random networks in the real layouts: Stability AI's single file (MMDiT, VAE and
the three text encoders in one file, or the CLIPs and T5 as files of their own) and the diffusers pipeline
folder, against diffusers' StableDiffusion3Pipeline holding the same weights (converted by diffusers' own
single-file converters, so the names are checked as well as the arithmetic): the text conditioning, whole
txt2img images with and without guidance, img2img against a reference loop over diffusers' modules and
FlowMatchEulerDiscreteScheduler's sigmas, and the refusals."""
import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
from PIL import Image
from safetensors.torch import save_file
from transformers import T5Config, T5EncoderModel

import sdcore
from bench.references import max_rel, pixels
from sdcore.formats import CheckpointError
from sdcore.pipeline import GenerationParams, PipelineError, generate, image_to_tensor
from tiny_models import SD3_T5, sd3_diffusers_pipeline, sd3_single_file, sub

PROMPT, NEGATIVE = "a lighthouse on a cliff at dusk, oil painting", "blurry"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("sd3")
    sd = sd3_single_file(d / "sd3_tiny_incl_clips_t5xxl.safetensors")
    pipe = sd3_diffusers_pipeline(sd, d)
    pipe.save_pretrained(d / "folder", safe_serialization=True)
    return d, sd, pipe


@pytest.fixture(scope="module")
def model(files):
    return sdcore.load_model(files[0] / "sd3_tiny_incl_clips_t5xxl.safetensors", device="cpu", dtype=torch.float32)


def _state(model) -> dict:
    nets = {"unet": model.unet, "vae": model.vae, "text": model.text_encoder, "text_2": model.text_encoder_2,
            "text_3": model.text_encoder_3}
    return {f"{n}.{k}": v for n, net in nets.items() if net is not None for k, v in net.state_dict().items()}


def test_single_file_and_diffusers_folder_load_the_same_networks(files, model):
    d, _, _ = files
    assert (model.family, model.prediction, model.native_size, model.flow_shift) == ("sd3", "flow", 1024, 3.0)
    assert (model.vae.cfg.scale_factor, model.vae.cfg.shift_factor) == (1.5305, 0.0609)
    folder = sdcore.load_model(d / "folder", device="cpu", dtype=torch.float32)
    assert folder.family == "sd3" and folder.flow_shift == 3.0
    ours, theirs = _state(model), _state(folder)
    assert ours.keys() == theirs.keys() and len(ours) > 100
    for k in ours:
        assert torch.equal(ours[k], theirs[k]), k


def test_conditioning_equals_diffusers_encode_prompt(files, model):
    _, _, pipe = files
    with torch.no_grad():
        ctx, neg_ctx, pooled, neg_pooled = pipe.encode_prompt(PROMPT, None, None, negative_prompt=NEGATIVE,
                                                              do_classifier_free_guidance=True)
    cond = model.conditioning([PROMPT, NEGATIVE], 64, 64)
    assert cond["context"].shape == (2, 77 + 256, 256) and cond["y"].shape == (2, 192)
    assert max_rel(cond["context"], torch.cat([ctx, neg_ctx])) < 1e-5
    assert max_rel(cond["y"], torch.cat([pooled, neg_pooled])) < 1e-5
    assert ctx[0, :77, 192:].abs().max() == 0 and ctx[0, 77:].std() > 0.1     # the CLIPs padded, T5's tokens after


def _noise(seed, size=64):
    return torch.randn((1, 16, size // 8, size // 8), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("cfg,steps,size", [(5.0, 4, 64), (1.0, 3, 64), (4.5, 3, (96, 64))])
def test_txt2img_equals_diffusers_pipeline(files, model, cfg, steps, size):
    _, _, pipe = files
    w, h = size if isinstance(size, tuple) else (size, size)
    img = generate(model, GenerationParams(prompt=PROMPT, negative_prompt=NEGATIVE, width=w, height=h, steps=steps,
                                           cfg_scale=cfg, sample_method="euler", seed=11))[0].image
    noise = torch.randn((1, 16, h // 8, w // 8), generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        ref = pipe(PROMPT, negative_prompt=NEGATIVE, height=h, width=w, num_inference_steps=steps, guidance_scale=cfg,
                   latents=noise, output_type="np").images[0]
    want = torch.from_numpy(np.round(ref * 255).astype(np.uint8)).permute(2, 0, 1)
    got = pixels(img)
    assert want.float().std() > 10                                    # a picture, not a flat field
    assert (got.int() - want.int()).abs().max() <= 1


def test_img2img_equals_a_reference_loop(files, model):
    """Our img2img convention (sd.cpp's: floor(N·strength) + 1 of the N steps) on the flow schedule, written here
    with diffusers' transformer and VAE: the start is (1 − σ₀)·x₀ + σ₀·ε, then Euler steps of the guided velocity."""
    _, _, pipe = files
    steps, strength, cfg, seed = 5, 0.6, 4.0, 3
    init = Image.fromarray((np.indices((64, 64)).sum(0) % 255).astype(np.uint8)).convert("RGB")
    img = generate(model, GenerationParams(prompt=PROMPT, negative_prompt=NEGATIVE, width=64, height=64, steps=steps,
                                           cfg_scale=cfg, sample_method="euler", seed=seed, init_image=init,
                                           strength=strength))[0].image
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched.set_timesteps(steps)
    sigmas = sched.sigmas.double()[steps - int(steps * strength) - 1:]
    vae, mmdit = pipe.vae, pipe.transformer
    with torch.no_grad():
        ctx, neg_ctx, pooled, neg_pooled = pipe.encode_prompt(PROMPT, None, None, negative_prompt=NEGATIVE,
                                                              do_classifier_free_guidance=True)
        x0 = (vae.encode(image_to_tensor(init)).latent_dist.mode() - vae.config.shift_factor) * vae.config.scaling_factor
        x = (1 - sigmas[0].float()) * x0 + sigmas[0].float() * _noise(seed)
        for s, s_next in zip(sigmas[:-1], sigmas[1:]):
            v_u, v_c = mmdit(torch.cat([x, x]), encoder_hidden_states=torch.cat([neg_ctx, ctx]),
                             pooled_projections=torch.cat([neg_pooled, pooled]),
                             timestep=torch.full((2,), float(s) * 1000)).sample.chunk(2)
            x = x + float(s_next - s) * (v_u + cfg * (v_c - v_u))
        out = vae.decode(x / vae.config.scaling_factor + vae.config.shift_factor).sample[0]
    want = ((out.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    assert (pixels(img).int() - want.int()).abs().max() <= 1


def test_text_encoders_from_files_of_their_own(files, model, tmp_path):
    """sd3_medium.safetensors (MMDiT + VAE) with clip_l.safetensors, clip_g.safetensors and t5xxl_fp16.safetensors,
    as LlamaEdge and sd.cpp users pass them (--clip-l, --clip-g, --t5xxl), loads the networks of the whole file."""
    _, sd, _ = files
    base = {k: v for k, v in sd.items() if not k.startswith("text_encoders.")}
    save_file(base, str(tmp_path / "sd3.safetensors"))
    for name in ("clip_l", "clip_g"):
        save_file(sub(sd, f"text_encoders.{name}.transformer."), str(tmp_path / f"{name}.safetensors"))
    save_file({k: v.half() for k, v in sub(sd, "text_encoders.t5xxl.transformer.").items()},
              str(tmp_path / "t5xxl_fp16.safetensors"))
    with pytest.raises(CheckpointError, match="--clip-l and --clip-g"):
        sdcore.load_model(tmp_path / "sd3.safetensors", device="cpu")
    split = sdcore.load_model(tmp_path / "sd3.safetensors", device="cpu", dtype=torch.float32,
                              clip_l=tmp_path / "clip_l.safetensors", clip_g=tmp_path / "clip_g.safetensors",
                              t5xxl=tmp_path / "t5xxl_fp16.safetensors")
    ours, theirs = _state(model), _state(split)
    assert ours.keys() == theirs.keys()
    for k in ours:
        want = ours[k].half().float() if k.startswith("text_3.") else ours[k]
        assert torch.equal(theirs[k], want), k
    with pytest.raises(CheckpointError, match="swapped"):
        sdcore.load_model(tmp_path / "sd3.safetensors", device="cpu", clip_l=tmp_path / "clip_g.safetensors",
                          clip_g=tmp_path / "clip_l.safetensors")


def test_without_t5_the_t5_tokens_are_zeros(files, model, tmp_path):
    _, sd, pipe = files
    save_file({k: v for k, v in sd.items() if not k.startswith("text_encoders.t5xxl.")}, str(tmp_path / "no_t5.safetensors"))
    no_t5 = sdcore.load_model(tmp_path / "no_t5.safetensors", device="cpu", dtype=torch.float32)
    assert no_t5.text_encoder_3 is None
    cond = no_t5.conditioning([PROMPT], 64, 64)
    full = model.conditioning([PROMPT], 64, 64)
    assert cond["context"].shape == full["context"].shape
    assert cond["context"][:, 77:].abs().max() == 0
    assert torch.equal(cond["context"][:, :77], full["context"][:, :77]) and torch.equal(cond["y"], full["y"])
    pipe_no_t5 = StableDiffusion3Pipeline(**{**pipe.components, "text_encoder_3": None, "tokenizer_3": None})
    with torch.no_grad():
        ctx, _, pooled, _ = pipe_no_t5.encode_prompt(PROMPT, None, None, do_classifier_free_guidance=False)
    assert max_rel(cond["context"], ctx) < 1e-5


def test_bad_input(files, model, tmp_path):
    _, sd, _ = files
    # a T5 of another width than the MMDiT's context
    t5 = T5EncoderModel(T5Config(**{**SD3_T5, "d_model": 64}))
    save_file({k: v.contiguous() for k, v in t5.state_dict().items() if k != "encoder.embed_tokens.weight"},
              str(tmp_path / "t5_small.safetensors"))
    with pytest.raises(CheckpointError, match="T5 encoder .* is 64 wide; the MMDiT takes text 256 wide"):
        sdcore.load_model(files[0] / "sd3_tiny_incl_clips_t5xxl.safetensors", device="cpu",
                          t5xxl=tmp_path / "t5_small.safetensors")
    # an SD3 transformer with an SD1 VAE (4 latent channels)
    from sdcore.vae import AutoencoderKL, VAEConfig
    save_file(AutoencoderKL(VAEConfig(ch=32, ch_mult=(1, 2, 2, 2), num_res_blocks=1, norm_groups=8)).state_dict(),
              str(tmp_path / "sd1_vae.safetensors"))
    with pytest.raises(CheckpointError, match="makes 4-channel latents; the MMDiT draws 16-channel"):
        sdcore.load_model(files[0] / "sd3_tiny_incl_clips_t5xxl.safetensors", device="cpu",
                          vae=tmp_path / "sd1_vae.safetensors")
    with pytest.raises(CheckpointError, match="ControlNets for it are not supported"):
        sdcore.load_model(files[0] / "sd3_tiny_incl_clips_t5xxl.safetensors", device="cpu",
                          control_net=tmp_path / "sd1_vae.safetensors")
    p = dict(prompt="x", width=64, height=64, steps=1)
    for kw, field in [({"width": 72}, "width"), ({"width": 16 * 8 * 2 + 16}, "width"),
                      ({"control_image": Image.new("RGB", (64, 64))}, "control_image"),
                      ({"scheduler": "karras"}, "scheduler"), ({"sample_method": "dpm++2mv2"}, "sample_method")]:
        with pytest.raises(PipelineError) as e:
            generate(model, GenerationParams(**{**p, **kw}))
        assert e.value.field == field, (kw, e.value.message)


def test_text_encoders_on_another_device(files):
    """text_device (--clip-on-cpu): the encoders are built there in that device's own dtype and their outputs come
    to the model's device and dtype. On this CPU-only machine the two devices are one, so what is checked is the
    dtype split: a bfloat16 model whose encoders run in the CPU's auto dtype conditions exactly as a model loaded
    whole in that dtype, cast."""
    from sdcore.device import resolve_dtype
    path = files[0] / "sd3_tiny_incl_clips_t5xxl.safetensors"
    split = sdcore.load_model(path, device="cpu", dtype=torch.bfloat16, text_device="cpu")
    text_dtype = resolve_dtype("auto", "cpu")
    assert {next(e.parameters()).dtype for e in (split.text_encoder, split.text_encoder_2, split.text_encoder_3)} == {text_dtype}
    assert next(split.unet.parameters()).dtype == torch.bfloat16
    whole = sdcore.load_model(path, device="cpu", dtype=text_dtype)
    got, want = split.conditioning([PROMPT, NEGATIVE], 64, 64), whole.conditioning([PROMPT, NEGATIVE], 64, 64)
    for key in ("context", "y"):
        assert got[key].dtype == torch.bfloat16 and torch.equal(got[key], want[key].to(torch.bfloat16)), key
