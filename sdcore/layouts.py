"""Key-name layouts: LDM single-file names (ours) <-> diffusers / Hugging Face names.

Each ``*_name_map`` returns ``{our_key: their_key}`` for every parameter of one of our modules, so a
loader reads a diffusers file by asking for ``their_key``, and a test can write one by inverting the
map. Tensors whose *shape* differs between layouts are listed in the ``reshape`` helpers.
"""
import re

from .unet import UNetConfig

_RESNET_UNET = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
                "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}
_RESNET_VAE = {"nin_shortcut": "conv_shortcut"}
_VAE_ATTN = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}


def _translate(keys, prefixes, inner):
    """Map each key by its longest matching prefix; ``inner[kind]`` renames the rest of the key."""
    prefixes = sorted(prefixes, key=lambda p: -len(p[0]))
    out = {}
    for key in keys:
        for ours, theirs, kind in prefixes:
            if key.startswith(ours):
                rest = key[len(ours):]
                for a, b in inner.get(kind, {}).items():
                    if rest.startswith(a + "."):
                        rest = b + rest[len(a):]
                        break
                out[key] = theirs + rest
                break
        else:
            out[key] = key
    return out


def unet_prefixes(cfg: UNetConfig, encoder_only=False):
    """(ldm prefix, diffusers prefix, kind) for every block of a UNet (or ControlNet encoder)."""
    nrb, levels = cfg.num_res_blocks, len(cfg.channel_mult)
    p = [("time_embed.0.", "time_embedding.linear_1.", None), ("time_embed.2.", "time_embedding.linear_2.", None),
         ("label_emb.0.0.", "add_embedding.linear_1.", None), ("label_emb.0.2.", "add_embedding.linear_2.", None),
         ("input_blocks.0.0.", "conv_in.", None),
         ("middle_block.0.", "mid_block.resnets.0.", "resnet"), ("middle_block.1.", "mid_block.attentions.0.", None),
         ("middle_block.2.", "mid_block.resnets.1.", "resnet")]
    for i in range(levels):
        for j in range(nrb):
            n = i * (nrb + 1) + j + 1
            p.append((f"input_blocks.{n}.0.", f"down_blocks.{i}.resnets.{j}.", "resnet"))
            p.append((f"input_blocks.{n}.1.", f"down_blocks.{i}.attentions.{j}.", None))
        if i != levels - 1:
            p.append((f"input_blocks.{(i + 1) * (nrb + 1)}.0.op.", f"down_blocks.{i}.downsamplers.0.conv.", None))
    if encoder_only:
        return p
    p += [("out.0.", "conv_norm_out.", None), ("out.2.", "conv_out.", None)]
    for i in range(levels):                 # up_blocks.0 is the deepest level
        level = levels - 1 - i
        for j in range(nrb + 1):
            n = i * (nrb + 1) + j
            p.append((f"output_blocks.{n}.0.", f"up_blocks.{i}.resnets.{j}.", "resnet"))
            p.append((f"output_blocks.{n}.1.", f"up_blocks.{i}.attentions.{j}.", None))
        if level:
            sub = 2 if level in cfg.attention_levels else 1
            p.append((f"output_blocks.{i * (nrb + 1) + nrb}.{sub}.conv.", f"up_blocks.{i}.upsamplers.0.conv.", None))
    return p


def unet_name_map(keys, cfg: UNetConfig, encoder_only=False):
    return _translate(keys, unet_prefixes(cfg, encoder_only), {"resnet": _RESNET_UNET})


def controlnet_prefixes(cfg: UNetConfig):
    """A ControlNet's: the UNet encoder's, then the hint block, zero convs and middle-block zero conv."""
    hint = ["conv_in"] + [f"blocks.{i}" for i in range(6)] + ["conv_out"]      # input_hint_block.0, 2, .., 14
    n_skips = len(cfg.channel_mult) * (cfg.num_res_blocks + 1)
    return (unet_prefixes(cfg, encoder_only=True)
            + [(f"input_hint_block.{2 * i}.", f"controlnet_cond_embedding.{h}.", None) for i, h in enumerate(hint)]
            + [(f"zero_convs.{i}.0.", f"controlnet_down_blocks.{i}.", None) for i in range(n_skips)]
            + [("middle_block_out.0.", "controlnet_mid_block.", None)])


