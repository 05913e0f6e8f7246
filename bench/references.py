"""Test-only bridges to the reference implementations (diffusers, transformers).

The weights always travel through *our* layout code (sdcore.formats.layouts), never through
a diffusers conversion helper, so a parity test checks our loader's mapping as well as our networks.
"""
import json
import os

import torch
from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from sdcore.clip import TextConfig
from sdcore.formats import layouts
from sdcore.formats.layouts import text_to_hf
from sdcore.unet import UNetConfig
from sdcore.vae import VAEConfig


SDXL_TIME_EMBED_DIM = 256          # diffusers' addition_time_embed_dim of SDXL's size conditioning
# The released SDXL shapes (sd_xl_base_1.0, sd_xl_refiner_1.0), which the full-size tests and the benchmark build
SDXL_BASE_UNET = UNetConfig(model_channels=320, channel_mult=(1, 2, 4), num_res_blocks=2, attention_levels=(1, 2),
                            transformer_depth=(0, 2, 10), transformer_depth_middle=10, num_heads=None, head_dim=64,
                            context_dim=768 + 1280, use_linear_proj=True, adm_in_channels=1280 + 6 * 256)
SDXL_CLIP_L = TextConfig(width=768, layers=12, heads=12, act="quick_gelu", output_layer=-2, final_norm=False)
SDXL_BIGG = TextConfig(width=1280, layers=32, heads=20, act="gelu", output_layer=-2, final_norm=False, pad_id=0,
                       projection_dim=1280)
SDXL_BASE_VAE = VAEConfig(scale_factor=0.13025)
SDXL_REFINER_FULL_UNET = UNetConfig(model_channels=384, channel_mult=(1, 2, 4, 4), num_res_blocks=2,
                                    attention_levels=(1, 2), transformer_depth=(0, 4, 4, 0), transformer_depth_middle=4,
                                    num_heads=None, head_dim=64, context_dim=1280, use_linear_proj=True,
                                    adm_in_channels=1280 + 5 * 256)


def diffusers_unet_kwargs(cfg: UNetConfig) -> dict:
    chans = [cfg.model_channels * m for m in cfg.channel_mult]
    heads = [cfg.heads_for(c) for c in chans]
    depth = [max(d, 1) for d in cfg.transformer_depth]
    if cfg.transformer_depth_middle:              # diffusers takes the middle block's depth from the last level
        depth[-1] = cfg.transformer_depth_middle
    attn = [i in cfg.attention_levels for i in range(len(chans))]
    pruned = {}
    if cfg.transformer_depth_output:          # per up block (deepest first), a depth per layer
        n = cfg.num_res_blocks + 1
        pruned["reverse_transformer_layers_per_block"] = [
            [max(d, 1) for d in cfg.transformer_depth_output[i * n:(i + 1) * n]] for i in range(len(chans))]
    if not cfg.transformer_depth_middle:
        pruned["mid_block_type"] = "UNetMidBlock2D"
    return dict(sample_size=None, in_channels=cfg.in_channels, out_channels=cfg.out_channels,
                down_block_types=["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn],
                up_block_types=["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)],
                block_out_channels=chans, layers_per_block=cfg.num_res_blocks,
                attention_head_dim=heads[0] if len(set(heads)) == 1 else heads, cross_attention_dim=cfg.context_dim,
                use_linear_projection=cfg.use_linear_proj, transformer_layers_per_block=depth, norm_num_groups=32,
                **(dict(addition_embed_type="text_time", addition_time_embed_dim=SDXL_TIME_EMBED_DIM,
                        projection_class_embeddings_input_dim=cfg.adm_in_channels) if cfg.adm_in_channels else {}),
                **pruned)


def diffusers_vae_kwargs(cfg: VAEConfig) -> dict:
    n = len(cfg.ch_mult)
    return dict(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * n,
                up_block_types=["UpDecoderBlock2D"] * n, block_out_channels=[cfg.ch * m for m in cfg.ch_mult],
                layers_per_block=cfg.num_res_blocks, latent_channels=cfg.z_channels, norm_num_groups=cfg.norm_groups,
                scaling_factor=cfg.scale_factor, shift_factor=cfg.shift_factor, use_quant_conv=cfg.quant_conv,
                use_post_quant_conv=cfg.quant_conv, sample_size=64)


def hf_text_config(text_cfg) -> CLIPTextConfig:
    return CLIPTextConfig(vocab_size=text_cfg.vocab_size, hidden_size=text_cfg.width, intermediate_size=4 * text_cfg.width,
                          num_hidden_layers=text_cfg.layers, num_attention_heads=text_cfg.heads,
                          max_position_embeddings=text_cfg.context_length, hidden_act=text_cfg.act,
                          bos_token_id=49406, eos_token_id=49407, pad_token_id=text_cfg.pad_id, projection_dim=8)


def _meta_build(cls, sd, **kwargs):
    with torch.device("meta"):
        model = cls(**kwargs)
    model.load_state_dict(sd, strict=True, assign=True)
    return model.eval().requires_grad_(False)


def diffusers_unet_from_ours(unet, dtype=torch.float32) -> UNet2DConditionModel:
    """The diffusers UNet holding our UNet's weights, renamed by our own layout map (shared where the
    dtype is already ``dtype``; None keeps it)."""
    sd = unet.state_dict()
    name_map = layouts.unet_name_map(sd.keys(), unet.cfg)
    return _meta_build(UNet2DConditionModel, {name_map[k]: v.to(dtype or v.dtype) for k, v in sd.items()},
                       **diffusers_unet_kwargs(unet.cfg))


def diffusers_controlnet_kwargs(cfg: UNetConfig) -> dict:
    kw = diffusers_unet_kwargs(cfg)
    for k in ("sample_size", "out_channels", "up_block_types"):      # a ControlNet has no decoder half
        del kw[k]
    return kw


def diffusers_controlnet_from_ours(cn, dtype=torch.float32) -> ControlNetModel:
    """The diffusers ControlNetModel holding our ControlNet's weights, renamed by our own layout map."""
    sd = cn.state_dict()
    name_map = layouts.controlnet_name_map(sd.keys(), cn.cfg)
    return _meta_build(ControlNetModel, {name_map[k]: v.to(dtype or v.dtype) for k, v in sd.items()},
                       **diffusers_controlnet_kwargs(cn.cfg))


def diffusers_vae_from_ours(vae, dtype=torch.float32) -> AutoencoderKL:
    sd = vae.state_dict()
    name_map = layouts.vae_name_map(sd.keys(), len(vae.cfg.ch_mult))
    theirs = {name_map[k]: (v[:, :, 0, 0] if layouts.vae_is_linear_attn(name_map[k]) else v).to(dtype or v.dtype)
              for k, v in sd.items()}
    return _meta_build(AutoencoderKL, theirs, **diffusers_vae_kwargs(vae.cfg))


def transformers_text_from_ours(text) -> CLIPTextModel:
    """transformers' CLIPTextModel holding our text encoder's weights; with a projection (SDXL's bigG),
    CLIPTextModelWithProjection (its ``text_embeds`` are the pooled output)."""
    projection = text.cfg.projection_dim is not None
    config = hf_text_config(text.cfg)
    if projection:
        config.projection_dim = text.cfg.projection_dim
    model = (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)   # not on meta: buffers
    theirs = {k: v.float() for k, v in text_to_hf(text).items() if projection or k != "text_projection.weight"}
    prefix = "text_model." if any(k.startswith("text_model.") for k in model.state_dict()) else ""
    theirs = {(k if k == "text_projection.weight" else prefix + k): v for k, v in theirs.items()}
    for k in set(model.state_dict()) - set(theirs):    # position_ids, a persistent buffer in transformers 4.x
        theirs[k] = model.state_dict()[k]
    model.load_state_dict(theirs, strict=True)
    return model.eval().requires_grad_(False)


def save_diffusers_folder(folder, unet, vae, text, *, prediction="epsilon", pad_token="<|endoftext|>", dtype=torch.float32):
    """A diffusers pipeline folder (model_index.json, unet/, vae/, text_encoder/, ...) of the reference models."""
    os.makedirs(folder, exist_ok=True)
    unet.to(dtype).save_pretrained(os.path.join(folder, "unet"), variant="fp16" if dtype == torch.float16 else None)
    vae.to(dtype).save_pretrained(os.path.join(folder, "vae"), variant="fp16" if dtype == torch.float16 else None)
    text.to(dtype).save_pretrained(os.path.join(folder, "text_encoder"), variant="fp16" if dtype == torch.float16 else None)
    json.dump({"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
               "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "CLIPTextModel"],
               "tokenizer": ["transformers", "CLIPTokenizer"], "scheduler": ["diffusers", "PNDMScheduler"]},
              open(os.path.join(folder, "model_index.json"), "w"))
    os.makedirs(os.path.join(folder, "scheduler"), exist_ok=True)
    json.dump({"prediction_type": prediction, "beta_schedule": "scaled_linear"},
              open(os.path.join(folder, "scheduler", "scheduler_config.json"), "w"))
    os.makedirs(os.path.join(folder, "tokenizer"), exist_ok=True)
    json.dump({"pad_token": pad_token}, open(os.path.join(folder, "tokenizer", "special_tokens_map.json"), "w"))
    return folder


def save_sdxl_folder(folder, unet, vae, text, text_2, dtype=torch.float32):
    """The diffusers folder of an SDXL base model (our networks written in diffusers' names by our layout
    maps; float16: the *.fp16.safetensors variant), one network converted at a time."""
    save_diffusers_folder(folder, diffusers_unet_from_ours(unet, dtype), diffusers_vae_from_ours(vae, dtype),
                          transformers_text_from_ours(text), dtype=dtype)
    transformers_text_from_ours(text_2).to(dtype).save_pretrained(
        os.path.join(folder, "text_encoder_2"), variant="fp16" if dtype == torch.float16 else None)
    index_path = os.path.join(folder, "model_index.json")
    index = json.load(open(index_path))
    index.update(_class_name="StableDiffusionXLPipeline", text_encoder_2=["transformers", "CLIPTextModelWithProjection"],
                 tokenizer_2=["transformers", "CLIPTokenizer"])
    json.dump(index, open(index_path, "w"))
    os.makedirs(os.path.join(folder, "tokenizer_2"), exist_ok=True)
    json.dump({"pad_token": "!"}, open(os.path.join(folder, "tokenizer_2", "special_tokens_map.json"), "w"))
    return folder


def sdxl_tokens(prompts):
    """Token ids of both SDXL tokenizers: OpenCLIP's (bigG) pads with 0, CLIP ViT-L's with its end token."""
    from open_clip.tokenizer import SimpleTokenizer
    ids = SimpleTokenizer()(prompts)
    ids_l = ids.clone()
    ids_l[ids_l == 0] = 49407
    return ids_l, ids


def sdxl_encode_prompt(text, text_2, prompts):
    """diffusers' StableDiffusionXLPipeline.encode_prompt, written out with transformers' models holding our
    encoders' weights: each encoder's hidden_states[-2], concatenated; the pooled output is
    CLIPTextModelWithProjection's text_embeds."""
    ids_l, ids_g = sdxl_tokens(prompts)
    with torch.no_grad():
        out_l = transformers_text_from_ours(text)(ids_l, output_hidden_states=True)
        out_g = transformers_text_from_ours(text_2)(ids_g, output_hidden_states=True)
    return torch.cat([out_l.hidden_states[-2], out_g.hidden_states[-2]], dim=-1), out_g.text_embeds


def max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| relative to the reference's largest magnitude."""
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def max_abs(a, b) -> float:
    return (a.float() - b.float()).abs().max().item()


def reference_image(model, prompt, negative, seed, steps, cfg, size, sampler="sample_euler", control=None,
                    control_strength=1.0):
    """A whole txt2img written with the reference implementations only: open_clip's tokenizer,
    transformers' CLIP, diffusers' UNet and VAE (holding ``model``'s weights), k-diffusion's discrete
    eps denoiser and sampler; noise from a CPU generator seeded with ``seed`` (initial latent, then
    each ancestral draw). ``control``: a hint [1, 3, size, size] in [0, 1] for diffusers' ControlNetModel
    (holding ``model.controlnet``'s weights), applied to both halves of the CFG batch.
    Returns uint8 pixels [3, size, size]."""
    from open_clip.tokenizer import SimpleTokenizer
    from bench.kdiff import external, sampling
    du, dv = diffusers_unet_from_ours(model.unet), diffusers_vae_from_ours(model.vae)
    dt = transformers_text_from_ours(model.text_encoder)
    ids = SimpleTokenizer()([prompt, negative])
    ids[ids == 0] = 49407                                       # SD1 pads with eos
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    with torch.no_grad():
        cond, uncond = dt(ids).last_hidden_state.chunk(2)

        dcn = diffusers_controlnet_from_ours(model.controlnet) if control is not None else None

        class GuidedEps(torch.nn.Module):
            def forward(self, x, t, **_):
                x, t, ctx, residuals = torch.cat([x, x]), torch.cat([t, t]), torch.cat([uncond, cond]), {}
                if dcn is not None:
                    down, mid = dcn(x, t, ctx, controlnet_cond=control, conditioning_scale=control_strength, return_dict=False)
                    residuals = dict(down_block_additional_residuals=down, mid_block_additional_residual=mid)
                out = du(x, t, encoder_hidden_states=ctx, **residuals).sample
                u, c = out.chunk(2)
                return u + cfg * (c - u)

        denoiser = external.DiscreteEpsDDPMDenoiser(GuidedEps(), torch.cumprod(1 - betas, 0).float(), quantize=False)
        sigmas = denoiser.get_sigmas(steps)
        g = torch.Generator().manual_seed(seed)
        shape = (1, 4, size // 8, size // 8)
        x = torch.randn(shape, generator=g) * sigmas[0]
        kwargs = {"noise_sampler": lambda *_: torch.randn(shape, generator=g)} if "ancestral" in sampler else {}
        x = getattr(sampling, sampler)(denoiser, x, sigmas, disable=True, **kwargs)
        img = dv.decode(x / 0.18215).sample[0]
    return ((img.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def pixels(img) -> torch.Tensor:
    """PIL RGB image -> uint8 [3, H, W]."""
    data = torch.frombuffer(bytearray(img.convert("RGB").tobytes()), dtype=torch.uint8)
    return data.view(img.height, img.width, 3).permute(2, 0, 1)
