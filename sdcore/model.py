"""``load_model``: one entry point for every checkpoint layout, returning a ready ``StableDiffusion``."""
import glob
import json
import os

import torch

from . import cpu_attention, layouts
from .clip import TextConfig, TextEncoder
from .cuda_graphs import CUDAGraphed, unwrapped
from .loader import (METADATA_KEY, CheckpointError, TensorFile, Tensors, _apply_overrides, build, from_file,
                     hf_text_to_ours, infer_text_config, infer_unet_config, infer_vae_config, meta_keys, renamed)
from .tokenizer import EOS, Tokenizer
from .unet import UNet, UNetConfig
from .vae import AutoencoderKL, VAEConfig

FAMILIES = ("sd1", "sd2")


class StableDiffusion:
    """The three networks of one checkpoint plus what is needed to drive them."""

    def __init__(self, *, family, prediction, unet, vae, text_encoder, name, native_size, device, dtype, source):
        self.family, self.prediction, self.name, self.source = family, prediction, name, source
        self.unet, self.vae, self.text_encoder = unet, vae, text_encoder
        self.tokenizer = Tokenizer(pad_id=text_encoder.cfg.pad_id)
        self.native_size, self.device, self.dtype = native_size, torch.device(device), dtype
        self.controlnet = None            # a sdcore.controlnet.ControlNet, set by attach_controlnet

    @property
    def inpainting(self) -> bool:
        return self.unet.cfg.in_channels == 9

    def compile(self):
        """Opt-in ``torch.compile`` of the UNet (inductor, weights frozen into the graph: inference only,
        which is all ``generate`` does); on CUDA it then replays as one CUDA graph per input shape
        (sdcore.cuda_graphs). Each new input shape (size, CFG on/off) compiles again on its first call;
        the UNet's attributes stay reachable through the wrapper. A UNet replayed as CUDA graphs is
        compiled unwrapped, then captured again from the compiled code."""
        from torch._inductor import config as inductor_config
        inductor_config.freezing = True       # constant-folds the weights: measured 0.79x eager (CPU, bf16)
        unet = unwrapped(self.unet)
        compiled = torch.compile(unet)
        if self.device.type == "cuda":        # H200, 512² fp16: 14.0 ms per step compiled, 7.6 ms replayed
            compiled = CUDAGraphed(compiled, unet)
        self.unet = compiled
        return self

    def use_cuda_graphs(self):
        """On CUDA, replay the (eager) UNet and ControlNet as one CUDA graph per input shape
        (sdcore.cuda_graphs): the same kernels without the Python and launch overhead that dominate an
        eager step on a fast card. Elsewhere a no-op. ``load_model`` does this by default."""
        if self.device.type != "cuda":
            return self
        if not isinstance(self.unet, CUDAGraphed):
            self.unet = CUDAGraphed(self.unet, self.unet)
        if self.controlnet is not None and not isinstance(self.controlnet, CUDAGraphed):
            self.controlnet = CUDAGraphed(self.controlnet, self.controlnet)
        return self

    @torch.inference_mode()
    def encode_text(self, prompts: list[str], clip_skip: int = 1) -> torch.Tensor:
        """prompts -> conditioning [B, 77, context_dim]. ``clip_skip`` k uses the k-th block from the end."""
        tokens = self.tokenizer(prompts).to(self.device)
        return self.text_encoder(tokens, output_layer=self.text_encoder.cfg.output_layer - (clip_skip - 1))

    def __repr__(self):
        return f"StableDiffusion({self.name!r}, family={self.family}, prediction={self.prediction}, device={self.device}, dtype={self.dtype})"


