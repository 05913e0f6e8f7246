"""Key-name layouts: our names (the LDM single-file ones, OpenCLIP's for the text encoder) <-> the
diffusers / Hugging Face names of the same tensors.

Each layout is ONE table, written ours -> theirs: (our prefix, their prefix, kind) per block, plus
renames inside blocks of a kind. ``rename_keys`` reads it forwards (we know our keys from the
configuration: ask the file for theirs; or write their file) or, with ``reverse``, backwards (their
keys tell only the block counts: name their tensors ours, then infer the configuration as for an LDM
file). Tensors whose *shape* differs between layouts follow rules next to their table (the VAE's
Linear attention, the text encoder's fused q/k/v and transposed projection). A new family adds its
tables here.
"""
import re

import torch

from ..clip import TextEncoder
from ..flux import FluxConfig
from ..unet import UNetConfig
from .files import Tensors

UNET_RESNET = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
               "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}
VAE_RESNET = {"nin_shortcut": "conv_shortcut"}
VAE_ATTN = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}


def rename_keys(keys, prefixes, inner, reverse=False) -> dict[str, str]:
    """``{key: renamed key}``: each key by its longest matching prefix, then the rest of it by
    ``inner[kind]`` (after the block index, where the prefix stops before one). Keys no prefix
    matches keep their name. ``reverse``: the same tables read theirs -> ours."""
    if reverse:
        prefixes = [(theirs, ours, kind) for ours, theirs, kind in prefixes]
        inner = {kind: {b: a for a, b in names.items()} for kind, names in inner.items()}
    prefixes = sorted(prefixes, key=lambda p: -len(p[0]))
    out = {}
    for key in keys:
        for src, dst, kind in prefixes:
            if key.startswith(src):
                index, rest = re.match(r"(\d+\.)?(.*)", key[len(src):]).groups()
                for a, b in inner.get(kind, {}).items():
                    if rest.startswith(a + "."):
                        rest = b + rest[len(a):]
                        break
                out[key] = dst + (index or "") + rest
                break
        else:
            out[key] = key
    return out


def renamed(theirs: Tensors, name_map: dict, reshape=None) -> Tensors:
    """``theirs`` seen under our names (``name_map``: ours -> theirs); keys they lack are left out
    (``build`` names them). ``reshape(their_key)``: that Linear [C, C] is our 1×1 conv [C, C, 1, 1]."""
    out = Tensors()
    for ours, their_key in name_map.items():
        if their_key in theirs:
            shape = theirs.shape(their_key)
            if reshape and reshape(their_key) and len(shape) == 2:
                out.add(ours, lambda k=their_key: theirs.get(k)[:, :, None, None], (*shape, 1, 1))
            else:
                out.add(ours, lambda k=their_key: theirs.get(k), shape)
                if their_key in theirs.stored:                     # still keepable quantized under our name
                    out.stored[ours] = theirs.stored[their_key]
    return out


# --- UNet and ControlNet: LDM input_blocks/middle_block/output_blocks <-> diffusers down/mid/up blocks
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


def unet_name_map(keys, cfg: UNetConfig, encoder_only=False) -> dict[str, str]:
    return rename_keys(keys, unet_prefixes(cfg, encoder_only), {"resnet": UNET_RESNET})


def controlnet_prefixes(cfg: UNetConfig):
    """A ControlNet's: the UNet encoder's, then the hint block, zero convs and middle-block zero conv."""
    hint = ["conv_in"] + [f"blocks.{i}" for i in range(6)] + ["conv_out"]      # input_hint_block.0, 2, .., 14
    n_skips = len(cfg.channel_mult) * (cfg.num_res_blocks + 1)
    return (unet_prefixes(cfg, encoder_only=True)
            + [(f"input_hint_block.{2 * i}.", f"controlnet_cond_embedding.{h}.", None) for i, h in enumerate(hint)]
            + [(f"zero_convs.{i}.0.", f"controlnet_down_blocks.{i}.", None) for i in range(n_skips)]
            + [("middle_block_out.0.", "controlnet_mid_block.", None)])


