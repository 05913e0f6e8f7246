"""FLUX.1 end to end on small random networks in the files users have: the transformer alone in Black Forest Labs'
names with ae.safetensors, clip_l and t5xxl files beside it (--vae, --clip-l, --t5xxl), ComfyUI's all-in-one file,
and diffusers' FluxPipeline folder; whole images against diffusers' FluxPipeline holding the same weights (dev with
its distilled guidance and size-dependent shift, schnell unshifted), and the refusals."""
import numpy as np
import pytest
import torch
from diffusers import FluxPipeline
from PIL import Image
from safetensors.torch import save_file

import sdcore
from bench.references import pixels
from sdcore.formats import CheckpointError
from sdcore.infotext import parse_infotext
from sdcore.pipeline import GenerationParams, PipelineError, generate, image_to_tensor
from tiny_models import flux_diffusers_pipeline, flux_files

PROMPT = "a paper boat on a puddle, morning light"


@pytest.fixture(scope="module", params=[True, False], ids=["dev", "schnell"])
def built(request, tmp_path_factory):
    dev = request.param
    d = tmp_path_factory.mktemp("flux-dev" if dev else "flux-schnell")
    parts = flux_files(d, dev=dev, seed=3 if dev else 4)
    model = sdcore.load_model(d / "transformer.safetensors", device="cpu", dtype=torch.float32, vae=d / "ae.safetensors",
                              clip_l=d / "clip_l.safetensors", t5xxl=d / "t5xxl.safetensors")
    return dev, d, model, flux_diffusers_pipeline(parts, d, dev=dev)


def _state(model) -> dict:
    nets = {"unet": model.unet, "vae": model.vae, "text": model.text_encoder, "text_3": model.text_encoder_3}
    return {f"{n}.{k}": v for n, net in nets.items() for k, v in net.state_dict().items()}


def test_every_layout_loads_the_same_networks(built):
    dev, d, model, pipe = built
    assert (model.family, model.prediction, model.native_size, model.t5_tokens) == ("flux", "flow", 1024, 512 if dev else 256)
    assert (model.vae.cfg.scale_factor, model.vae.cfg.shift_factor) == (0.3611, 0.1159)
    pipe.save_pretrained(d / "folder", safe_serialization=True)
    ours = _state(model)
    for other in (sdcore.load_model(d / "all_in_one.safetensors", device="cpu", dtype=torch.float32),
                  sdcore.load_model(d / "folder", device="cpu", dtype=torch.float32)):
        theirs = _state(other)
        assert ours.keys() == theirs.keys() and len(ours) > 100
        for k in ours:
            assert torch.equal(ours[k], theirs[k]), k