def load_model(path: str, device="cpu", dtype=torch.float32, prediction: str | None = None,
               vae: str | None = None, name: str | None = None, control_net: str | None = None,
               cache_dir: str | None = None, cuda_graphs: bool = True) -> StableDiffusion:
    """Load a single-file LDM checkpoint (.safetensors/.ckpt) or a diffusers folder.

    ``prediction``: "eps" or "v" to override; else the file's metadata, the diffusers scheduler
    config, or (SD2 only) the one-forward-pass heuristic decide. ``vae``: a separate VAE file/folder.
    ``control_net``: a ControlNet file/folder, loaded on the same device/dtype and checked against the model.
    ``cache_dir``: where to keep weights converted to ``dtype`` on the CPU (``sdcore.weights_cache``):
    later loads memory-map them, and processes loading the same model share their memory. None: convert
    in memory on every load. ``cuda_graphs``: on CUDA, replay the UNet and ControlNet as CUDA
    graphs (``StableDiffusion.use_cuda_graphs``).
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise CheckpointError(f"no such file or folder: {path} (give a .safetensors/.ckpt checkpoint or a diffusers folder)")
    if prediction not in (None, "eps", "v"):
        raise CheckpointError(f"prediction must be 'eps' or 'v', not {prediction!r}")
    parts = _diffusers_parts(path) if os.path.isdir(path) else _single_file_parts(path)
    meta = parts["meta"]
    family = meta.get("family", parts["family"])
    unet_cfg = _apply_overrides(parts["unet_cfg"] or infer_unet_config(parts["unet"]), meta.get("unet"))
    vae_t, vae_cfg, vae_from = parts["vae"], parts["vae_cfg"], path
    if vae:
        vae_t, vae_cfg, vae_from = _vae_parts(vae)     # its configuration is its own, not the checkpoint's
    else:
        vae_cfg = _apply_overrides(vae_cfg or infer_vae_config(vae_t), meta.get("vae"))
    text_cfg = _apply_overrides(parts["text_cfg"] or infer_text_config(parts["text"], family), meta.get("text"))

    if (torch.device(device).type == "cpu" and dtype == torch.bfloat16
            and not unet_cfg.head_dims().isdisjoint(cpu_attention.HEAD_DIMS)):
        cpu_attention.prepare()                     # SD1.5's level-0 attention kernel (built once, cached)
    unet = build(UNet, unet_cfg, parts["unet"], device, dtype, "UNet", path, cache_dir)
    vae_model = build(AutoencoderKL, vae_cfg, vae_t, device, dtype, "VAE", vae_from, cache_dir)
    text = build(TextEncoder, text_cfg, parts["text"], device, dtype, "text encoder", path, cache_dir)
    prediction = prediction or meta.get("prediction") or parts["prediction"]
    if prediction is None:
        prediction = detect_v_prediction(unet) if family == "sd2" else "eps"
    native = meta.get("native_size") or (768 if family == "sd2" and prediction == "v" else 512)
    default_name = os.path.splitext(os.path.basename(os.path.normpath(path)))[0]
    model = StableDiffusion(family=family, prediction=prediction, unet=unet, vae=vae_model, text_encoder=text,
                            name=name or default_name, native_size=native, device=device, dtype=dtype, source=path)
    if control_net:
        from .controlnet import attach_controlnet, load_controlnet     # lazily: controlnet.py imports this module
        attach_controlnet(model, load_controlnet(control_net, device, dtype, cache_dir))
    return model.use_cuda_graphs() if cuda_graphs else model


@torch.inference_mode()
def detect_v_prediction(unet: UNet) -> str:
    """The AUTOMATIC1111 / stable-diffusion.cpp test: an eps model's output on a constant 0.5 latent
    at t=999 is near the input; a v model's is strongly negative relative to it."""
    p = next(unet.parameters())
    x = torch.full((1, unet.cfg.in_channels, 8, 8), 0.5, device=p.device, dtype=p.dtype)
    ctx = torch.full((1, 77, unet.cfg.context_dim), 0.5, device=p.device, dtype=p.dtype)
    out = unet(x, torch.tensor([999.0], device=p.device), ctx)
    return "v" if (out - x).float().mean().item() < -1 else "eps"


# ------------------------------------------------------------------------------------------------
def _metadata(tf: TensorFile) -> dict:
    raw = tf.metadata.get(METADATA_KEY)
    meta = {}
    if raw:
        try:
            meta = json.loads(raw)
        except ValueError:
            raise CheckpointError(f"{tf.path}: its {METADATA_KEY} metadata is not valid JSON") from None
    pt = (tf.metadata.get("modelspec.prediction_type") or tf.metadata.get("prediction_type") or "").lower()
    if "prediction" not in meta and pt:
        meta["prediction"] = "v" if pt.startswith("v") else "eps"
    return meta