def controlnet_name_map(keys, cfg: UNetConfig, reverse=False) -> dict[str, str]:
    """``reverse``: ``keys`` are diffusers names; only the level and ResBlock counts of ``cfg`` matter."""
    return rename_keys(keys, controlnet_prefixes(cfg), {"resnet": UNET_RESNET}, reverse)


# --- VAE: LDM down/up/mid <-> diffusers down_blocks/up_blocks/mid_block ---------------------------
def vae_prefixes(n_levels: int):
    p = [("encoder.norm_out.", "encoder.conv_norm_out.", None), ("decoder.norm_out.", "decoder.conv_norm_out.", None)]
    for part in ("encoder", "decoder"):
        p += [(f"{part}.mid.block_1.", f"{part}.mid_block.resnets.0.", "resnet"),
              (f"{part}.mid.block_2.", f"{part}.mid_block.resnets.1.", "resnet"),
              (f"{part}.mid.attn_1.", f"{part}.mid_block.attentions.0.", "attn")]
    for i in range(n_levels):              # up_blocks.0 is the deepest level, LDM's up.0 the shallowest
        p += [(f"encoder.down.{i}.block.", f"encoder.down_blocks.{i}.resnets.", "resnet"),
              (f"encoder.down.{i}.downsample.", f"encoder.down_blocks.{i}.downsamplers.0.", None),
              (f"decoder.up.{i}.block.", f"decoder.up_blocks.{n_levels - 1 - i}.resnets.", "resnet"),
              (f"decoder.up.{i}.upsample.", f"decoder.up_blocks.{n_levels - 1 - i}.upsamplers.0.", None)]
    return p


def vae_name_map(keys, n_levels: int) -> dict[str, str]:
    return rename_keys(keys, vae_prefixes(n_levels), {"resnet": VAE_RESNET, "attn": VAE_ATTN})


def vae_is_linear_attn(diffusers_key: str) -> bool:
    """diffusers stores the VAE's mid attention as Linear [C, C]; LDM as 1×1 conv [C, C, 1, 1]."""
    return ".mid_block.attentions.0." in diffusers_key and diffusers_key.endswith("weight") and "group_norm" not in diffusers_key


# --- CLIP text encoder: ours (OpenCLIP names, q/k/v fused in in_proj) <-> Hugging Face CLIPTextModel
TEXT_NAMES = {"token_embedding.weight": "embeddings.token_embedding.weight",
              "positional_embedding": "embeddings.position_embedding.weight",
              "ln_final.weight": "final_layer_norm.weight", "ln_final.bias": "final_layer_norm.bias",
              "text_projection": "text_projection.weight"}