def controlnet_name_map(keys, cfg: UNetConfig):
    return _translate(keys, controlnet_prefixes(cfg), {"resnet": _RESNET_UNET})


def controlnet_names_from_diffusers(their_keys, cfg: UNetConfig):
    """The inverse map, ``{their_key: our_key}`` (only the level and ResBlock counts of ``cfg`` matter)."""
    flipped = [(theirs, ours, kind) for ours, theirs, kind in controlnet_prefixes(cfg)]
    return _translate(their_keys, flipped, {"resnet": {b: a for a, b in _RESNET_UNET.items()}})

def vae_name_map(keys, n_levels: int):
    p = [("encoder.norm_out.", "encoder.conv_norm_out.", None), ("decoder.norm_out.", "decoder.conv_norm_out.", None)]
    for part in ("encoder", "decoder"):
        p += [(f"{part}.mid.block_1.", f"{part}.mid_block.resnets.0.", "resnet"),
              (f"{part}.mid.block_2.", f"{part}.mid_block.resnets.1.", "resnet"),
              (f"{part}.mid.attn_1.", f"{part}.mid_block.attentions.0.", "attn")]
    for i in range(n_levels):
        p += [(f"encoder.down.{i}.block.", f"encoder.down_blocks.{i}.resnets.", "resnet"),
              (f"encoder.down.{i}.downsample.", f"encoder.down_blocks.{i}.downsamplers.0.", None),
              (f"decoder.up.{i}.block.", f"decoder.up_blocks.{n_levels - 1 - i}.resnets.", "resnet"),
              (f"decoder.up.{i}.upsample.", f"decoder.up_blocks.{n_levels - 1 - i}.upsamplers.0.", None)]
    out = {}
    for key, theirs in _translate(keys, p, {"attn": _VAE_ATTN}).items():
        # inside ".resnets." the block index comes first: "resnets.J.nin_shortcut" -> "resnets.J.conv_shortcut"
        out[key] = re.sub(r"(resnets\.\d+\.)nin_shortcut", r"\1conv_shortcut", theirs)
    return out


def vae_is_linear_attn(diffusers_key: str) -> bool:
    """diffusers stores the VAE's mid attention as Linear [C, C]; LDM as 1×1 conv [C, C, 1, 1]."""
    return ".mid_block.attentions.0." in diffusers_key and diffusers_key.endswith("weight") and "group_norm" not in diffusers_key


# --- CLIP text encoder: Hugging Face CLIPTextModel names -> ours (OpenCLIP names, fused in_proj) ----
def text_hf_sources(our_key: str):
    """Hugging Face key(s) whose tensor(s) make ``our_key``; several means concatenate along dim 0."""
    fixed = {"token_embedding.weight": "embeddings.token_embedding.weight",
             "positional_embedding": "embeddings.position_embedding.weight",
             "ln_final.weight": "final_layer_norm.weight", "ln_final.bias": "final_layer_norm.bias",
             "text_projection": "text_projection.weight"}
    if our_key in fixed:
        return [fixed[our_key]]
    m = re.fullmatch(r"transformer\.resblocks\.(\d+)\.(.+)", our_key)
    n, rest = m.group(1), m.group(2)
    base = f"encoder.layers.{n}."
    if rest.startswith("attn.in_proj_"):
        suffix = rest.rsplit("_", 1)[1]         # weight | bias
        return [f"{base}self_attn.{x}_proj.{suffix}" for x in "qkv"]
    for a, b in {"attn.out_proj": "self_attn.out_proj", "ln_1": "layer_norm1", "ln_2": "layer_norm2",
                 "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}.items():
        if rest.startswith(a + "."):
            return [base + b + rest[len(a):]]
    raise KeyError(our_key)