def _single_file_parts(path):
    tf = TensorFile(path)
    keys = set(tf.keys())
    has = lambda prefix: any(k.startswith(prefix) for k in keys)
    if has("conditioner.embedders.1.") or has("conditioner.embedders.0.model."):
        raise CheckpointError(f"{path} is an SDXL checkpoint; SDXL is not supported yet (supported: SD1.x, SD2.x)")
    if has("model.diffusion_model.double_blocks.") or has("double_blocks.") or has("model.diffusion_model.joint_blocks."):
        raise CheckpointError(f"{path} is a Flux/SD3 checkpoint; only SD1.x and SD2.x are supported")
    if has("control_model.") or has("input_hint_block.") or has("controlnet_cond_embedding."):
        raise CheckpointError(f"{path} is a ControlNet, not a base model: pass it with --control-net")
    if not has("model.diffusion_model.input_blocks."):
        if has("encoder.down.") or has("first_stage_model.") or has("encoder.down_blocks."):
            raise CheckpointError(f"{path} holds only a VAE: pass it with --vae next to a full checkpoint")
        raise CheckpointError(f"{path} is not a Stable Diffusion checkpoint (no model.diffusion_model.* UNet tensors)")
    t = from_file(tf)
    unet = t.sub("model.diffusion_model.")
    if has("model_ema.diffusion_model"):      # full (non-"emaonly") files: prefer the EMA weights
        for k in list(unet.keys()):
            ema = "model_ema.diffusion_model" + k.replace(".", "")
            if ema in t:
                unet.entries[k] = t.entries[ema]
    if has("cond_stage_model.model."):
        family, text = "sd2", t.sub("cond_stage_model.model.")
    else:
        family = "sd1"
        prefix = "cond_stage_model.transformer.text_model." if has("cond_stage_model.transformer.text_model.") \
            else "cond_stage_model.transformer."
        text = hf_text_to_ours(t.sub(prefix))
    return dict(family=family, unet=unet, vae=t.sub("first_stage_model."), text=text, meta=_metadata(tf),
                unet_cfg=None, vae_cfg=None, text_cfg=None, prediction=None)


def _weights_in(folder, stem):
    """The tensors of one diffusers component (``stem``: diffusion_pytorch_model or model)."""
    for name in (f"{stem}.safetensors", f"{stem}.fp16.safetensors", f"{stem}.bin", f"{stem}.fp16.bin"):
        if os.path.exists(os.path.join(folder, name)):
            return from_file(TensorFile(os.path.join(folder, name)))
    index = sorted(glob.glob(os.path.join(folder, f"{stem}*.index.json")))
    if index:
        merged = Tensors()
        shards = sorted(set(json.load(open(index[0]))["weight_map"].values()))
        for shard in shards:
            merged.entries.update(from_file(TensorFile(os.path.join(folder, shard))).entries)
        return merged
    raise CheckpointError(f"{folder} has no {stem}.safetensors (or .fp16/.bin/sharded variant)")


def _json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing: the diffusers folder is incomplete") from None


def _diffusers_parts(path):
    if not os.path.exists(os.path.join(path, "model_index.json")):
        if os.path.exists(os.path.join(path, "config.json")) and os.path.exists(os.path.join(path, "diffusion_pytorch_model.safetensors")):
            raise CheckpointError(f"{path} is a single diffusers component, not a pipeline folder (no model_index.json)")
        raise CheckpointError(f"{path} is a folder but not a diffusers pipeline (no model_index.json)")
    index = _json(os.path.join(path, "model_index.json"))
    if "text_encoder_2" in index:
        raise CheckpointError(f"{path} is an SDXL pipeline; SDXL is not supported yet (supported: SD1.x, SD2.x)")
    uc = _json(os.path.join(path, "unet", "config.json"))
    unet_cfg = unet_config_from_diffusers(uc)
    tc = _json(os.path.join(path, "text_encoder", "config.json"))
    # OpenAI's CLIP-L (SD1) uses quick_gelu; the OpenCLIP towers of SD2 use exact gelu
    family = "sd1" if tc.get("hidden_act", "quick_gelu") == "quick_gelu" else "sd2"
    unet = renamed(_weights_in(os.path.join(path, "unet"), "diffusion_pytorch_model"),
                   layouts.unet_name_map(meta_keys(UNet, unet_cfg), unet_cfg))
    vae, vae_cfg, _ = _vae_parts(os.path.join(path, "vae"))
    hf = _weights_in(os.path.join(path, "text_encoder"), "model")
    if any(k.startswith("text_model.") for k in hf.keys()):
        hf = hf.sub("text_model.")
    pad = EOS if family == "sd1" else 0
    special = os.path.join(path, "tokenizer", "special_tokens_map.json")
    if os.path.exists(special):
        tok = json.load(open(special)).get("pad_token")
        tok = tok.get("content") if isinstance(tok, dict) else tok
        pad = EOS if tok == "<|endoftext|>" else 0
    text_cfg = TextConfig(vocab_size=tc.get("vocab_size", 49408), context_length=tc.get("max_position_embeddings", 77),
                          width=tc["hidden_size"], layers=tc["num_hidden_layers"], heads=tc["num_attention_heads"],
                          act=tc.get("hidden_act", "quick_gelu"), output_layer=-1, pad_id=pad)
    sched = os.path.join(path, "scheduler", "scheduler_config.json")
    pt = json.load(open(sched)).get("prediction_type") if os.path.exists(sched) else None
    return dict(family=family, unet=unet, vae=vae, text=hf_text_to_ours(hf), meta={}, unet_cfg=unet_cfg,
                vae_cfg=vae_cfg, text_cfg=text_cfg, prediction={"v_prediction": "v", "epsilon": "eps"}.get(pt))


