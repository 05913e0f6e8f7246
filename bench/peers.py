"""The peers, built on the same weights: diffusers/transformers modules and diffusers' whole pipeline."""
from pathlib import Path

import torch

from bench.util import NEGATIVE, PROMPT, clip_tokenizer


def reference_modules(model):
    """diffusers UNet2DConditionModel, AutoencoderKL and transformers CLIPTextModel holding ``model``'s
    weights (renamed by our own layout map: bench/references.py), and for SDXL its second text encoder
    (CLIPTextModelWithProjection; else None). In float32 the diffusers ones share our tensors' memory."""
    from bench import references as refs
    return (refs.diffusers_unet_from_ours(model.unet), refs.diffusers_vae_from_ours(model.vae),
            refs.transformers_text_from_ours(model.text_encoder),
            refs.transformers_text_from_ours(model.text_encoder_2) if model.text_encoder_2 is not None else None)


def scheduler_euler_a():
    """Euler ancestral over SD's scaled-linear betas (what our euler_a + discrete schedule does)."""
    from diffusers import EulerAncestralDiscreteScheduler
    return EulerAncestralDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                           num_train_timesteps=1000, timestep_spacing="trailing", steps_offset=1)


def pipeline(unet, vae, text, text_2=None):
    """diffusers' StableDiffusionPipeline from modules (no safety checker), with a CLIPTokenizer built offline;
    with a second text encoder, StableDiffusionXLPipeline (bigG's tokenizer pads with "!", token 0)."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    if text_2 is not None:
        pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=text, text_encoder_2=text_2, tokenizer=clip_tokenizer(),
                                         tokenizer_2=clip_tokenizer(pad_token="!"), unet=unet, scheduler=scheduler_euler_a())
        pipe.set_progress_bar_config(disable=True)
        return pipe
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=clip_tokenizer(), unet=unet,
                                   scheduler=scheduler_euler_a(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pipeline_from_folder(folder: Path, dtype, device="cpu"):
    """How a diffusers user loads the same weights: the components of a diffusers folder (fp16 variant)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection
    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", variant="fp16", torch_dtype=dtype)
    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae", variant="fp16", torch_dtype=dtype)
    text = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder", variant="fp16", dtype=dtype)
    text_2 = (CLIPTextModelWithProjection.from_pretrained(folder, subfolder="text_encoder_2", variant="fp16", dtype=dtype)
              .to(device) if (folder / "text_encoder_2").exists() else None)
    return pipeline(unet.to(device), vae.to(device), text.to(device), text_2)


def run_pipeline(pipe, size: int, steps: int, seed: int = 1, cfg: float = 7.0):
    """One txt2img image (PIL) from diffusers' pipeline; its noise from a CPU generator, as ours."""
    return pipe(PROMPT, negative_prompt=NEGATIVE, height=size, width=size, num_inference_steps=steps,
                guidance_scale=cfg, generator=torch.Generator("cpu").manual_seed(seed), output_type="pil").images[0]