TEXT_BLOCK = {"attn.out_proj": "self_attn.out_proj", "ln_1": "layer_norm1", "ln_2": "layer_norm2",
              "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
TEXT_FUSED = "attn.in_proj_"               # ours: q, k, v stacked by rows; theirs: self_attn.{q,k,v}_proj
TEXT_TRANSPOSED = {"text_projection"}      # theirs a Linear weight [proj, width]; ours [width, proj]


def text_hf_names(our_key: str) -> list[str]:
    """The Hugging Face key(s) of ``our_key``'s tensor; several: ours is theirs concatenated along dim 0."""
    if our_key in TEXT_NAMES:
        return [TEXT_NAMES[our_key]]
    n, rest = re.fullmatch(r"transformer\.resblocks\.(\d+)\.(.+)", our_key).groups()
    base = f"encoder.layers.{n}."
    if rest.startswith(TEXT_FUSED):
        suffix = rest[len(TEXT_FUSED):]         # weight | bias
        return [f"{base}self_attn.{x}_proj.{suffix}" for x in "qkv"]
    for a, b in TEXT_BLOCK.items():
        if rest.startswith(a + "."):
            return [base + b + rest[len(a):]]
    raise KeyError(our_key)


def text_keys(n_layers: int, projection: bool) -> list[str]:
    """Our text encoder's parameter names."""
    block = [TEXT_FUSED + "weight", TEXT_FUSED + "bias"] + [f"{a}.{p}" for a in TEXT_BLOCK for p in ("weight", "bias")]
    return ([k for k in TEXT_NAMES if projection or k not in TEXT_TRANSPOSED]
            + [f"transformer.resblocks.{n}.{k}" for n in range(n_layers) for k in block])


def text_from_hf(hf: Tensors) -> Tensors:
    """A Hugging Face CLIPTextModel state dict (no text_model. prefix) seen under our names; q/k/v fused lazily."""
    n_layers = len({k.split(".")[2] for k in hf.keys() if k.startswith("encoder.layers.")})
    out = Tensors()
    for key in text_keys(n_layers, projection="text_projection.weight" in hf):
        src = text_hf_names(key)
        if not all(s in hf for s in src):
            continue                                   # build() reports what is missing
        shapes = [hf.shape(s) for s in src]
        if key in TEXT_TRANSPOSED:
            out.add(key, lambda s=src[0]: hf.get(s).T.contiguous(), shapes[0][::-1])
        elif len(src) == 1:
            out.add(key, lambda s=src[0]: hf.get(s), shapes[0])
        else:
            out.add(key, lambda src=src: torch.cat([hf.get(s) for s in src]), (sum(s[0] for s in shapes), *shapes[0][1:]))
    return out


def text_to_hf(text: TextEncoder) -> dict:
    """Our text encoder as a Hugging Face CLIPTextModel state dict (no text_model. prefix)."""
    out = {}
    for key, v in text.state_dict().items():
        names = text_hf_names(key)
        v = v.T if key in TEXT_TRANSPOSED else v
        out.update(zip(names, v.chunk(len(names)) if len(names) > 1 else [v]))
    return out


# --- MMDiT (SD3/SD3.5): Stability AI's single-file names (ours) <-> diffusers' SD3Transformer2DModel -------------
MMDIT_NAMES = {"pos_embed": "pos_embed.pos_embed", "x_embedder.proj": "pos_embed.proj",
               "t_embedder.mlp.0": "time_text_embed.timestep_embedder.linear_1",
               "t_embedder.mlp.2": "time_text_embed.timestep_embedder.linear_2",
               "y_embedder.mlp.0": "time_text_embed.text_embedder.linear_1",
               "y_embedder.mlp.2": "time_text_embed.text_embedder.linear_2",
               "context_embedder": "context_embedder", "final_layer.linear": "proj_out",
               "final_layer.adaLN_modulation.1": "norm_out.linear"}
# inside joint_blocks.N. -> transformer_blocks.N.; a list: q, k, v concatenated into our fused qkv
MMDIT_BLOCK = {"x_block.adaLN_modulation.1": "norm1.linear", "context_block.adaLN_modulation.1": "norm1_context.linear",
               "x_block.attn.qkv": ["attn.to_q", "attn.to_k", "attn.to_v"],
               "context_block.attn.qkv": ["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"],
               "x_block.attn.proj": "attn.to_out.0", "context_block.attn.proj": "attn.to_add_out",
               "x_block.attn.ln_q": "attn.norm_q", "x_block.attn.ln_k": "attn.norm_k",
               "context_block.attn.ln_q": "attn.norm_added_q", "context_block.attn.ln_k": "attn.norm_added_k",
               "x_block.attn2.qkv": ["attn2.to_q", "attn2.to_k", "attn2.to_v"], "x_block.attn2.proj": "attn2.to_out.0",
               "x_block.attn2.ln_q": "attn2.norm_q", "x_block.attn2.ln_k": "attn2.norm_k",
               "x_block.mlp.fc1": "ff.net.0.proj", "x_block.mlp.fc2": "ff.net.2",
               "context_block.mlp.fc1": "ff_context.net.0.proj", "context_block.mlp.fc2": "ff_context.net.2"}


def _linears(table: dict, ours_prefix: str = "", theirs_prefix: str = "") -> list[tuple[str, list[str]]]:
    """(our key, their keys) for the weight and bias of each entry of a name table (a list: fused by rows)."""
    out = []
    for ours, theirs in table.items():
        names = theirs if isinstance(theirs, list) else [theirs]
        for suffix in (".weight", ".bias"):
            out.append((ours_prefix + ours + suffix, [theirs_prefix + n + suffix for n in names]))
    return out


def from_diffusers(theirs: Tensors, pairs, swapped=()) -> Tensors:
    """``theirs`` seen under our names, lazily: ``pairs`` (our key, their keys): one is renamed, several are
    concatenated by rows (our fused projections); ``swapped`` keys have their two halves exchanged (a modulation
    giving (scale, shift) there and (shift, scale) here). Pairs whose tensors are missing are left out."""
    out = Tensors()
    for ours, names in pairs:
        if not all(n in theirs for n in names):
            continue
        shape = theirs.shape(names[0])
        if len(names) > 1:
            out.add(ours, lambda names=names: torch.cat([theirs.get(n) for n in names]),
                    (sum(theirs.shape(n)[0] for n in names), *shape[1:]))
        elif ours in swapped:
            out.add(ours, lambda n=names[0]: torch.cat(theirs.get(n).chunk(2)[::-1]), shape)
        else:
            out.add(ours, lambda n=names[0]: theirs.get(n), shape)
    return out


def mmdit_names(depth: int) -> tuple[list, set]:
    """An MMDiT of ``depth`` joint blocks: (our key, their keys) for every tensor (several: q, k, v fused by rows
    here), and our keys whose two halves are exchanged there: the modulations that give two vectors, the final
    layer's and the last block's text side, give (scale, shift) there and (shift, scale) here."""
    pairs = [("pos_embed", ["pos_embed.pos_embed"])] + _linears({k: v for k, v in MMDIT_NAMES.items() if k != "pos_embed"})
    for i in range(depth):
        pairs += _linears(MMDIT_BLOCK, f"joint_blocks.{i}.", f"transformer_blocks.{i}.")
    swapped = {f"final_layer.adaLN_modulation.1.{p}" for p in ("weight", "bias")}
    swapped |= {f"joint_blocks.{depth - 1}.context_block.adaLN_modulation.1.{p}" for p in ("weight", "bias")}
    return pairs, swapped


def mmdit_from_diffusers(theirs: Tensors) -> Tensors:
    """A diffusers SD3Transformer2DModel state dict under our names."""
    return from_diffusers(theirs, *mmdit_names(theirs.count("transformer_blocks.")))


# --- FLUX: Black Forest Labs' names (ours) <-> diffusers' FluxTransformer2DModel ------------------------------
FLUX_NAMES = {"img_in": "x_embedder", "txt_in": "context_embedder",
              "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
              "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
              "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
              "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
              "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
              "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
              "final_layer.linear": "proj_out", "final_layer.adaLN_modulation.1": "norm_out.linear"}
FLUX_DOUBLE = {"img_mod.lin": "norm1.linear", "txt_mod.lin": "norm1_context.linear",
               "img_attn.qkv": ["attn.to_q", "attn.to_k", "attn.to_v"],
               "txt_attn.qkv": ["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"],
               "img_attn.proj": "attn.to_out.0", "txt_attn.proj": "attn.to_add_out",
               "img_mlp.0": "ff.net.0.proj", "img_mlp.2": "ff.net.2",
               "txt_mlp.0": "ff_context.net.0.proj", "txt_mlp.2": "ff_context.net.2"}
FLUX_DOUBLE_NORMS = {"img_attn.norm.query_norm.scale": "attn.norm_q.weight", "img_attn.norm.key_norm.scale": "attn.norm_k.weight",
                     "txt_attn.norm.query_norm.scale": "attn.norm_added_q.weight",
                     "txt_attn.norm.key_norm.scale": "attn.norm_added_k.weight"}
FLUX_SINGLE = {"modulation.lin": "norm.linear", "linear1": ["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"],
               "linear2": "proj_out"}
FLUX_SINGLE_NORMS = {"norm.query_norm.scale": "attn.norm_q.weight", "norm.key_norm.scale": "attn.norm_k.weight"}


def flux_names(depth: int, depth_single: int) -> tuple[list, set]:
    """FLUX's (our key, their keys) pairs and swapped keys, as ``mmdit_names``: q, k, v (and the single blocks' MLP
    input) fused into one projection here; the final modulation's halves exchanged."""
    pairs = _linears(FLUX_NAMES)
    for i in range(depth):
        pairs += _linears(FLUX_DOUBLE, f"double_blocks.{i}.", f"transformer_blocks.{i}.")
        pairs += [(f"double_blocks.{i}.{o}", [f"transformer_blocks.{i}.{t}"]) for o, t in FLUX_DOUBLE_NORMS.items()]
    for i in range(depth_single):
        pairs += _linears(FLUX_SINGLE, f"single_blocks.{i}.", f"single_transformer_blocks.{i}.")
        pairs += [(f"single_blocks.{i}.{o}", [f"single_transformer_blocks.{i}.{t}"]) for o, t in FLUX_SINGLE_NORMS.items()]
    return pairs, {f"final_layer.adaLN_modulation.1.{p}" for p in ("weight", "bias")}


def flux_from_diffusers(theirs: Tensors) -> Tensors:
    """A diffusers FluxTransformer2DModel state dict under our names."""
    return from_diffusers(theirs, *flux_names(theirs.count("transformer_blocks."),
                                              theirs.count("single_transformer_blocks.")))


def transformer_names(cfg) -> tuple[list, set]:
    """The name table of a loaded MMDiT or FLUX transformer, from its configuration."""
    if isinstance(cfg, FluxConfig):
        return flux_names(cfg.depth, cfg.depth_single)
    return mmdit_names(cfg.depth)


# --- T5 encoder: llama.cpp's GGUF names (its converter's t5encoder files, e.g. t5-v1_1-xxl-encoder-Q8_0.gguf, the
# quantized T5 most FLUX guides point to) -> transformers' T5EncoderModel names, which sdcore.t5 uses
T5_GGUF_ANCHOR = "enc.blk.0.attn_q.weight"
T5_GGUF_NAMES = {"token_embd": "shared", "enc.output_norm": "encoder.final_layer_norm"}
T5_GGUF_BLOCK = {"attn_norm": "layer.0.layer_norm", "attn_q": "layer.0.SelfAttention.q", "attn_k": "layer.0.SelfAttention.k",
                 "attn_v": "layer.0.SelfAttention.v", "attn_o": "layer.0.SelfAttention.o",
                 "attn_rel_b": "layer.0.SelfAttention.relative_attention_bias", "ffn_norm": "layer.1.layer_norm",
                 "ffn_gate": "layer.1.DenseReluDense.wi_0", "ffn_up": "layer.1.DenseReluDense.wi_1",
                 "ffn_down": "layer.1.DenseReluDense.wo"}


def t5_from_gguf(theirs: Tensors) -> Tensors:
    """A llama.cpp T5 encoder (enc.blk.N.attn_q.weight, ...) seen under transformers' names; the tensors are the
    same, only named differently (no transposes or permutations). Names outside the encoder are left out."""
    name_map = {}
    for key in theirs.keys():
        stem, _, param = key.rpartition(".")
        parts = stem.split(".")
        if stem in T5_GGUF_NAMES:
            name_map[f"{T5_GGUF_NAMES[stem]}.{param}"] = key
        elif parts[:2] == ["enc", "blk"] and len(parts) == 4 and parts[3] in T5_GGUF_BLOCK:
            name_map[f"encoder.block.{parts[2]}.{T5_GGUF_BLOCK[parts[3]]}.{param}"] = key
    return renamed(theirs, name_map)
