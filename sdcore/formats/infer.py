"""Network configurations from what a checkpoint holds: read off our-named tensors' keys and shapes,
or translated from a diffusers ``config.json``. What neither tells (a VAE's scale factor, an SD2
model's prediction type, ...) comes from the file's metadata (``files.read_metadata``) or, for the
prediction type, from one forward pass (``detect_v_prediction``).
"""
import math
import re

import torch

from ..clip import TextConfig
from ..flux import FluxConfig
from ..mmdit import MMDiTConfig
from ..t5 import T5Config
from ..tokenizer import EOS
from ..unet import UNet, UNetConfig
from ..vae import VAEConfig
from .files import CheckpointError, Tensors

REFINER = "sdxl_refiner"            # SDXL's refiner: OpenCLIP bigG alone, aesthetic-score conditioning
SDXL_FAMILIES = ("sdxl", REFINER)   # SDXL's latent space, its VAE scale and its label-vector UNets
SD3 = "sd3"                         # SD3 / SD3.5: MMDiT, CLIP-L + bigG + T5-XXL, 16-channel rectified flow
FLUX = "flux"                       # FLUX.1 dev / schnell: its transformer, CLIP-L (pooled only) + T5-XXL
POOLED_FAMILIES = SDXL_FAMILIES + (SD3, FLUX)   # those conditioned on the CLIP towers' pooled outputs


