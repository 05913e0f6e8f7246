"""Small random networks the core tests share (each full-width model lives in its own test): an SD2-shaped
configuration (OpenCLIP text tower, head dim 64, linear projections), an SDXL-shaped one (no attention at
the first level, deeper transformers further down, two text encoders whose hidden states are concatenated,
the pooled output and six size numbers in the label vector), an SDXL-refiner-shaped one (four levels, bigG
alone, five numbers with the aesthetic score) and a ControlNet with deterministic weights."""
import torch

from sdcore.clip import TextConfig
from sdcore.controlnet import ControlNet
from sdcore.formats.write import random_init_
from sdcore.unet import UNetConfig
from sdcore.vae import VAEConfig

SD2_UNET = UNetConfig(model_channels=64, channel_mult=(1, 2, 2), num_res_blocks=2, attention_levels=(0, 1),
                      transformer_depth=(1, 2, 0), transformer_depth_middle=1, num_heads=None, head_dim=64,
                      context_dim=64, use_linear_proj=True)
SD2_VAE = VAEConfig(ch=32, ch_mult=(1, 2, 2), num_res_blocks=2)
SD2_TEXT = TextConfig(width=64, layers=3, heads=1, act="gelu", output_layer=-2, pad_id=0)


def random_controlnet(cfg: UNetConfig, seed: int = 5) -> ControlNet:
    torch.manual_seed(seed)
    return random_init_(ControlNet(cfg), seed)


SDXL_TEXT = TextConfig(width=64, layers=3, heads=1, act="quick_gelu", output_layer=-2, final_norm=False)
SDXL_TEXT_2 = TextConfig(width=128, layers=3, heads=2, act="gelu", output_layer=-2, final_norm=False, pad_id=0,
                         projection_dim=128)
SDXL_UNET = UNetConfig(model_channels=64, channel_mult=(1, 2, 2), num_res_blocks=2, attention_levels=(1, 2),
                       transformer_depth=(0, 1, 2), transformer_depth_middle=2, num_heads=None, head_dim=64,
                       context_dim=64 + 128, use_linear_proj=True, adm_in_channels=128 + 6 * 256)
# The refiner: bigG alone (context = its width), the pooled output and five numbers (size, crop, aesthetic score)
SDXL_REFINER_UNET = UNetConfig(model_channels=64, channel_mult=(1, 2, 2, 2), num_res_blocks=2, attention_levels=(1, 2),
                               transformer_depth=(0, 2, 2, 0), transformer_depth_middle=2, num_heads=None, head_dim=64,
                               context_dim=128, use_linear_proj=True, adm_in_channels=128 + 5 * 256)
SDXL_VAE = VAEConfig(ch=32, ch_mult=(1, 1, 2, 2), num_res_blocks=1, scale_factor=0.13025)


def random_mlp(dim: int, hidden: int, seed: int = 0):
    """The float64 weights (w1 [dim, hidden], b1, u [hidden], w2 [hidden, dim]) of the small random nonlinear
    networks the sampler tests use as denoisers: tanh(x·w1 + b1 + σ·u)·w2, each test wrapping it its own way."""
    g = torch.Generator().manual_seed(seed)
    w1 = torch.randn(dim, hidden, generator=g, dtype=torch.float64) / dim ** 0.5
    b1 = torch.randn(hidden, generator=g, dtype=torch.float64)
    u = torch.randn(hidden, generator=g, dtype=torch.float64)
    w2 = torch.randn(hidden, dim, generator=g, dtype=torch.float64) / hidden ** 0.5
    return w1, b1, u, w2


# SD3: the three text encoders, MMDiT and 16-channel VAE at small widths (CLIP-L narrower than bigG, their hidden
# states side by side padded to T5's width, the MMDiT's context width; their pooled outputs side by side). What
# the shapes cannot tell is as in the real files: heads of 64 channels, 32 normalisation groups.
SD3_CLIP_L = TextConfig(width=64, layers=3, heads=1, act="quick_gelu", output_layer=-2, final_norm=False,
                        projection_dim=64)
SD3_CLIP_G = TextConfig(width=128, layers=3, heads=2, act="gelu", output_layer=-2, final_norm=False, pad_id=0,
                        projection_dim=128)
SD3_T5 = dict(vocab_size=32128, d_model=256, d_kv=16, num_heads=4, d_ff=128, num_layers=2,   # transformers' T5Config
              feed_forward_proj="gated-gelu")
SD3_VAE = VAEConfig(ch=32, ch_mult=(1, 2, 2, 2), num_res_blocks=1, z_channels=16, scale_factor=1.5305,
                    shift_factor=0.0609, quant_conv=False)


def sd3_mmdit_config(qk_norm=False, dual=()):
    from sdcore.mmdit import MMDiTConfig
    return MMDiTConfig(depth=3, width=128, head_dim=64, in_channels=16, context_dim=256, pooled_dim=192,
                       pos_embed_max_size=16, qk_norm=qk_norm, dual_attention_layers=dual)


