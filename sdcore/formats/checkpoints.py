"""What a checkpoint file or folder is, and the tensors and configuration of each of its networks.

``read_model``: a single-file LDM checkpoint (SD1.x/SD2.x/SDXL, .safetensors or .ckpt) or a diffusers
pipeline folder; ``read_vae``: a VAE alone; ``read_controlnet``: a ControlNet. Each gives ``Part``s,
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
                    infer_text_config, infer_unet_config, infer_vae_config, mmdit_config_from_diffusers,
                    text_config_from_diffusers,
                    unet_config_from_diffusers, vae_config_from_diffusers, vae_config_from_diffusers_names)
from .infer import REFINER, SDXL_FAMILIES


@dataclasses.dataclass
class Part:
    """One network of a checkpoint: its tensors (our names), configuration, and where they come from."""
    tensors: Tensors
    cfg: object
    source: str


@dataclasses.dataclass
class ModelParts:
    family: str                   # "sd1" | "sd2" | "sdxl" | "sdxl_refiner" (infer.REFINER)
    unet: Part
    vae: Part
    text: Part
    prediction: str | None        # "eps" | "v" when the checkpoint says; None: unknown
    native_size: int | None       # when the checkpoint says
    text_2: Part | None = None    # SDXL base's second text encoder (OpenCLIP ViT-bigG)


# What a family's files do not say, where it differs from SD1's: the VAE's latent scale and the native size
FAMILY_DEFAULTS = {family: {"vae_scale": 0.13025, "native_size": 1024} for family in SDXL_FAMILIES}
SUPPORTED = "supported: SD1.x, SD2.x, SDXL base, its fine-tunes and its refiner"
# Single files of other families, by a key prefix any of which marks them, checked before our own
# layouts (an SDXL file also has model.diffusion_model.input_blocks.*).
REFUSED_FILES = [
    (("model.diffusion_model.double_blocks.", "double_blocks.", "model.diffusion_model.joint_blocks."),
     f"is a Flux/SD3 checkpoint ({SUPPORTED})"),
    (("control_model.", "input_hint_block.", "controlnet_cond_embedding."),
     "is a ControlNet, not a base model: pass it with --control-net"),
]
# Diffusers pipelines of other families, by a component their model_index.json names.
REFUSED_PIPELINES = [
    ("transformer", f"is a Flux/SD3 pipeline ({SUPPORTED})"),
]


def read_model(path: str | os.PathLike, vae: str | None = None) -> ModelParts:
    """A base model's three networks; ``vae``: a separate VAE file/folder replacing the checkpoint's."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise CheckpointError(f"no such file or folder: {path} (give a .safetensors/.ckpt checkpoint or a diffusers folder)")
    try:
        parts = read_pipeline_folder(path) if os.path.isdir(path) else read_single_file(path)
    except (KeyError, IndexError) as e:           # a shape read from a tensor that is not there
        raise CheckpointError(f"{path}: its tensors do not make up a whole network ({type(e).__name__} {e} while reading "
                              "its configuration): is the file complete?") from None
    _check_parts_agree(path, parts)
    if vae:
        parts.vae = read_vae(vae)          # its configuration is its own, not the checkpoint's
    elif parts.vae.cfg is None:
        raise CheckpointError(f"{path} has no VAE (first_stage_model.* tensors): pass one with --vae")
    return parts


def _check_parts_agree(path: str, parts: ModelParts) -> None:
    """The UNet reads what the text encoders give: their hidden states side by side (its context width),
    and for SDXL the pooled output in its label vector. A file whose parts come from different families
    would load and fail at its first request."""
    texts = [p.cfg for p in (parts.text, parts.text_2) if p is not None]
    width, u = sum(c.width for c in texts), parts.unet.cfg
    label = parts.family in SDXL_FAMILIES
    if u.context_dim != width or (u.adm_in_channels is not None) != label:
        raise CheckpointError(
            f"{path}: its parts do not fit together: the UNet takes text {u.context_dim} wide"
            f"{' and a label vector' if u.adm_in_channels else ''}, the text encoder(s) read as {parts.family} give "
            f"{' + '.join(str(c.width) for c in texts)}{' and a pooled output' if label else ''}. Is it a mix of "
            "an SD1/SD2 and an SDXL checkpoint?")


def read_single_file(path: str) -> ModelParts:
    """The LDM layout: model.diffusion_model.*, first_stage_model.*, cond_stage_model.* (SD1: a Hugging
    Face CLIPTextModel's names; SD2: OpenCLIP's, which are ours), and our sdcore.config metadata."""
    tf = TensorFile(path)
    t = from_file(tf)
    for prefixes, why in REFUSED_FILES:
        if t.has_prefix(*prefixes):
            raise CheckpointError(f"{path} {why}")
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
    vae = t.sub("first_stage_model.")
    vae_cfg = None                         # None: the file has no VAE (read_model wants one from --vae)
    if "encoder.conv_in.weight" in vae:
        vae_cfg = infer_vae_config(vae)
        if "vae_scale" in defaults:
            vae_cfg = dataclasses.replace(vae_cfg, scale_factor=defaults["vae_scale"])
        vae_cfg = with_overrides(vae_cfg, meta.get("vae"))
    return ModelParts(
        family=family,
        unet=Part(unet, with_overrides(infer_unet_config(unet), meta.get("unet")), path),
        vae=Part(vae, vae_cfg, path),
        text=Part(text, with_overrides(infer_text_config(text, family), meta.get("text")), path),
        prediction=meta.get("prediction"), native_size=meta.get("native_size", defaults.get("native_size")),
        text_2=None if text_2 is None else Part(
            text_2, with_overrides(infer_text_config(text_2, family, second=True), meta.get("text_2")), path))


def read_pipeline_folder(path: str) -> ModelParts:
    """A diffusers StableDiffusionPipeline folder: model_index.json, unet/, vae/, text_encoder/,
    tokenizer/, scheduler/ (each network a config.json and its weights, in diffusers names)."""
    if not os.path.exists(os.path.join(path, "model_index.json")):
        component = ("config.json", "diffusion_pytorch_model.safetensors")
        if all(os.path.exists(os.path.join(path, name)) for name in component):
            raise CheckpointError(f"{path} is a single diffusers component, not a pipeline folder (no model_index.json)")
        raise CheckpointError(f"{path} is a folder but not a diffusers pipeline (no model_index.json)")
    index = read_json(os.path.join(path, "model_index.json"))
    for component, why in REFUSED_PIPELINES:
        if component in index:
            raise CheckpointError(f"{path} {why}")
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


def _text_from_folder(path: str, folder: str, tokenizer: str, pad: int, family: str) -> Part:
    """A transformers CLIPTextModel (or CLIPTextModelWithProjection: its text_projection sits beside
    text_model.*) and the padding token of its tokenizer folder."""
    tc = read_json(os.path.join(path, folder, "config.json"))
    hf = component_weights(os.path.join(path, folder), "model")
    if hf.has_prefix("text_model."):
        projection = hf.entries.get("text_projection.weight")
        hf = hf.sub("text_model.")
        if projection is not None:
            hf.entries["text_projection.weight"] = projection
    special = os.path.join(path, tokenizer, "special_tokens_map.json")
    if os.path.exists(special):
        tok = read_json(special).get("pad_token")
        tok = tok.get("content") if isinstance(tok, dict) else tok
        pad = EOS if tok == "<|endoftext|>" else 0
    text = layouts.text_from_hf(hf)
    return Part(text, text_config_from_diffusers(tc, pad, family, projection="text_projection" in text), path)


def read_vae(path: str) -> Part:
    """A VAE alone: a diffusers ``vae/`` folder, or a file in LDM (bare or first_stage_model.) or diffusers naming."""
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
        cfg = with_overrides(vae_config_from_diffusers_names(t), overrides)
        return Part(_vae_from_diffusers(t, cfg), cfg, path)
    if "encoder.conv_in.weight" not in t:
        raise CheckpointError(f"{path} is not a VAE (no encoder.conv_in.weight)")
    return Part(t, with_overrides(infer_vae_config(t), overrides), path)


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
FLUX = TransformerLayout("FLUX transformer", "FluxTransformer2DModel", "double_blocks.0.img_attn.qkv.weight",
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
    t = from_file(tf)
    if t.has_prefix("model.diffusion_model."):
        t = t.sub("model.diffusion_model.")
    if layout.diffusers in t:
        t = layout.from_diffusers(t)
    if layout.ours not in t:
        raise CheckpointError(f"{path} is not a {layout.what} (no {layout.ours})")
    return Part(t, with_overrides(layout.infer(t), read_metadata(tf).get(layout.metadata)), path)


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