def unet_config_from_diffusers(c: dict) -> UNetConfig:
    chans = c["block_out_channels"]
    mc = chans[0]
    attn = tuple(i for i, t in enumerate(c["down_block_types"]) if "CrossAttn" in t)
    heads = c.get("num_attention_heads") or c.get("attention_head_dim", 8)   # diffusers' misnomer: SD1 "head_dim" 8 = 8 heads
    heads = heads if isinstance(heads, list) else [heads] * len(chans)
    depth = c.get("transformer_layers_per_block", 1)
    depth = depth if isinstance(depth, list) else [depth] * len(chans)
    same_heads = len(set(heads)) == 1
    return UNetConfig(in_channels=c.get("in_channels", 4), out_channels=c.get("out_channels", 4), model_channels=mc,
                      channel_mult=tuple(ch // mc for ch in chans), num_res_blocks=c.get("layers_per_block", 2),
                      attention_levels=attn, transformer_depth=tuple(d if i in attn else 0 for i, d in enumerate(depth)),
                      transformer_depth_middle=depth[-1],
                      num_heads=heads[0] if same_heads else None, head_dim=None if same_heads else chans[0] // heads[0],
                      context_dim=c.get("cross_attention_dim", 768), use_linear_proj=bool(c.get("use_linear_projection")),
                      adm_in_channels=c.get("projection_class_embeddings_input_dim"))


def _vae_parts(path):
    """A VAE alone: a diffusers ``vae/`` folder, or a file in LDM (bare or first_stage_model.) or diffusers naming."""
    if os.path.isdir(path):
        c = _json(os.path.join(path, "config.json"))
        chans = c["block_out_channels"]
        cfg = VAEConfig(ch=chans[0], ch_mult=tuple(x // chans[0] for x in chans), num_res_blocks=c.get("layers_per_block", 1),
                        z_channels=c.get("latent_channels", 4), in_channels=c.get("in_channels", 3),
                        scale_factor=c.get("scaling_factor", 0.18215), norm_groups=c.get("norm_num_groups", 32))
        return renamed(_weights_in(path, "diffusion_pytorch_model"), layouts.vae_name_map(meta_keys(AutoencoderKL, cfg),
                       len(chans)), reshape=layouts.vae_is_linear_attn), cfg, path
    if not os.path.exists(path):
        raise CheckpointError(f"no such VAE file: {path}")
    tf = TensorFile(path)
    t = from_file(tf)
    if any(k.startswith("first_stage_model.") for k in t.keys()):
        t = t.sub("first_stage_model.")
    if "encoder.down_blocks.0.resnets.0.conv1.weight" in t:      # diffusers naming in a single file
        n = len({k.split(".")[2] for k in t.keys() if k.startswith("encoder.down_blocks.")})
        ch = t.shape("encoder.conv_in.weight")[0]
        cfg = VAEConfig(ch=ch, ch_mult=tuple(t.shape(f"encoder.down_blocks.{i}.resnets.0.conv1.weight")[0] // ch for i in range(n)),
                        num_res_blocks=len({k.split(".")[4] for k in t.keys() if k.startswith("encoder.down_blocks.0.resnets.")}),
                        z_channels=t.shape("post_quant_conv.weight")[0])
        cfg = _apply_overrides(cfg, _metadata(tf).get("vae"))     # what shapes cannot tell (groups, scale)
        return renamed(t, layouts.vae_name_map(meta_keys(AutoencoderKL, cfg), n), reshape=layouts.vae_is_linear_attn), cfg, path
    if "encoder.conv_in.weight" not in t:
        raise CheckpointError(f"{path} is not a VAE (no encoder.conv_in.weight)")
    return t, _apply_overrides(infer_vae_config(t), _metadata(tf).get("vae")), path