def sd3_single_file(path, seed: int = 0, mmdit=None, clips: bool = True, t5: bool = True) -> dict:
    """Stability AI's SD3 single-file layout with random weights: model.diffusion_model.* (the MMDiT, Stability's
    names), first_stage_model.* (LDM names), and (``clips``, ``t5``) text_encoders.{clip_l,clip_g,t5xxl}.transformer.*
    in transformers' names, as sd3_medium_incl_clips_t5xxlfp16.safetensors holds them. Returns the tensors."""
    from safetensors.torch import save_file
    from transformers import CLIPTextModelWithProjection, T5Config, T5EncoderModel

    from bench.references import hf_text_config
    from sdcore.mmdit import MMDiT
    from sdcore.vae import AutoencoderKL
    torch.manual_seed(seed)
    with torch.no_grad():
        sd = {f"model.diffusion_model.{k}": v
              for k, v in random_init_(MMDiT(mmdit or sd3_mmdit_config()), seed).state_dict().items()}
        sd |= {f"first_stage_model.{k}": v for k, v in random_init_(AutoencoderKL(SD3_VAE), seed + 1).state_dict().items()}
        if clips:
            for i, (name, cfg) in enumerate((("clip_l", SD3_CLIP_L), ("clip_g", SD3_CLIP_G))):
                config = hf_text_config(cfg)
                config.projection_dim = cfg.projection_dim
                hf = random_init_(CLIPTextModelWithProjection(config), seed + 2 + i, gain=1.5)
                sd |= {f"text_encoders.{name}.transformer.{k}": v for k, v in hf.state_dict().items()}
        if t5:
            hf = random_init_(T5EncoderModel(T5Config(**SD3_T5)), seed + 4)
            sd |= {f"text_encoders.t5xxl.transformer.{k}": v for k, v in hf.state_dict().items()
                   if k != "encoder.embed_tokens.weight"}          # tied to shared.weight
    sd = {k: v.detach().clone().contiguous() for k, v in sd.items()}
    save_file(sd, str(path))
    return sd


def sub(sd: dict, prefix: str) -> dict:
    """The entries of a state dict under ``prefix``, with it stripped."""
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def _sd3_clip(sd, name, cfg):
    from transformers import CLIPTextModelWithProjection

    from bench.references import hf_text_config
    config = hf_text_config(cfg)
    config.projection_dim = cfg.projection_dim
    model = CLIPTextModelWithProjection(config).eval()
    model.load_state_dict(sub(sd, f"text_encoders.{name}.transformer."))
    return model


def sd3_diffusers_pipeline(sd: dict, folder):
    """diffusers' SD3 pipeline holding a single file's weights (diffusers' converters for the MMDiT and the VAE;
    transformers' CLIP and T5 tokenizers, from our copies of their vocabularies)."""
    import gzip

    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint, convert_sd3_transformer_checkpoint_to_diffusers
    from transformers import T5Config, T5EncoderModel, T5TokenizerFast

    from bench.references import diffusers_vae_kwargs
    from bench.util import clip_tokenizer
    from sdcore.t5_tokenizer import VOCAB
    cfg = sd3_mmdit_config()
    transformer = SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=16, num_layers=cfg.depth, attention_head_dim=cfg.head_dim,
        num_attention_heads=cfg.heads, joint_attention_dim=cfg.context_dim, caption_projection_dim=cfg.width,
        pooled_projection_dim=cfg.pooled_dim, out_channels=16, pos_embed_max_size=cfg.pos_embed_max_size).eval()
    missing, unexpected = transformer.load_state_dict(
        convert_sd3_transformer_checkpoint_to_diffusers(dict(sd)), strict=False)   # it pops what it converts
    assert not missing and not unexpected, (missing, unexpected)
    vae = AutoencoderKL(**diffusers_vae_kwargs(SD3_VAE)).eval()
    vae.load_state_dict(convert_ldm_vae_checkpoint(sub(sd, "first_stage_model."), dict(vae.config)))
    t5 = T5EncoderModel(T5Config(**SD3_T5)).eval()
    t5.load_state_dict(sub(sd, "text_encoders.t5xxl.transformer."), strict=False)
    tok_json = folder / "t5-tokenizer.json"
    tok_json.write_bytes(gzip.open(VOCAB).read())
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
        text_encoder=_sd3_clip(sd, "clip_l", SD3_CLIP_L), tokenizer=clip_tokenizer(),
        text_encoder_2=_sd3_clip(sd, "clip_g", SD3_CLIP_G), tokenizer_2=clip_tokenizer(pad_token="!"),
        text_encoder_3=t5, tokenizer_3=T5TokenizerFast(tokenizer_file=str(tok_json)))
    pipe.set_progress_bar_config(disable=True)
    return pipe


# FLUX: its transformer at a small width with the real head width (128 = the RoPE axes' 16 + 56 + 56), CLIP-L as
# SD3's (pooled output only), a T5 and the 16-channel VAE (FLUX's scale and shift)
FLUX_CLIP_L = TextConfig(width=64, layers=3, heads=1, act="quick_gelu")
FLUX_VAE = VAEConfig(ch=32, ch_mult=(1, 2, 2, 2), num_res_blocks=1, z_channels=16, scale_factor=0.3611,
                     shift_factor=0.1159, quant_conv=False)


