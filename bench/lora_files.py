"""Random adapter files in the layouts people share (kohya/A1111, diffusers/PEFT, older diffusers; LoRA,
LoCon, LoHa, LoKr), built for one of our models: the tests and the benchmark apply them.

Module paths are the diffusers / Hugging Face ones (kohya SDXL files: the LDM ones for the UNet), written
from our networks through sdcore.formats.layouts, the same tables the loader reads checkpoints with.
"""
import re

import torch
from safetensors.torch import save_file

from sdcore.formats import layouts
from sdcore.formats.lora import fused_rows
from sdcore.lora import networks

# What classic LoRA trainers target: the attention and feed-forward layers, and the text encoders' ones
ATTENTION = re.compile(r"(attn[12]\.to_(q|k|v|out\.0)|proj_in|proj_out|ff\.net\.0\.proj|ff\.net\.2)\.weight$")
# What LoCon (and LCM-LoRA) add: the ResBlocks' convolutions and time projection, the resamplers
CONVOLUTIONS = re.compile(r"(resnets\.\d+\.(conv1|conv2|conv_shortcut|time_emb_proj)|samplers\.0\.conv)\.weight$")
TEXT = re.compile(r"(self_attn\.(q|k|v|out)_proj|mlp\.fc[12])\.weight$")
# What older diffusers files (its attention processors) held: the attention projections
OLD_DIFFUSERS = re.compile(r"\.(to_[qkv]|to_out)(?:\.0)?$|\.self_attn\.[qkvo]\w*_proj$")
KOHYA_TEXT = {"text": "lora_te_", "text_2": "lora_te2_"}
PEFT_PREFIX = {"unet": "unet.", "text": "text_encoder.", "text_2": "text_encoder_2."}


def modules(model, convolutions=False) -> list[tuple[str, str, str, tuple]]:
    """(network, diffusers/HF module path, our module path, weight shape) of every module an adapter of
    this kind changes."""
    out = []
    unet = model.unet
    sd = unet.state_dict()
    theirs = layouts.unet_name_map(sd.keys(), unet.cfg)
    for ours, their_key in theirs.items():
        if ATTENTION.search(their_key) or (convolutions and CONVOLUTIONS.search(their_key)):
            out.append(("unet", their_key[:-len(".weight")], ours[:-len(".weight")], tuple(sd[ours].shape)))
    for network, encoder in (("text", model.text_encoder), ("text_2", model.text_encoder_2)):
        if encoder is None:
            continue
        hf = {h: v for h, v in layouts.text_to_hf(encoder).items()}
        for key, v in hf.items():
            if TEXT.search(key):
                out.append((network, "text_model." + key[:-len(".weight")], None, tuple(v.shape)))
    return out


def _low_rank(shape, rank, g) -> tuple[torch.Tensor, torch.Tensor]:
    """up [out, r(, 1, 1)], down [r, in(, kh, kw)]: the shapes trainers write for Linear and conv layers."""
    up = torch.randn(shape[0], rank, *[1] * (len(shape) - 2), generator=g) * 0.05
    down = torch.randn(rank, *shape[1:], generator=g) * 0.05
    return up, down