# ------------------------------------------------------------------------------------------------
# From our-named tensors
# ------------------------------------------------------------------------------------------------
def infer_unet_config(t: Tensors) -> UNetConfig:
    conv_in = t.shape("input_blocks.0.0.weight")
    mc = conv_in[0]
    res, down = {}, []
    n = 1
    while f"input_blocks.{n}.0.in_layers.2.weight" in t or f"input_blocks.{n}.0.op.weight" in t:
        if f"input_blocks.{n}.0.op.weight" in t:
            down.append(n)
        else:
            res[n] = t.shape(f"input_blocks.{n}.0.in_layers.2.weight")[0]
        n += 1
    nrb = (down[0] - 1) if down else len(res)
    n_levels = len(down) + 1
    mult, attn, depth = [], [], []
    for level in range(n_levels):
        first = level * (nrb + 1) + 1
        mult.append(res[first] // mc)
        blocks = {int(m.group(1)) for k in t.keys()
                  if (m := re.match(rf"input_blocks\.{first}\.1\.transformer_blocks\.(\d+)\.", k))}
        depth.append(len(blocks))
        if blocks:
            attn.append(level)
    mid_depth = len({k.split(".")[3] for k in t.keys() if k.startswith("middle_block.1.transformer_blocks.")})
    out_depth = []                          # per output block, deepest level first: pruned SDXLs differ per block
    for i in range(n_levels * (nrb + 1)):       # None: the block is missing (an incomplete file, named later)
        out_depth.append(len({m.group(1) for k in t.keys()
                              if (m := re.match(rf"output_blocks\.{i}\.1\.transformer_blocks\.(\d+)\.", k))})
                         if f"output_blocks.{i}.0.in_layers.2.weight" in t else None)
    to_k = next(k for k in t.keys() if k.endswith("attn2.to_k.weight"))
    context_dim = t.shape(to_k)[1]
    proj = next(k for k in t.keys() if k.endswith("proj_in.weight"))
    # SD1 has 8 heads of any width, SD2 heads of width 64: the context width tells them apart
    return UNetConfig(in_channels=conv_in[1], out_channels=t.shape("out.2.weight")[0], model_channels=mc,
                      channel_mult=tuple(mult), num_res_blocks=nrb, attention_levels=tuple(attn),
                      transformer_depth=tuple(depth), transformer_depth_middle=mid_depth,
                      transformer_depth_output=_unless_per_level(out_depth, depth, nrb),
                      num_heads=8 if context_dim == 768 else None, head_dim=None if context_dim == 768 else 64,
                      context_dim=context_dim, use_linear_proj=len(t.shape(proj)) == 2,
                      adm_in_channels=t.shape("label_emb.0.0.weight")[1] if "label_emb.0.0.weight" in t else None)


def _unless_per_level(out_depth: list, depth: list, nrb: int) -> tuple | None:
    """Output-block depths, or None where they are the level depths (every file but a pruned one;
    a ControlNet has no output blocks at all)."""
    per_level = [depth[level] for level in reversed(range(len(depth))) for _ in range(nrb + 1)]
    out_depth = [p if d is None else d for d, p in zip(out_depth, per_level)]
    return None if out_depth == per_level or not any(out_depth) else tuple(out_depth)


def infer_controlnet_config(t: Tensors) -> UNetConfig:
    # A ControlNet has no output head, the one thing infer_unet_config reads out_channels from.
    conv_in = t.shape("input_blocks.0.0.weight")
    return infer_unet_config(Tensors(t.entries | {"out.2.weight": (None, (conv_in[1], conv_in[0], 3, 3))}))


def infer_vae_config(t: Tensors) -> VAEConfig:
    ch = t.shape("encoder.conv_in.weight")[0]
    levels = sorted({int(k.split(".")[2]) for k in t.keys() if k.startswith("encoder.down.")})
    mult = tuple(t.shape(f"encoder.down.{i}.block.0.conv1.weight")[0] // ch for i in levels)
    nrb = len({k.split(".")[4] for k in t.keys() if k.startswith("encoder.down.0.block.")})
    return VAEConfig(ch=ch, ch_mult=mult, num_res_blocks=nrb, z_channels=t.shape("decoder.conv_in.weight")[1],
                     in_channels=t.shape("encoder.conv_in.weight")[1], quant_conv="post_quant_conv.weight" in t)


def text_role(family: str, second: bool = False) -> dict:
    """What a family's text encoder is, beyond its shapes. SD1's OpenAI CLIP-L: the last block, quick_gelu,
    pads with EOS; SD2's OpenCLIP-H: the penultimate block, gelu, pads with 0; SDXL's CLIP-L (first) and
    OpenCLIP bigG (second; the refiner's only one): each its penultimate block without the final LayerNorm,
    padded as SD1's and SD2's. SD3's pair is SDXL's. FLUX's CLIP-L gives only its pooled output (the final
    LayerNorm at the end-of-text token, unprojected)."""
    openai_clip = family in ("sd1", FLUX) or (family in ("sdxl", SD3) and not second)
    return dict(act="quick_gelu" if openai_clip else "gelu", pad_id=EOS if openai_clip else 0,
                output_layer=-1 if family in ("sd1", FLUX) else -2, final_norm=family not in POOLED_FAMILIES)


def infer_text_config(t: Tensors, family: str, second: bool = False) -> TextConfig:
    vocab, width = t.shape("token_embedding.weight")
    layers = len({k.split(".")[2] for k in t.keys() if k.startswith("transformer.resblocks.")})
    projection = t.shape("text_projection")[1] if "text_projection" in t and family in (*SDXL_FAMILIES, SD3) else None
    return TextConfig(vocab_size=vocab, context_length=t.shape("positional_embedding")[0], width=width,
                      layers=layers, heads=max(1, width // 64), projection_dim=projection, **text_role(family, second))


# ------------------------------------------------------------------------------------------------
# From diffusers names and config.json files
# ------------------------------------------------------------------------------------------------
def unet_config_from_diffusers(c: dict) -> UNetConfig:
    """A diffusers UNet2DConditionModel's or ControlNetModel's config.json."""
    chans = c["block_out_channels"]
    mc = chans[0]
    attn = tuple(i for i, t in enumerate(c["down_block_types"]) if "CrossAttn" in t)
    heads = c.get("num_attention_heads") or c.get("attention_head_dim", 8)   # diffusers' misnomer: SD1 "head_dim" 8 = 8 heads
    heads = heads if isinstance(heads, list) else [heads] * len(chans)
    nrb = c.get("layers_per_block", 2)
    depth = c.get("transformer_layers_per_block", 1)
    depth = depth if isinstance(depth, list) else [depth] * len(chans)
    depth = [d[0] if isinstance(d, list) else d for d in depth]   # per-layer lists: pruned encoders keep theirs equal
    out = c.get("reverse_transformer_layers_per_block")          # up blocks, deepest first, a list per layer
    out = [n for d in out for n in (d if isinstance(d, list) else [d] * (nrb + 1))] if out else None
    same_heads = len(set(heads)) == 1
    return UNetConfig(in_channels=c.get("in_channels", 4), out_channels=c.get("out_channels", 4), model_channels=mc,
                      channel_mult=tuple(ch // mc for ch in chans), num_res_blocks=nrb,
                      attention_levels=attn, transformer_depth=tuple(d if i in attn else 0 for i, d in enumerate(depth)),
                      transformer_depth_middle=0 if c.get("mid_block_type") == "UNetMidBlock2D" else depth[-1],
                      transformer_depth_output=out and _unless_per_level(
                          [n if len(chans) - 1 - i // (nrb + 1) in attn else 0 for i, n in enumerate(out)],
                          [d if i in attn else 0 for i, d in enumerate(depth)], nrb),
                      num_heads=heads[0] if same_heads else None, head_dim=None if same_heads else chans[0] // heads[0],
                      context_dim=c.get("cross_attention_dim", 768), use_linear_proj=bool(c.get("use_linear_projection")),
                      adm_in_channels=c.get("projection_class_embeddings_input_dim"))


def vae_config_from_diffusers(c: dict) -> VAEConfig:
    """A diffusers AutoencoderKL's config.json."""
    chans = c["block_out_channels"]
    return VAEConfig(ch=chans[0], ch_mult=tuple(x // chans[0] for x in chans), num_res_blocks=c.get("layers_per_block", 1),
                     z_channels=c.get("latent_channels", 4), in_channels=c.get("in_channels", 3),
                     scale_factor=c.get("scaling_factor", 0.18215), norm_groups=c.get("norm_num_groups", 32),
                     shift_factor=c.get("shift_factor") or 0.0, quant_conv=c.get("use_quant_conv", True))


def vae_config_from_diffusers_names(t: Tensors) -> VAEConfig:
    """A diffusers-named VAE without its config.json (a single file): what the shapes tell."""
    n = len({k.split(".")[2] for k in t.keys() if k.startswith("encoder.down_blocks.")})
    ch = t.shape("encoder.conv_in.weight")[0]
    return VAEConfig(ch=ch, ch_mult=tuple(t.shape(f"encoder.down_blocks.{i}.resnets.0.conv1.weight")[0] // ch for i in range(n)),
                     num_res_blocks=len({k.split(".")[4] for k in t.keys() if k.startswith("encoder.down_blocks.0.resnets.")}),
                     z_channels=t.shape("decoder.conv_in.weight")[1], quant_conv="post_quant_conv.weight" in t)


def text_config_from_diffusers(c: dict, pad_id: int, family: str = "sd1", projection: bool = False) -> TextConfig:
    """A transformers CLIPTextModel's (or CLIPTextModelWithProjection's) config.json; the padding token is
    the tokenizer's. SD1/SD2 folders hold the text model up to the layer they use: its last."""
    role = text_role(family)
    return TextConfig(vocab_size=c.get("vocab_size", 49408), context_length=c.get("max_position_embeddings", 77),
                      width=c["hidden_size"], layers=c["num_hidden_layers"], heads=c["num_attention_heads"],
                      act=c.get("hidden_act", "quick_gelu"),
                      output_layer=role["output_layer"] if family in POOLED_FAMILIES else -1,
                      final_norm=role["final_norm"], pad_id=pad_id,
                      projection_dim=c.get("projection_dim", c["hidden_size"]) if projection else None)


# ------------------------------------------------------------------------------------------------
# From the network itself
# ------------------------------------------------------------------------------------------------
@torch.inference_mode()
def detect_v_prediction(unet: UNet) -> str:
    """The AUTOMATIC1111 / stable-diffusion.cpp test: an eps model's output on a constant 0.5 latent
    at t=999 is near the input; a v model's is strongly negative relative to it."""
    p = next(unet.parameters())
    x = torch.full((1, unet.cfg.in_channels, 8, 8), 0.5, device=p.device, dtype=p.dtype)
    ctx = torch.full((1, 77, unet.cfg.context_dim), 0.5, device=p.device, dtype=p.dtype)
    out = unet(x, torch.tensor([999.0], device=p.device), ctx)
    return "v" if (out - x).float().mean().item() < -1 else "eps"


def infer_mmdit_config(t: Tensors) -> MMDiTConfig:
    """An MMDiT's configuration from its tensors (our names). The head width is 64 in every released model; with
    q/k norms their weights tell it."""
    depth = t.count("joint_blocks.")
    width, channels, patch, _ = t.shape("x_embedder.proj.weight")
    head_dim = t.shape("joint_blocks.0.x_block.attn.ln_q.weight")[0] if "joint_blocks.0.x_block.attn.ln_q.weight" in t else 64
    return MMDiTConfig(depth=depth, width=width, in_channels=channels, patch_size=patch, head_dim=head_dim,
                       context_dim=t.shape("context_embedder.weight")[1], pooled_dim=t.shape("y_embedder.mlp.0.weight")[1],
                       pos_embed_max_size=math.isqrt(t.shape("pos_embed")[1]),
                       qk_norm="joint_blocks.0.x_block.attn.ln_q.weight" in t,
                       dual_attention_layers=tuple(i for i in range(depth)
                                                   if f"joint_blocks.{i}.x_block.attn2.qkv.weight" in t))


def mmdit_config_from_diffusers(c: dict) -> MMDiTConfig:
    """A diffusers SD3Transformer2DModel's config.json."""
    width = c["num_attention_heads"] * c["attention_head_dim"]
    if c.get("caption_projection_dim", width) != width:
        raise CheckpointError(f"an SD3 transformer whose text width ({c['caption_projection_dim']}) is not its "
                              f"image width ({width}) is not supported")
    return MMDiTConfig(depth=c["num_layers"], width=width, in_channels=c.get("in_channels", 16),
                       patch_size=c.get("patch_size", 2), head_dim=c["attention_head_dim"],
                       context_dim=c.get("joint_attention_dim", 4096), pooled_dim=c.get("pooled_projection_dim", 2048),
                       pos_embed_max_size=c.get("pos_embed_max_size", 96), qk_norm=bool(c.get("qk_norm")),
                       dual_attention_layers=tuple(c.get("dual_attention_layers") or ()))


def infer_t5_config(t: Tensors) -> T5Config:
    """A T5 encoder's configuration from its tensors (Hugging Face's T5EncoderModel names)."""
    vocab, width = t.shape("shared.weight") if "shared.weight" in t else t.shape("encoder.embed_tokens.weight")
    block = "encoder.block.0.layer."
    buckets, heads = t.shape(block + "0.SelfAttention.relative_attention_bias.weight")
    return T5Config(vocab=vocab, width=width, heads=heads, d_kv=t.shape(block + "0.SelfAttention.q.weight")[0] // heads,
                    d_ff=t.shape(block + "1.DenseReluDense.wi_0.weight")[0], layers=t.count("encoder.block."),
                    relative_attention_num_buckets=buckets)


def t5_config_from_transformers(c: dict) -> T5Config:
    """A transformers T5EncoderModel's config.json (v1.1: the gated-GELU feed-forward)."""
    if c.get("feed_forward_proj", "gated-gelu") != "gated-gelu":
        raise CheckpointError(f"a T5 with the {c['feed_forward_proj']!r} feed-forward is not supported (T5 v1.1's "
                              "gated-gelu is)")
    return T5Config(vocab=c["vocab_size"], width=c["d_model"], d_kv=c["d_kv"], heads=c["num_heads"], d_ff=c["d_ff"],
                    layers=c["num_layers"], relative_attention_num_buckets=c.get("relative_attention_num_buckets", 32),
                    relative_attention_max_distance=c.get("relative_attention_max_distance", 128),
                    eps=c.get("layer_norm_epsilon", 1e-6))


def infer_flux_config(t: Tensors) -> FluxConfig:
    """A FLUX transformer's configuration from its tensors (our names). The split of each head's channels over the
    three position axes is not in the shapes: every released model has (16, 56, 56)."""
    width, channels = t.shape("img_in.weight")
    head_dim = t.shape("double_blocks.0.img_attn.norm.query_norm.scale")[0]
    return FluxConfig(in_channels=channels, width=width, heads=width // head_dim, depth=t.count("double_blocks."),
                      depth_single=t.count("single_blocks."), context_dim=t.shape("txt_in.weight")[1],
                      pooled_dim=t.shape("vector_in.in_layer.weight")[1],
                      guidance_embed="guidance_in.in_layer.weight" in t,
                      mlp_ratio=t.shape("double_blocks.0.img_mlp.0.weight")[0] / width)


def flux_config_from_diffusers(c: dict) -> FluxConfig:
    """A diffusers FluxTransformer2DModel's config.json."""
    if c.get("patch_size", 1) != 1:
        raise CheckpointError("a FLUX transformer with patch_size other than 1 is not supported")
    return FluxConfig(in_channels=c.get("in_channels", 64), width=c["num_attention_heads"] * c["attention_head_dim"],
                      heads=c["num_attention_heads"], depth=c.get("num_layers", 19),
                      depth_single=c.get("num_single_layers", 38), context_dim=c.get("joint_attention_dim", 4096),
                      pooled_dim=c.get("pooled_projection_dim", 768), guidance_embed=bool(c.get("guidance_embeds")),
                      axes_dim=tuple(c.get("axes_dims_rope") or (16, 56, 56)))