def flux_config(dev: bool = True):
    from sdcore.flux import FluxConfig
    return FluxConfig(in_channels=64, width=256, heads=2, depth=2, depth_single=2, context_dim=SD3_T5["d_model"],
                      pooled_dim=FLUX_CLIP_L.width, guidance_embed=dev)


def flux_diffusers_transformer(dev: bool = True):
    from diffusers import FluxTransformer2DModel
    cfg = flux_config(dev)
    return FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=cfg.depth, num_single_layers=cfg.depth_single,
                                  attention_head_dim=cfg.head_dim, num_attention_heads=cfg.heads,
                                  joint_attention_dim=cfg.context_dim, pooled_projection_dim=cfg.pooled_dim,
                                  guidance_embeds=dev).eval()


def flux_files(folder, dev: bool = True, seed: int = 0) -> dict:
    """The files a FLUX user has, random weights: the transformer alone in Black Forest Labs' names
    (flux1-dev.safetensors), ae.safetensors (bare LDM names), clip_l.safetensors and t5xxl.safetensors (transformers'
    names), and ComfyUI's all-in-one file of the four (model.diffusion_model., vae., text_encoders.*.transformer.).
    Returns {name: state dict}, and under "diffusers" the transformer's in diffusers' names. (The transformer is made
    in diffusers' names and renamed by our table, which tests/core/test_flux.py holds to diffusers' outputs:
    diffusers' own single-file converter works at FLUX's full width only.)"""
    from safetensors.torch import save_file
    from transformers import CLIPTextModel, T5Config, T5EncoderModel

    from bench.references import hf_text_config
    from sdcore.formats.files import Tensors
    from sdcore.formats.layouts import flux_from_diffusers
    from sdcore.vae import AutoencoderKL
    torch.manual_seed(seed)
    with torch.no_grad():
        theirs = random_init_(flux_diffusers_transformer(dev), seed).state_dict()
        named = Tensors()
        for k, v in theirs.items():
            named.add(k, lambda v=v: v, v.shape)
        parts = {"transformer": {k: thunk() for k, (thunk, _) in flux_from_diffusers(named).entries.items()},
                 "ae": random_init_(AutoencoderKL(FLUX_VAE), seed + 1).state_dict(),
                 "clip_l": {"text_model." + k: v for k, v in             # the files' names (transformers 5 drops it)
                            random_init_(CLIPTextModel(hf_text_config(FLUX_CLIP_L)), seed + 2, gain=1.5).state_dict().items()},
                 "t5xxl": {k: v for k, v in random_init_(T5EncoderModel(T5Config(**SD3_T5)), seed + 3).state_dict().items()
                           if k != "encoder.embed_tokens.weight"}}
    parts = {name: {k: v.detach().clone().contiguous() for k, v in sd.items()} for name, sd in parts.items()}
    for name, sd in parts.items():
        save_file(sd, str(folder / f"{name}.safetensors"))
    prefixes = {"transformer": "model.diffusion_model.", "ae": "vae.", "clip_l": "text_encoders.clip_l.transformer.",
                "t5xxl": "text_encoders.t5xxl.transformer."}
    save_file({prefixes[name] + k: v for name, sd in parts.items() for k, v in sd.items()},
              str(folder / "all_in_one.safetensors"))
    parts["diffusers"] = theirs
    return parts


def flux_diffusers_pipeline(parts: dict, folder, dev: bool = True):
    """diffusers' FluxPipeline holding those weights (diffusers' converters for the transformer and the VAE), with
    the scheduler of the released dev / schnell folders."""
    import gzip

    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
    from transformers import CLIPTextModel, T5Config, T5EncoderModel, T5TokenizerFast

    from bench.references import diffusers_vae_kwargs, hf_text_config
    from bench.util import clip_tokenizer
    from sdcore.t5_tokenizer import VOCAB
    transformer = flux_diffusers_transformer(dev)
    transformer.load_state_dict(parts["diffusers"])
    vae = AutoencoderKL(**diffusers_vae_kwargs(FLUX_VAE)).eval()
    vae.load_state_dict(convert_ldm_vae_checkpoint(dict(parts["ae"]), dict(vae.config)))
    clip = CLIPTextModel(hf_text_config(FLUX_CLIP_L)).eval()
    clip.load_state_dict({k.removeprefix("text_model."): v for k, v in parts["clip_l"].items()})
    t5 = T5EncoderModel(T5Config(**SD3_T5)).eval()
    t5.load_state_dict(parts["t5xxl"], strict=False)
    tok_json = folder / "t5-tokenizer.json"
    tok_json.write_bytes(gzip.open(VOCAB).read())
    scheduler = (FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                 base_image_seq_len=256, max_image_seq_len=4096) if dev
                 else FlowMatchEulerDiscreteScheduler(shift=1.0))
    pipe = FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=clip, tokenizer=clip_tokenizer(), text_encoder_2=t5,
                        tokenizer_2=T5TokenizerFast(tokenizer_file=str(tok_json)), transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe
