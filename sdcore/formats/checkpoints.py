"""What a checkpoint file or folder is, and the tensors and configuration of each of its networks.

``read_model``: a single-file checkpoint (SD1.x/SD2.x/SDXL in the LDM layout, SD3/SD3.5 in Stability AI's;
.safetensors, .ckpt or .gguf) or a diffusers pipeline folder; ``read_vae``: a VAE alone; ``read_clip``,
``read_t5``: a text encoder alone; ``read_controlnet``: a ControlNet. Each gives ``Part``s,
a network's tensors under our names with its full configuration, which ``build`` turns into the
network (``sdcore.load_model``, ``sdcore.load_controlnet``). Files of families we do not run yet are
refused here with a one-line reason; supporting one means a reader here plus its tables in layouts.py.
"""
import dataclasses
import os

from ..tokenizer import EOS
from ..unet import UNet, UNetConfig
from ..vae import AutoencoderKL
from . import layouts
from .build import meta_keys
from .files import (CheckpointError, TensorFile, Tensors, component_weights, from_file, read_json, read_metadata,
                    with_overrides)
from .infer import (flux_config_from_diffusers, infer_controlnet_config, infer_flux_config, infer_mmdit_config,
                    infer_t5_config, infer_text_config, infer_unet_config, infer_vae_config, mmdit_config_from_diffusers,
                    t5_config_from_transformers, text_config_from_diffusers,
                    unet_config_from_diffusers, vae_config_from_diffusers, vae_config_from_diffusers_names)
from .infer import FLUX, REFINER, SD3, SDXL_FAMILIES


@dataclasses.dataclass
class Part:
    """One network of a checkpoint: its tensors (our names), configuration, and where they come from."""
    tensors: Tensors
    cfg: object
    source: str


@dataclasses.dataclass
class ModelParts:
    family: str                   # "sd1" | "sd2" | "sdxl" | "sdxl_refiner" (infer.REFINER) | "sd3" | "flux"
    unet: Part                    # the denoising network: a UNet, SD3's MMDiT or FLUX's transformer
    vae: Part
    text: Part | None             # None only for an SD3/FLUX file without its CLIP-L (until --clip-l gives one)
    prediction: str | None        # "eps" | "v" | "flow" when the checkpoint says; None: unknown
    native_size: int | None       # when the checkpoint says
    text_2: Part | None = None    # SDXL base's and SD3's second text encoder (OpenCLIP ViT-bigG)
    text_3: Part | None = None    # the T5-XXL encoder: SD3's (optional: without it its tokens are zeros), FLUX's
    tokenizer_3: str | None = None    # a diffusers folder's T5 tokenizer; None: the shipped one
    flow_shift: float | None = None   # a rectified-flow model's schedule shift (samplers.flow_sigmas)


# What a family's files do not say, where it differs from SD1's: the VAE's latent scale (and shift) and the
# native size
FAMILY_DEFAULTS = {**{family: {"vae_scale": 0.13025, "native_size": 1024} for family in SDXL_FAMILIES},
                   SD3: {"vae_scale": 1.5305, "vae_shift": 0.0609, "native_size": 1024, "flow_shift": 3.0},
                   FLUX: {"vae_scale": 0.3611, "vae_shift": 0.1159, "native_size": 1024}}
SUPPORTED = "supported: SD1.x, SD2.x, SDXL base, its fine-tunes and its refiner, SD3, SD3.5, FLUX.1"
# Single files of other families, by a key prefix any of which marks them, checked before our own
# layouts (an SDXL file also has model.diffusion_model.input_blocks.*).
REFUSED_FILES = [
    (("control_model.", "input_hint_block.", "controlnet_cond_embedding."),
     "is a ControlNet, not a base model: pass it with --control-net"),
]
# Diffusers pipelines of other families, by how their model_index.json's class name starts.
REFUSED_PIPELINES = [
    ("FluxFill", f"is a FLUX Fill (inpainting) pipeline ({SUPPORTED})"),
    ("FluxControl", f"is a FLUX Control pipeline ({SUPPORTED})"),
]
SEPARATE_ENCODERS = ("clip_l", "clip_g", "t5xxl")     # read_model's options for text encoders in files of their own
# which of them each family reads (and needs: all but T5 for SD3)
FAMILY_ENCODERS = {SD3: SEPARATE_ENCODERS, FLUX: ("clip_l", "t5xxl")}