def factors(kind, shape, rank, g) -> dict:
    """One module's factors of ``kind`` (lora | loha | lokr) for a weight of ``shape``, with an alpha."""
    if kind == "lora":
        up, down = _low_rank(shape, rank, g)
        return {"lora_up.weight": up, "lora_down.weight": down, "alpha": torch.tensor(rank / 2)}
    flat = (shape[0], int(torch.tensor(shape[1:]).prod()))
    if kind == "loha":
        out = {}
        for i in (1, 2):
            up, down = _low_rank(flat, rank, g)
            out[f"hada_w{i}_a"], out[f"hada_w{i}_b"] = up * 4, down * 4
        return out | {"alpha": torch.tensor(float(rank))}
    # LoKr: w1 [a, b] full, w2 [out/a, in/b] low rank; a and b the smallest factors > 1 of each side
    a = next(d for d in (2, 3, 4, 5, 1) if shape[0] % d == 0)
    b = next(d for d in (2, 3, 4, 5, 1) if flat[1] % d == 0)
    up, down = _low_rank((shape[0] // a, flat[1] // b), rank, g)
    return {"lokr_w1": torch.randn(a, b, generator=g), "lokr_w2_a": up, "lokr_w2_b": down,
            "alpha": torch.tensor(rank / 2)}


def write_lora(path, model, layout="kohya", kind="lora", convolutions=False, rank=4, seed=0, sdxl_ldm_names=None):
    """A random adapter for ``model`` at ``path``. ``layout``: "kohya" (lora_unet_/lora_te*_ with dots as
    underscores; SDXL files name the UNet's modules the LDM way unless ``sdxl_ldm_names`` is False),
    "peft" (unet./text_encoder*. with lora_A/lora_B, no alpha) or "diffusers_old" (lora.down/lora.up).
    -> {(network, module path): factors} as written."""
    g = torch.Generator().manual_seed(seed)
    sdxl = model.text_encoder_2 is not None
    ldm = sdxl if sdxl_ldm_names is None else sdxl_ldm_names
    tensors, written = {}, {}
    for network, theirs, ours, shape in modules(model, convolutions or kind != "lora"):
        if layout == "diffusers_old" and not OLD_DIFFUSERS.search(theirs):
            continue
        f = factors(kind, shape, rank, g)
        written[(network, theirs)] = f
        if layout == "kohya":
            prefix = "lora_unet_" if network == "unet" else ("lora_te1_" if sdxl and network == "text"
                                                             else KOHYA_TEXT[network])
            name = prefix + ((ours if ldm and network == "unet" else theirs).replace(".", "_"))
            tensors.update({f"{name}.{k}": v for k, v in f.items()})
        else:
            up, down = f["lora_up.weight"], f["lora_down.weight"]
            name = PEFT_PREFIX[network] + theirs
            ends = ("lora_B.weight", "lora_A.weight")
            if layout == "diffusers_old":      # its attention processors' names, and its text encoder's
                name = PEFT_PREFIX[network] + OLD_DIFFUSERS.sub(lambda m: f".processor.{m[1]}_lora", theirs)
                ends = ("lora.up.weight", "lora.down.weight")
                if network != "unet":
                    name = PEFT_PREFIX[network] + theirs
                    ends = ("lora_linear_layer.up.weight", "lora_linear_layer.down.weight")
            tensors.update({f"{name}.{ends[0]}": up.contiguous(), f"{name}.{ends[1]}": down.contiguous()})
            f.pop("alpha")                     # these layouts store none: the scale is 1
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return written


# SD3's and FLUX's transformers: what their trainers (sd-scripts, ai-toolkit) change, every Linear of the blocks
# and of the final layer
TRANSFORMER = re.compile(r"(blocks\.\d+\..+|final_layer\.(linear|adaLN_modulation\.1))\.weight$")


def transformer_modules(model) -> list[tuple[str, list[tuple[str, tuple | None]], tuple, bool]]:
    """(our module path, [(diffusers module path, our rows it fills)], our weight shape, whether our rows are
    diffusers' with the two halves exchanged) of every Linear an SD3 or FLUX adapter changes; several diffusers
    modules where ours stacks them (q, k, v)."""
    transformer = networks(model)["unet"]
    sd = transformer.state_dict()
    pairs, swapped = layouts.transformer_names(transformer.cfg)
    out = []
    for ours, theirs in pairs:
        if ours in sd and sd[ours].dim() == 2 and TRANSFORMER.search(ours):
            rows = fused_rows(sd[ours].shape, len(theirs))
            out.append((ours[:-len(".weight")], [(t[:-len(".weight")], r) for t, r in zip(theirs, rows)],
                        tuple(sd[ours].shape), ours in swapped))
    return out


def write_transformer_lora(path, model, layout="peft", rank=4, seed=0) -> None:
    """A random LoRA for ``model``'s SD3/FLUX transformer at ``path``, the same change in every ``layout``:
    "peft" (transformer.<diffusers path>.lora_A/lora_B, one per diffusers module, no alpha), "kohya"
    (lora_unet_<our path, underscores>.lora_down/lora_up/alpha) or "comfy" (diffusion_model.<our path>.lora_A/
    lora_B/alpha). Ours stacks q, k and v in one weight: the kohya and ComfyUI files hold their three changes as one
    LoRA of three times the rank (up block-diagonal, downs stacked), alpha = that rank, as sd-scripts writes it."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for ours, parts, shape, swapped in transformer_modules(model):
        ups, downs = [], []
        for _, rows in parts:
            up, down = _low_rank((rows[1] - rows[0] if rows else shape[0], shape[1]), rank, g)
            ups.append(up), downs.append(down)
        if layout == "peft":
            for (theirs, _), up, down in zip(parts, ups, downs):
                tensors |= {f"transformer.{theirs}.lora_A.weight": down, f"transformer.{theirs}.lora_B.weight": up}
            continue
        up, down, alpha = torch.block_diag(*ups), torch.cat(downs), torch.tensor(float(rank * len(parts)))
        up = torch.cat(up.chunk(2)[::-1]) if swapped else up
        if layout == "kohya":
            name = "lora_unet_" + ours.replace(".", "_")
            tensors |= {f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up, f"{name}.alpha": alpha}
        else:
            name = "diffusion_model." + ours
            tensors |= {f"{name}.lora_A.weight": down, f"{name}.lora_B.weight": up, f"{name}.alpha": alpha}
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