@pytest.mark.parametrize("size, steps, guidance", [((64, 64), 4, None), ((96, 64), 3, 5.0)])
def test_txt2img_equals_diffusers(built, size, steps, guidance):
    dev, _, model, pipe = built
    if guidance is not None and not dev:
        pytest.skip("schnell takes no guidance")
    w, h = size
    out = generate(model, GenerationParams(prompt=PROMPT, width=w, height=h, steps=steps, cfg_scale=1.0,
                                           sample_method="euler", seed=9, guidance=guidance))[0]
    noise = torch.randn((1, 16, h // 8, w // 8), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        ref = pipe(PROMPT, height=h, width=w, num_inference_steps=steps, guidance_scale=guidance or 3.5,
                   latents=FluxPipeline._pack_latents(noise, 1, 16, h // 8, w // 8), output_type="np",
                   max_sequence_length=model.t5_tokens).images[0]
    want = torch.from_numpy(np.round(ref * 255).astype(np.uint8)).permute(2, 0, 1)
    assert want.float().std() > 10
    assert (pixels(out.image).int() - want.int()).abs().max() <= 1
    assert parse_infotext(out.parameters).get("guidance") == ((guidance or 3.5) if dev else None)


def test_img2img_equals_a_reference_loop(built):
    """img2img (sd.cpp's floor(N·strength) + 1 of the N steps), written here with diffusers' FluxPipeline parts: its
    prompt encoding, packing, positions, transformer and VAE, the scheduler's sigmas for the whole run."""
    dev, _, model, pipe = built
    steps, strength, seed = 6, 0.5, 2
    init = Image.fromarray((np.indices((64, 64)).sum(0) * 2 % 255).astype(np.uint8)).convert("RGB")
    got = generate(model, GenerationParams(prompt=PROMPT, width=64, height=64, steps=steps, cfg_scale=1.0,
                                           sample_method="euler", seed=seed, init_image=init, strength=strength))[0].image
    sched = pipe.scheduler
    ramp = np.linspace(1.0, 1 / steps, steps)
    sched.set_timesteps(sigmas=ramp, mu=_mu(pipe, 16) if dev else None)
    sigmas = sched.sigmas.double()[steps - int(steps * strength) - 1:]
    vae, net = pipe.vae, pipe.transformer
    with torch.no_grad():
        ctx, pooled, text_ids = pipe.encode_prompt(PROMPT, None, max_sequence_length=model.t5_tokens)
        x0 = (vae.encode(image_to_tensor(init)).latent_dist.mode() - vae.config.shift_factor) * vae.config.scaling_factor
        noise = torch.randn((1, 16, 8, 8), generator=torch.Generator().manual_seed(seed))
        x = (1 - sigmas[0].float()) * x0 + sigmas[0].float() * noise
        img_ids = pipe._prepare_latent_image_ids(1, 4, 4, "cpu", torch.float32)
        guidance = torch.tensor([3.5]) if dev else None
        for s, s_next in zip(sigmas[:-1], sigmas[1:]):
            v = net(hidden_states=FluxPipeline._pack_latents(x, 1, 16, 8, 8), timestep=torch.tensor([float(s)]),
                    guidance=guidance, pooled_projections=pooled, encoder_hidden_states=ctx, txt_ids=text_ids,
                    img_ids=img_ids).sample
            x = x + float(s_next - s) * FluxPipeline._unpack_latents(v, 64, 64, 8)
        out = vae.decode(x / vae.config.scaling_factor + vae.config.shift_factor).sample[0]
    want = ((out.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    assert want.float().std() > 10
    assert (pixels(got).int() - want.int()).abs().max() <= 1


def _mu(pipe, image_seq_len: int) -> float:
    """diffusers' FluxPipeline's shift for an image of ``image_seq_len`` tokens (its calculate_shift)."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift
    c = pipe.scheduler.config
    return calculate_shift(image_seq_len, c.base_image_seq_len, c.max_image_seq_len, c.base_shift, c.max_shift)


def test_refusals(built, tmp_path):
    dev, d, model, _ = built
    with pytest.raises(CheckpointError, match="ae.safetensors"):
        sdcore.load_model(d / "transformer.safetensors", device="cpu", clip_l=d / "clip_l.safetensors",
                          t5xxl=d / "t5xxl.safetensors")
    with pytest.raises(CheckpointError, match="--t5xxl"):
        sdcore.load_model(d / "transformer.safetensors", device="cpu", vae=d / "ae.safetensors",
                          clip_l=d / "clip_l.safetensors")
    with pytest.raises(CheckpointError, match="--clip-g"):
        sdcore.load_model(d / "all_in_one.safetensors", device="cpu", clip_g=d / "clip_l.safetensors")
    from sdcore.vae import AutoencoderKL, VAEConfig
    save_file(AutoencoderKL(VAEConfig(ch=32, ch_mult=(1, 2, 2, 2), num_res_blocks=1)).state_dict(),
              str(tmp_path / "sd_vae.safetensors"))
    with pytest.raises(CheckpointError, match="makes 4-channel latents"):
        sdcore.load_model(d / "all_in_one.safetensors", device="cpu", vae=tmp_path / "sd_vae.safetensors")
    p = dict(prompt="x", width=64, height=64, steps=1, cfg_scale=1.0)
    cases = [({"width": 72}, "width"), ({"control_image": Image.new("RGB", (64, 64))}, "control_image"),
             ({"scheduler": "karras"}, "scheduler")]
    if not dev:
        cases.append(({"guidance": 3.5}, "guidance"))
    for kw, field in cases:
        with pytest.raises(PipelineError) as e:
            generate(model, GenerationParams(**{**p, **kw}))
        assert e.value.field == field, (kw, e.value.message)


def test_a_lora_changes_the_image_and_its_removal_restores_it(built, tmp_path):
    """A FLUX LoRA (sd-scripts' names) through the pipeline: the image changes, the infotext names it, and the next
    request without it draws the first image again, bit for bit."""
    from bench.lora_files import write_transformer_lora
    _, _, model, _ = built
    write_transformer_lora(tmp_path / "grain.safetensors", model, layout="kohya", seed=1)
    params = dict(prompt=PROMPT, width=64, height=64, steps=2, cfg_scale=1.0, sample_method="euler", seed=5)
    plain = generate(model, GenerationParams(**params))[0]
    adapted = generate(model, GenerationParams(**params, loras=[(str(tmp_path / "grain.safetensors"), 0.8)]))[0]
    again = generate(model, GenerationParams(**params))[0]
    assert (pixels(adapted.image).float() - pixels(plain.image).float()).abs().mean() > 1
    assert 'Lora hashes: "grain: ' in adapted.parameters
    assert torch.equal(pixels(again.image), pixels(plain.image))