def read_model(path: str | os.PathLike, vae: str | None = None, clip_l: str | None = None, clip_g: str | None = None,
               t5xxl: str | None = None) -> ModelParts:
    """A base model's networks; ``vae``: a separate VAE file/folder replacing the checkpoint's; ``clip_l``,
    ``clip_g``, ``t5xxl``: SD3's text encoders from files of their own (replacing any the checkpoint has)."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise CheckpointError(f"no such file or folder: {path} (give a .safetensors/.ckpt checkpoint or a diffusers folder)")
    try:
        parts = read_pipeline_folder(path) if os.path.isdir(path) else read_single_file(path)
    except (KeyError, IndexError) as e:           # a shape read from a tensor that is not there
        raise CheckpointError(f"{path}: its tensors do not make up a whole network ({type(e).__name__} {e} while reading "
                              "its configuration): is the file complete?") from None
    given = {name: value for name, value in zip(SEPARATE_ENCODERS, (clip_l, clip_g, t5xxl)) if value}
    takes = FAMILY_ENCODERS.get(parts.family, ())
    if set(given) - set(takes):
        options = "/".join("--" + n.replace("_", "-") for n in given if n not in takes)
        raise CheckpointError(f"{options} give text encoders that {path} ({parts.family}) does not read"
                              + ("" if takes else ": its encoders are in its own file"))
    if clip_l:
        parts.text = read_clip(clip_l, parts.family)
    if clip_g:
        parts.text_2 = read_clip(clip_g, parts.family, second=True)
    if t5xxl:
        parts.text_3 = read_t5(t5xxl)
    if vae:
        parts.vae = read_vae(vae, parts.family)
    elif parts.vae.cfg is None:
        raise CheckpointError(f"{path} has no VAE (first_stage_model.* tensors): pass one with --vae"
                              + (" (FLUX's is ae.safetensors)" if parts.family == FLUX else ""))
    missing = [n for n in takes if n != "t5xxl" or parts.family == FLUX
               if getattr(parts, {"clip_l": "text", "clip_g": "text_2", "t5xxl": "text_3"}[n]) is None]
    if parts.text is None or missing:
        raise CheckpointError(f"{path} holds no {', '.join(missing) or 'text encoder'} text encoder: pass "
                              f"{' and '.join('--' + n.replace('_', '-') for n in missing)}")
    _check_parts_agree(path, parts)
    return parts


def _check_parts_agree(path: str, parts: ModelParts) -> None:
    """The denoiser reads what the text encoders and the VAE give: the encoders' hidden states side by side
    (its context width), for SDXL and SD3 their pooled outputs, and the VAE's latent channels. A file whose
    parts come from different families (or a --vae, --clip-l, ... of another one) would load and fail at its
    first request."""
    z, channels = parts.vae.cfg.z_channels, parts.unet.cfg.out_channels
    if z != channels:
        raise CheckpointError(f"{path}: the VAE ({parts.vae.source}) makes {z}-channel latents; the "
                              f"{'MMDiT' if parts.family == SD3 else 'UNet'} draws {channels}-channel ones: they are "
                              "not of one family")
    if parts.family == SD3:
        _check_sd3_parts(path, parts)
        return
    if parts.family == FLUX:
        _check_flux_parts(path, parts)
        return
    texts = [p.cfg for p in (parts.text, parts.text_2) if p is not None]
    width, u = sum(c.width for c in texts), parts.unet.cfg
    label = parts.family in SDXL_FAMILIES
    if u.context_dim != width or (u.adm_in_channels is not None) != label:
        raise CheckpointError(
            f"{path}: its parts do not fit together: the UNet takes text {u.context_dim} wide"
            f"{' and a label vector' if u.adm_in_channels else ''}, the text encoder(s) read as {parts.family} give "
            f"{' + '.join(str(c.width) for c in texts)}{' and a pooled output' if label else ''}. Is it a mix of "
            "an SD1/SD2 and an SDXL checkpoint?")


def _check_sd3_parts(path: str, parts: ModelParts) -> None:
    """SD3's text tokens are the two CLIPs' hidden states side by side (768 + 1280), zero-padded to T5's width
    (4096, the MMDiT's context width), and its pooled vector the CLIPs' projected outputs (768 + 1280)."""
    m, (l, g) = parts.unet.cfg, (parts.text.cfg, parts.text_2.cfg)
    if l.width >= g.width:
        raise CheckpointError(f"{path}: the first CLIP is {l.width} wide and the second {g.width}: CLIP-L (768) goes "
                              "first, bigG (1280) second (are --clip-l and --clip-g swapped?)")
    if not (l.projection_dim and g.projection_dim):
        raise CheckpointError(f"{path}: SD3 needs both CLIPs' text_projection (their pooled outputs); "
                              f"{'CLIP-L' if not l.projection_dim else 'CLIP-G'} has none")
    if l.width + g.width > m.context_dim or l.projection_dim + g.projection_dim != m.pooled_dim:
        raise CheckpointError(f"{path}: the MMDiT takes text {m.context_dim} wide and a pooled vector of {m.pooled_dim}; "
                              f"the CLIPs give {l.width} + {g.width} and {l.projection_dim} + {g.projection_dim}")
    t5 = parts.text_3
    if t5 is not None and t5.cfg.width != m.context_dim:
        raise CheckpointError(f"{path}: the T5 encoder ({t5.source}) is {t5.cfg.width} wide; the MMDiT takes text "
                              f"{m.context_dim} wide (T5-XXL's 4096)")


def _check_flux_parts(path: str, parts: ModelParts) -> None:
    """FLUX reads CLIP-L's pooled output (768) and T5-XXL's tokens (4096)."""
    f, clip, t5 = parts.unet.cfg, parts.text.cfg, parts.text_3.cfg
    if clip.width != f.pooled_dim:
        raise CheckpointError(f"{path}: the FLUX transformer takes a pooled vector of {f.pooled_dim}; the CLIP "
                              f"({parts.text.source}) gives {clip.width} (FLUX reads CLIP-L, 768 wide)")
    if t5.width != f.context_dim:
        raise CheckpointError(f"{path}: the T5 encoder ({parts.text_3.source}) is {t5.width} wide; the FLUX "
                              f"transformer takes text {f.context_dim} wide (T5-XXL's 4096)")


def read_single_file(path: str) -> ModelParts:
    """The LDM layout: model.diffusion_model.*, first_stage_model.*, cond_stage_model.* (SD1: a Hugging
    Face CLIPTextModel's names; SD2: OpenCLIP's, which are ours), and our sdcore.config metadata."""
    tf = TensorFile(path)
    t = from_file(tf)
    for prefixes, why in REFUSED_FILES:
        if t.has_prefix(*prefixes):
            raise CheckpointError(f"{path} {why}")
    if t.has_prefix("model.diffusion_model.double_blocks.", "double_blocks.", FLUX_LAYOUT.diffusers):
        return read_flow_file(path, tf, t, FLUX)
    if t.has_prefix("model.diffusion_model.joint_blocks.", "joint_blocks.", MMDIT.diffusers):
        return read_flow_file(path, tf, t, SD3)
    if t.has_prefix("cond_stage_model.") and t.has_prefix("conditioner."):
        raise CheckpointError(f"{path} mixes SD1/SD2 text-encoder tensors (cond_stage_model.*) with SDXL ones "
                              "(conditioner.*): it is not one checkpoint")
    if not t.has_prefix("model.diffusion_model.input_blocks."):
        if t.has_prefix("encoder.down.", "first_stage_model.", "encoder.down_blocks."):
            raise CheckpointError(f"{path} holds only a VAE: pass it with --vae next to a full checkpoint")
        raise CheckpointError(f"{path} is not a Stable Diffusion checkpoint (no model.diffusion_model.* UNet tensors)")
    meta = read_metadata(tf)
    unet = t.sub("model.diffusion_model.")
    if t.has_prefix("model_ema.diffusion_model"):      # full (non-"emaonly") files: prefer the EMA weights
        for k in list(unet.keys()):
            ema = "model_ema.diffusion_model" + k.replace(".", "")     # LDM's EMA names drop the dots
            if ema in t:
                unet.entries[k] = t.entries[ema]
    text_2 = None
    if t.has_prefix("conditioner.embedders.1.model."):       # SDXL: CLIP ViT-L (HF names) + OpenCLIP bigG (ours)
        family = "sdxl"
        text = layouts.text_from_hf(t.sub("conditioner.embedders.0.transformer.text_model."))
        text_2 = t.sub("conditioner.embedders.1.model.")
    elif t.has_prefix("conditioner.embedders.0.model."):     # the SDXL refiner: OpenCLIP bigG alone
        family, text = REFINER, t.sub("conditioner.embedders.0.model.")
    elif t.has_prefix("cond_stage_model.model."):
        family, text = "sd2", t.sub("cond_stage_model.model.")
    else:
        family = "sd1"
        prefix = "cond_stage_model.transformer.text_model." if t.has_prefix("cond_stage_model.transformer.text_model.") \
            else "cond_stage_model.transformer."
        text = layouts.text_from_hf(t.sub(prefix))
    family = meta.get("family", family)
    defaults = FAMILY_DEFAULTS.get(family, {})
    return ModelParts(
        family=family,
        unet=Part(unet, with_overrides(infer_unet_config(unet), meta.get("unet")), path),
        vae=_embedded_vae(t, family, meta, path),
        text=Part(text, with_overrides(infer_text_config(text, family), meta.get("text")), path),
        prediction=meta.get("prediction"), native_size=meta.get("native_size", defaults.get("native_size")),
        text_2=None if text_2 is None else Part(
            text_2, with_overrides(infer_text_config(text_2, family, second=True), meta.get("text_2")), path))


def _embedded_vae(t: Tensors, family: str, meta: dict, path: str) -> Part:
    """A single file's first_stage_model.* VAE, its scale (and shift) the family's unless our metadata records them;
    a Part without a configuration when the file has none (read_model then wants one from --vae)."""
    vae = t.sub("first_stage_model.")
    if "encoder.conv_in.weight" not in vae:
        return Part(vae, None, path)
    return Part(vae, family_latent_space(infer_vae_config(vae), family, meta.get("vae")), path)


def family_latent_space(cfg, family: str, overrides: dict | None = None):
    """A VAE configuration read off shapes, with its family's latent scale and shift (which no shape tells) and
    then what our metadata records."""
    defaults = FAMILY_DEFAULTS.get(family, {})
    cfg = dataclasses.replace(cfg, scale_factor=defaults.get("vae_scale", cfg.scale_factor),
                              shift_factor=defaults.get("vae_shift", cfg.shift_factor))
    return with_overrides(cfg, overrides)


def read_flow_file(path: str, tf: TensorFile, t: Tensors, family: str) -> ModelParts:
    """Single files of the rectified-flow families: Stability AI's SD3/SD3.5 and Black Forest Labs' FLUX. The
    transformer under model.diffusion_model. (or bare: a transformer-only file, as flux1-dev.safetensors), the VAE
    under first_stage_model. (ComfyUI's all-in-one FLUX files: vae.), and in the files that include them the text
    encoders in Hugging Face's names under text_encoders.clip_l., .clip_g. and .t5xxl. (each with a transformer.
    prefix)."""
    meta = read_metadata(tf)
    encoders = {name: t.sub(f"text_encoders.{name}.transformer.") for name in FAMILY_ENCODERS[family]
                if t.has_prefix(f"text_encoders.{name}.")}
    clip_l, clip_g, t5 = (encoders.get(name) for name in SEPARATE_ENCODERS)
    if family == FLUX and not t.has_prefix("first_stage_model.") and t.has_prefix("vae.encoder."):
        t.entries.update({"first_stage_model." + k: v for k, v in t.sub("vae.").entries.items()})
    defaults = FAMILY_DEFAULTS[family]
    return ModelParts(
        family=family, unet=transformer_part(t, MMDIT if family == SD3 else FLUX_LAYOUT, meta, path),
        vae=_embedded_vae(t, family, meta, path),
        text=_clip_part(clip_l, family, False, path) if clip_l else None,
        text_2=_clip_part(clip_g, family, True, path) if clip_g else None,
        text_3=t5_part(t5, path) if t5 else None,
        prediction="flow", native_size=meta.get("native_size", defaults["native_size"]),
        flow_shift=meta.get("flow_shift", defaults.get("flow_shift")))


def _clip_part(hf: Tensors, family: str, second: bool, source: str) -> Part:
    """A transformers CLIPTextModel[WithProjection] state dict (text_model.*, its text_projection beside it)."""
    text = hf_clip(hf)
    return Part(text, infer_text_config(text, family, second), source)


def hf_clip(hf: Tensors) -> Tensors:
    """A transformers CLIPTextModel[WithProjection] state dict, with or without its text_model. prefix (the
    projection sits beside text_model.*), seen under our names."""
    if hf.has_prefix("text_model."):
        projection = hf.entries.get("text_projection.weight")
        hf = hf.sub("text_model.")
        if projection is not None:
            hf.entries["text_projection.weight"] = projection
    return layouts.text_from_hf(hf)


def read_clip(path: str, family: str, second: bool = False) -> Part:
    """A CLIP text encoder alone (clip_l.safetensors, clip_g.safetensors as ComfyUI and sd.cpp users have them):
    Hugging Face names, under any prefix (text_encoders.clip_g.transformer. ...)."""
    t, prefix = _encoder_file(path, "CLIP-G" if second else "CLIP-L", "embeddings.token_embedding.weight")
    return _clip_part(t.sub(prefix.removesuffix("text_model.")), family, second, path)


def read_t5(path: str) -> Part:
    """A T5 encoder alone: a transformers T5EncoderModel folder (a diffusers pipeline's text_encoder_3/), a file in
    its names (t5xxl_fp16.safetensors, under any prefix; stable-diffusion.cpp's GGUFs keep them) or a GGUF in
    llama.cpp's names (its converter's t5encoder files)."""
    if os.path.isdir(path):
        return t5_part(component_weights(path, "model"), path,
                       t5_config_from_transformers(read_json(os.path.join(path, "config.json"))))
    t, prefix = _encoder_file(path, "T5", "encoder.block.0.layer.0.SelfAttention.q.weight", layouts.T5_GGUF_ANCHOR)
    return t5_part(layouts.t5_from_gguf(t) if prefix is None else t.sub(prefix), path)


def _encoder_file(path: str, what: str, anchor: str, llama_cpp_anchor: str | None = None) -> tuple[Tensors, str | None]:
    """A text encoder's file, and the prefix its Hugging Face names sit under (found by the key ``anchor``); None
    for a file in llama.cpp's GGUF names (found by ``llama_cpp_anchor``)."""
    if not os.path.isfile(path):
        raise CheckpointError(f"no such {what} file: {path}")
    t = from_file(TensorFile(path))
    if llama_cpp_anchor and llama_cpp_anchor in t:
        return t, None
    key = next((k for k in t.keys() if k.endswith(anchor)), None)
    if key is None:
        names = "Hugging Face's or llama.cpp's names" if llama_cpp_anchor else "Hugging Face's names"
        raise CheckpointError(f"{path} is not a {what} text encoder in {names} (no {anchor})")
    return t, key[:-len(anchor)]


def t5_part(t: Tensors, source: str, cfg=None) -> Part:
    """T5 tensors in transformers' names; the token table is ``shared`` (some files keep only its tied alias)."""
    if "shared.weight" not in t and "encoder.embed_tokens.weight" in t:
        t.entries["shared.weight"] = t.entries["encoder.embed_tokens.weight"]
    try:
        return Part(t, cfg or infer_t5_config(t), source)
    except (KeyError, IndexError) as e:
        raise CheckpointError(f"{source}: its T5 tensors are incomplete ({type(e).__name__} {e})") from None


def read_pipeline_folder(path: str) -> ModelParts:
    """A diffusers StableDiffusionPipeline folder: model_index.json, unet/, vae/, text_encoder/,
    tokenizer/, scheduler/ (each network a config.json and its weights, in diffusers names)."""
    if not os.path.exists(os.path.join(path, "model_index.json")):
        component = ("config.json", "diffusion_pytorch_model.safetensors")
        if all(os.path.exists(os.path.join(path, name)) for name in component):
            raise CheckpointError(f"{path} is a single diffusers component, not a pipeline folder (no model_index.json)")
        raise CheckpointError(f"{path} is a folder but not a diffusers pipeline (no model_index.json)")
    index = read_json(os.path.join(path, "model_index.json"))
    for pipeline, why in REFUSED_PIPELINES:
        if str(index.get("_class_name", "")).startswith(pipeline):
            raise CheckpointError(f"{path} {why}")
    if "transformer" in index:
        return read_flow_folder(path, index)
    unet_json = read_json(os.path.join(path, "unet", "config.json"))
    unet_cfg = unet_config_from_diffusers(unet_json)
    unet = layouts.renamed(component_weights(os.path.join(path, "unet"), "diffusion_pytorch_model"),
                           layouts.unet_name_map(meta_keys(UNet, unet_cfg), unet_cfg))
    text_2 = None
    if "text_encoder_2" in index and not (index.get("text_encoder") or [None])[0]:
        # the refiner's folder: "text_encoder": [null, null], its bigG in text_encoder_2/
        family = REFINER
        text = _text_from_folder(path, "text_encoder_2", "tokenizer_2", 0, family)
    else:
        tc = read_json(os.path.join(path, "text_encoder", "config.json"))
        if "text_encoder_2" in index:
            family = "sdxl"
        else:      # OpenAI's CLIP-L (SD1) uses quick_gelu; the OpenCLIP towers of SD2 use exact gelu
            family = "sd1" if tc.get("hidden_act", "quick_gelu") == "quick_gelu" else "sd2"
        text = _text_from_folder(path, "text_encoder", "tokenizer", EOS if family == "sd1" else 0, family)
        if family == "sdxl":
            text_2 = _text_from_folder(path, "text_encoder_2", "tokenizer_2", 0, family)
    sched = os.path.join(path, "scheduler", "scheduler_config.json")
    pt = read_json(sched).get("prediction_type") if os.path.exists(sched) else None
    return ModelParts(
        family=family, unet=Part(unet, unet_cfg, path), vae=read_vae(os.path.join(path, "vae")), text=text,
        prediction={"v_prediction": "v", "epsilon": "eps"}.get(pt),
        # diffusers' default image side is the UNet's sample_size (in latent pixels) times the VAE's 8
        native_size=unet_json["sample_size"] * 8 if isinstance(unet_json.get("sample_size"), int)
        else FAMILY_DEFAULTS.get(family, {}).get("native_size"), text_2=text_2)


def read_flow_folder(path: str, index: dict) -> ModelParts:
    """A diffusers StableDiffusion3Pipeline folder: transformer/, vae/, text_encoder/ (CLIP-L), text_encoder_2/
    (bigG), text_encoder_3/ (T5-XXL; may be left out, "text_encoder_3": [null, null]) and their tokenizers; or a
    FluxPipeline folder: transformer/, vae/, text_encoder/ (CLIP-L), text_encoder_2/ (T5-XXL), tokenizer_2/."""
    def present(component):
        return (index.get(component) or [None])[0] is not None and os.path.isdir(os.path.join(path, component))
    flux = str(index.get("_class_name", "")).startswith("Flux")
    family, (t5, tokenizer) = (FLUX, ("text_encoder_2", "tokenizer_2")) if flux else (SD3, ("text_encoder_3", "tokenizer_3"))
    tokenizer = os.path.join(path, tokenizer)
    scheduler = os.path.join(path, "scheduler", "scheduler_config.json")
    shift = read_json(scheduler).get("shift") if os.path.exists(scheduler) and not flux else None
    return ModelParts(
        family=family, unet=read_transformer(os.path.join(path, "transformer"), FLUX_LAYOUT if flux else MMDIT),
        vae=read_vae(os.path.join(path, "vae")),
        text=_text_from_folder(path, "text_encoder", "tokenizer", EOS, family) if present("text_encoder") else None,
        text_2=_text_from_folder(path, "text_encoder_2", "tokenizer_2", 0, SD3) if present("text_encoder_2") and not flux
        else None,
        text_3=read_t5(os.path.join(path, t5)) if present(t5) else None,
        tokenizer_3=tokenizer if os.path.isdir(tokenizer) else None, prediction="flow",
        native_size=FAMILY_DEFAULTS[family]["native_size"], flow_shift=shift or FAMILY_DEFAULTS[family].get("flow_shift"))


def _text_from_folder(path: str, folder: str, tokenizer: str, pad: int, family: str) -> Part:
    """A transformers CLIPTextModel (or CLIPTextModelWithProjection: its text_projection sits beside
    text_model.*) and the padding token of its tokenizer folder."""
    tc = read_json(os.path.join(path, folder, "config.json"))
    hf = component_weights(os.path.join(path, folder), "model")
    projection = "text_projection.weight" in hf
    special = os.path.join(path, tokenizer, "special_tokens_map.json")
    if os.path.exists(special):
        tok = read_json(special).get("pad_token")
        tok = tok.get("content") if isinstance(tok, dict) else tok
        pad = EOS if tok == "<|endoftext|>" else 0
    return Part(hf_clip(hf), text_config_from_diffusers(tc, pad, family, projection=projection), path)


def read_vae(path: str, family: str = "sd1") -> Part:
    """A VAE alone: a diffusers ``vae/`` folder (its config.json gives its latent scale and shift), or a file in LDM
    (bare or first_stage_model.) or diffusers naming (the scale and shift then ``family``'s)."""
    if os.path.isdir(path):
        cfg = vae_config_from_diffusers(read_json(os.path.join(path, "config.json")))
        return Part(_vae_from_diffusers(component_weights(path, "diffusion_pytorch_model"), cfg), cfg, path)
    if not os.path.exists(path):
        raise CheckpointError(f"no such VAE file: {path}")
    tf = TensorFile(path)
    t = from_file(tf)
    if t.has_prefix("first_stage_model."):
        t = t.sub("first_stage_model.")
    overrides = read_metadata(tf).get("vae")        # what shapes cannot tell (groups, scale)
    if "encoder.down_blocks.0.resnets.0.conv1.weight" in t:      # diffusers naming in a single file
        cfg = family_latent_space(vae_config_from_diffusers_names(t), family, overrides)
        return Part(_vae_from_diffusers(t, cfg), cfg, path)
    if "encoder.conv_in.weight" not in t:
        raise CheckpointError(f"{path} is not a VAE (no encoder.conv_in.weight)")
    return Part(t, family_latent_space(infer_vae_config(t), family, overrides), path)


def _vae_from_diffusers(t: Tensors, cfg) -> Tensors:
    names = layouts.vae_name_map(meta_keys(AutoencoderKL, cfg), len(cfg.ch_mult))
    return layouts.renamed(t, names, reshape=layouts.vae_is_linear_attn)


@dataclasses.dataclass(frozen=True)
class TransformerLayout:
    """How a family's transformer files are told apart and read (read_transformer)."""
    what: str                     # for messages
    diffusers_class: str          # a diffusers folder's config.json _class_name
    ours: str                     # a key of our names (the family's own single files)
    diffusers: str                # a key of diffusers' names, in a folder or one file
    metadata: str                 # our metadata entry's part for it (what the shapes do not tell)
    from_diffusers: object        # Tensors in diffusers' names -> ours (layouts)
    infer: object                 # our-named Tensors -> configuration (infer)
    config_from_diffusers: object  # config.json -> configuration (infer)


MMDIT = TransformerLayout("SD3 transformer", "SD3Transformer2DModel", "joint_blocks.0.x_block.attn.qkv.weight",
                          "transformer_blocks.0.attn.to_q.weight", "mmdit", layouts.mmdit_from_diffusers,
                          infer_mmdit_config, mmdit_config_from_diffusers)
FLUX_LAYOUT = TransformerLayout("FLUX transformer", "FluxTransformer2DModel", "double_blocks.0.img_attn.qkv.weight",
                                "single_transformer_blocks.0.proj_mlp.weight", "flux", layouts.flux_from_diffusers,
                                infer_flux_config, flux_config_from_diffusers)


def read_transformer(path: str, layout: TransformerLayout) -> Part:
    """An SD3/SD3.5 (``MMDIT``) or FLUX (``FLUX``) transformer: a diffusers ``transformer/`` folder, or a file in the
    family's own names (Stability AI's, Black Forest Labs'; bare, or under ``model.diffusion_model.`` as whole-model
    and ComfyUI files hold it) or in diffusers' names."""
    if os.path.isdir(path):
        config = read_json(os.path.join(path, "config.json"))
        if config.get("_class_name") != layout.diffusers_class:
            raise CheckpointError(f"{path} holds a diffusers {config.get('_class_name')}, not a {layout.diffusers_class}")
        return Part(layout.from_diffusers(component_weights(path, "diffusion_pytorch_model")),
                    layout.config_from_diffusers(config), path)
    if not os.path.exists(path):
        raise CheckpointError(f"no such {layout.what} file: {path}")
    tf = TensorFile(path)
    return transformer_part(from_file(tf), layout, read_metadata(tf), path)


def transformer_part(t: Tensors, layout: TransformerLayout, meta: dict, path: str) -> Part:
    """The transformer of a file's tensors ``t``: under model.diffusion_model. or bare, in either naming."""
    if t.has_prefix("model.diffusion_model."):
        t = t.sub("model.diffusion_model.")
    if layout.diffusers in t:
        t = layout.from_diffusers(t)
    if layout.ours not in t:
        raise CheckpointError(f"{path} is not a {layout.what} (no {layout.ours})")
    return Part(t, with_overrides(layout.infer(t), meta.get(layout.metadata)), path)


def read_controlnet(path: str) -> Part:
    """A ControlNet from a single file (``control_model.*`` keys or bare, LDM names; or diffusers names)
    or a diffusers ``ControlNetModel`` folder (config.json + diffusion_pytorch_model[.fp16].safetensors)."""
    if not os.path.exists(path):
        raise CheckpointError(f"no such ControlNet file or folder: {path}")
    cfg, overrides = None, None
    if os.path.isdir(path):
        config = read_json(os.path.join(path, "config.json"))
        if config.get("_class_name", "ControlNetModel") != "ControlNetModel":
            raise CheckpointError(f"{path} holds a diffusers {config['_class_name']}, not a ControlNetModel")
        t, cfg = component_weights(path, "diffusion_pytorch_model"), unet_config_from_diffusers(config)
    else:
        tf = TensorFile(path)
        t, overrides = from_file(tf), read_metadata(tf).get("controlnet")
    if "controlnet_cond_embedding.conv_in.weight" in t:
        t = _controlnet_from_diffusers(t)
    elif t.has_prefix("control_model."):
        t = t.sub("control_model.")          # whole-pipeline files also hold the base model: ignored
    if "input_hint_block.0.weight" not in t:
        what = ("a base model, not a ControlNet" if t.has_prefix("model.diffusion_model.")
                else "not a ControlNet (no input_hint_block / controlnet_cond_embedding tensors)")
        raise CheckpointError(f"{path} is {what}")
    if "zero_convs.0.0.weight" not in t:
        raise CheckpointError(f"{path} is a ControlNet variant that is not supported (no zero_convs: "
                              f"control-LoRA or T2I-adapter?); use a full ControlNet")
    return Part(t, with_overrides(cfg or infer_controlnet_config(t), overrides), path)


def _controlnet_from_diffusers(t: Tensors) -> Tensors:
    """Diffusers ControlNetModel names -> ours. The name map needs only the level and ResBlock counts,
    which the keys tell; everything else is then inferred from the renamed tensors as for LDM files."""
    levels = len({k.split(".")[1] for k in t.keys() if k.startswith("down_blocks.")})
    nrb = len({k.split(".")[3] for k in t.keys() if k.startswith("down_blocks.0.resnets.")})
    shape_only = UNetConfig(channel_mult=(1,) * levels, num_res_blocks=nrb)
    ours = layouts.controlnet_name_map(t.keys(), shape_only, reverse=True)
    return layouts.renamed(t, {o: d for d, o in ours.items()})
