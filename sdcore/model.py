"""``StableDiffusion``, a checkpoint's networks ready to generate, and ``load_model``, its one entry point for
every checkpoint layout (the layouts themselves: sdcore.formats)."""
import logging
import os

import torch
import torch.nn.functional as F

from . import cpu_attention, tiling
from . import prompts as prompt_language
from .clip import TextEncoder
from .controlnet import attach_controlnet, load_controlnet
from .cuda_graphs import CUDAGraphed, unwrapped
from .device import resolve_device, resolve_dtype
from .formats import CheckpointError, read_model
from .formats.build import build
from .flux import Flux, LatentFlux
from .formats.infer import FLUX, POOLED_FAMILIES, REFINER, SD3, detect_v_prediction
from .mmdit import MMDiT
from .t5 import T5Encoder
from .t5_tokenizer import T5Tokenizer
from .tokenizer import BOS, EOS, Tokenizer
from .unet import UNet, timestep_embedding
from .vae import AutoencoderKL

log = logging.getLogger("sdcore.model")
# The SDXL refiner's aesthetic scores for the prompt and for the negative prompt: it was trained to draw
# what raters scored so, and the defaults of its authors' code, diffusers and AUTOMATIC1111 ask for a good
# image against a poor one.
AESTHETIC_SCORES = (6.0, 2.5)
# What a request that leaves them out gets on a family's models, where that differs from GenerationParams' defaults
# (SD1's): SD3 and SD3.5 are drawn with Euler in 28 steps (their authors' and diffusers' defaults; guidance 7 for SD3
# medium, 4.5 for 3.5), and the distilled turbo models in 4 steps without guidance.
SD3_REQUEST_DEFAULTS = {"sample_method": "euler", "steps": 28, "cfg_scale": 7.0}
SD35_REQUEST_DEFAULTS = {**SD3_REQUEST_DEFAULTS, "cfg_scale": 4.5}
TURBO_REQUEST_DEFAULTS = {"steps": 4, "cfg_scale": 0.0}
# FLUX is distilled to be run without classifier-free guidance (one pass; cfg_scale 1): dev takes the guidance it
# was distilled from as an input instead (FLUX_GUIDANCE, the reference's default) and is drawn in 20 steps or more,
# schnell (no guidance input) in 4.
FLUX_DEV_REQUEST_DEFAULTS = {"sample_method": "euler", "steps": 20, "cfg_scale": 1.0}
FLUX_SCHNELL_REQUEST_DEFAULTS = {**FLUX_DEV_REQUEST_DEFAULTS, "steps": 4}
FLUX_GUIDANCE = 3.5
# How GGUF-quantized and float8 weights are held: "dequantize" at load to the compute dtype, or "keep" them as stored
# for the linear layers of the big networks (the denoising transformer or UNet, T5), expanded per call (sdcore.quant)
QUANTIZED_WEIGHTS = ("dequantize", "keep")
# The T5 tokens SD3 and FLUX schnell are conditioned on, and FLUX dev: diffusers' pipelines' max_sequence_length
T5_TOKENS = 256
FLUX_DEV_T5_TOKENS = 512


class StableDiffusion:
    """The networks of one checkpoint (denoiser, VAE, one text encoder; SDXL: two; SD3: three) plus what is needed
    to drive them. ``unet`` is the denoising network: a UNet, or for SD3 an MMDiT (sdcore.mmdit)."""

    def __init__(self, *, family, prediction, unet, vae, text_encoder, name, native_size, device, dtype, source,
                 text_encoder_2=None, text_encoder_3=None, tokenizer_3=None):
        self.family, self.prediction, self.name, self.source = family, prediction, name, source
        self.unet, self.vae, self.text_encoder, self.text_encoder_2 = unet, vae, text_encoder, text_encoder_2
        self.tokenizer = Tokenizer(pad_id=text_encoder.cfg.pad_id)
        self.tokenizer_2 = Tokenizer(pad_id=text_encoder_2.cfg.pad_id) if text_encoder_2 is not None else None
        # SD3's and FLUX's T5-XXL (SD3 without it: its tokens are zeros, as SD3 was trained to allow), its tokenizer
        # (sdcore.t5_tokenizer), and how many tokens it reads
        self.text_encoder_3, self.tokenizer_3, self.t5_tokens = text_encoder_3, tokenizer_3, T5_TOKENS
        self.native_size, self.device, self.dtype = native_size, torch.device(device), dtype
        self.vae_tiling = "auto"          # sdcore.tiling.MODES: VAE passes in tiles when they would not fit
        self.controlnet = None            # a sdcore.controlnet.ControlNet, set by attach_controlnet
        self.embeddings = None            # a sdcore.embeddings.EmbeddingDir whose names prompts may use
        self.taesd = None                 # a sdcore.taesd.TinyDecoder: previews (sdcore.previews)
        self.taesd_decode = False         # ... and final images, instead of the VAE
        self.compiled = False             # the UNet runs as torch.compile'd code (``compile``)
        self.flow_shift = 3.0             # rectified flow (SD3): the schedule's shift (samplers.flow_sigmas)
        self.request_defaults = {}        # GenerationParams fields a request leaves out get these (api.params)
        # the adapters merged into the weights (sdcore.lora): their set's key, files, the changed weights' originals
        self.lora_key, self.lora_files, self.lora_originals = (), [], {}

    @property
    def inpainting(self) -> bool:
        return self.family not in (SD3, FLUX) and self.unet.cfg.in_channels == 9

    def compile(self):
        """Opt-in ``torch.compile`` of the UNet (inductor, weights frozen into the graph: inference only,
        which is all ``generate`` does); on CUDA it then replays as one CUDA graph per input shape
        (sdcore.cuda_graphs). Each new input shape (size, CFG on/off) compiles again on its first call;
        the UNet's attributes stay reachable through the wrapper. A UNet replayed as CUDA graphs is
        compiled unwrapped, then captured again from the compiled code."""
        from torch._inductor import config as inductor_config
        inductor_config.freezing = True       # constant-folds the weights: faster steps on the CPU
        unet = unwrapped(self.unet)
        compiled = torch.compile(unet)
        if self.device.type == "cuda":        # launches, not arithmetic, bound a compiled step there
            compiled = CUDAGraphed(compiled, unet)
        self.unet, self.compiled = compiled, True
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

    @property
    def encoders(self) -> list:
        """(text encoder, its tokenizer) pairs, in the order their outputs are concatenated."""
        pairs = [(self.text_encoder, self.tokenizer), (self.text_encoder_2, self.tokenizer_2)]
        return [(e, t) for e, t in pairs if e is not None]

    @torch.inference_mode()
    def encode_text(self, prompts: list[str], clip_skip: int = 1):
        """prompts (in A1111's prompt language: sdcore.prompts) -> hidden states [B, 77·k, context_dim], k the
        most 75-token chunks any prompt needs (the others padded with empty chunks); SDXL: (the encoders'
        hidden states concatenated, [B, 77·k, 768 + 1280] for the base, [B, 77·k, 1280] for the refiner; the
        last encoder's (bigG's) pooled output of each prompt's first chunk [B, 1280]); SD3: the same, with
        both CLIPs' pooled outputs side by side [B, 768 + 1280]. ``clip_skip`` k takes each encoder's output
        k - 1 blocks before its own."""
        wants_pooled = self.family in POOLED_FAMILIES
        parsed = [prompt_language.parse(p) for p in prompts]
        hidden, pooled = [], []
        pooling = range(len(self.encoders)) if self.family == SD3 else [len(self.encoders) - 1]
        for i, (encoder, tokenizer) in enumerate(self.encoders):
            extra = []                                  # embeddings' vectors, addressed by ids from vocab_size on
            encode = token_encoder(getattr(self, "embeddings", None), tokenizer, encoder.cfg, extra)
            per_prompt = [prompt_language.chunks(p, encode, tokenizer.comma) for p in parsed]
            count = max(map(len, per_prompt))
            rows = [prompt_language.token_rows(c, BOS, EOS, tokenizer.pad_id, count) for c in per_prompt]
            ids, weights = torch.cat([r[0] for r in rows]), torch.cat([r[1] for r in rows])     # [B·k, 77]
            where = _device(encoder)
            out = encoder(ids.to(where), output_layer=encoder.cfg.output_layer - (clip_skip - 1),
                          pooled=wants_pooled and i in pooling, extra=torch.cat(extra).to(where) if extra else None)
            out = tuple(o.to(self.device, self.dtype) for o in out) if isinstance(out, tuple) \
                else out.to(self.device, self.dtype)                    # from the text_device (clip_on_cpu)
            h = prompt_language.apply_weights(out[0] if isinstance(out, tuple) else out, weights)
            hidden.append(h.reshape(len(prompts), -1, h.shape[-1]))
            if isinstance(out, tuple):
                pooled.append(out[1].reshape(len(prompts), count, -1)[:, 0])
        context = torch.cat(hidden, dim=-1)
        return (context, torch.cat(pooled, dim=-1)) if wants_pooled else context

    @torch.inference_mode()
    def encode_t5(self, prompts: list[str]) -> torch.Tensor:
        """T5's tokens [B, t5_tokens, 4096] of the prompts' text (the prompt language's brackets and weights
        taken out: T5 reads the words), cut at t5_tokens with its end token; zeros without a T5 encoder."""
        width, length = self.unet.cfg.context_dim, self.t5_tokens
        if self.text_encoder_3 is None:
            return torch.zeros(len(prompts), length, width, device=self.device, dtype=self.dtype)
        # trailing whitespace dropped, as T5's SentencePiece does (the tokenizer.json conversion would add a "▁")
        texts = [prompt_language.plain(prompt_language.parse(p)).rstrip() for p in prompts]
        for text in texts:
            if (n := self.tokenizer_3.count(text)) > length:
                log.warning("T5 reads the first %d of a prompt's %d tokens", length - 1, n - 1)
        ids, _ = self.tokenizer_3.encode(texts, length)
        out = self.text_encoder_3(ids.to(_device(self.text_encoder_3)))   # no mask: SD3's T5 attends to its padding too
        return out.to(self.device, self.dtype)

    @torch.inference_mode()
    def conditioning(self, prompts: list[str], width: int, height: int, clip_skip: int = 1,
                     negative: list[bool] | None = None, original_size: tuple[int, int] | None = None,
                     target_size: tuple[int, int] | None = None, crop: tuple[int, int] = (0, 0),
                     aesthetic_scores: tuple[float, float] = AESTHETIC_SCORES, guidance: float | None = None):
        """What the UNet is conditioned on, one row per prompt: the hidden states [B, 77, C]; SDXL:
        {"context": hidden states, "y": the pooled output and the micro-conditioning [B, adm_in_channels]}.
        SDXL base's micro-conditioning embeds (original height, width, crop top, left, target height, width)
        as timesteps of 256 channels each; by default the image was drawn whole at the size asked, uncropped
        (sizes are (width, height), None: width x height; ``crop``: (top, left)). The refiner's embeds
        (original height, width, crop top, left, aesthetic score), the score being ``aesthetic_scores[1]``
        for the rows ``negative`` marks as negative prompts and ``aesthetic_scores[0]`` elsewhere.
        SD3: {"context": the CLIPs' hidden states [B, 77·k, 2048] zero-padded to T5's width, then T5's
        tokens along the sequence [B, 77·k + 256, 4096]; "y": the pooled outputs [B, 2048]}.
        FLUX: {"context": T5's tokens [B, 512 (dev) or 256, 4096]; "y": CLIP-L's pooled output [B, 768]; dev:
        "guidance": ``guidance`` (None: FLUX_GUIDANCE) per row [B]}."""
        if self.family not in POOLED_FAMILIES:
            return self.encode_text(prompts, clip_skip)
        context, pooled = self.encode_text(prompts, clip_skip)
        if self.family == FLUX:
            cond = {"context": self.encode_t5(prompts).to(pooled.dtype), "y": pooled}
            if self.unet.cfg.guidance_embed:
                cond["guidance"] = torch.full((len(prompts),), FLUX_GUIDANCE if guidance is None else guidance,
                                              device=self.device, dtype=torch.float32)
            return cond
        if self.family == SD3:
            clip = F.pad(context, (0, self.unet.cfg.context_dim - context.shape[-1]))
            return {"context": torch.cat([clip, self.encode_t5(prompts).to(clip.dtype)], dim=1), "y": pooled}
        negative = negative or [False] * len(prompts)
        (ow, oh), (tw, th), (top, left) = original_size or (width, height), target_size or (width, height), crop
        if self.family == REFINER:
            ids = [[oh, ow, top, left, aesthetic_scores[neg]] for neg in negative]
        else:
            ids = [[oh, ow, top, left, th, tw]] * len(prompts)
        ids = torch.tensor(ids, dtype=torch.float32, device=self.device)
        dim = (self.unet.cfg.adm_in_channels - pooled.shape[-1]) // ids.shape[1]
        sizes = timestep_embedding(ids.flatten(), dim).reshape(len(prompts), -1)
        return {"context": context, "y": torch.cat([pooled, sizes.to(pooled.dtype)], dim=-1)}

    def __repr__(self):
        return (f"StableDiffusion({self.name!r}, family={self.family}, prediction={self.prediction}, "
                f"device={self.device}, dtype={self.dtype})")


def _device(module) -> torch.device:
    return next(module.parameters()).device


def token_encoder(embeddings, tokenizer, cfg, extra: list):
    """text -> token ids, each textual-inversion embedding the text names (``embeddings``, an EmbeddingDir or
    None) as a tuple of new ids from ``cfg.vocab_size`` on, its vectors appended to ``extra``."""
    if embeddings is None:
        return tokenizer.encode

    def encode(text):
        out = []
        for part in embeddings.split(text):
            if isinstance(part, tuple):
                vectors = embeddings.vectors(part[0], cfg.width)
                start = cfg.vocab_size + sum(len(e) for e in extra)
                extra.append(vectors)
                out.append(tuple(range(start, start + len(vectors))))
            elif part:
                out += tokenizer.encode(part)
        return out
    return encode


def attach_taesd(model: StableDiffusion, path: str, decode: bool = False) -> StableDiffusion:
    """Give the model a TAESD decoder (sdcore.taesd) for previews, and with ``decode`` for final images. Its
    latent channels must be the model's; that it was distilled from this family's VAE (TAESD for SD1/SD2,
    TAESDXL for SDXL: the same shapes) the weights cannot tell: a wrong one gives wrong colours, no error."""
    from .formats.taesd import load_taesd
    decoder = load_taesd(path, model.device, model.dtype)
    if decoder.latent_channels != model.unet.cfg.out_channels:
        raise CheckpointError(f"{path} decodes {decoder.latent_channels}-channel latents; {model.name!r} has "
                              f"{model.unet.cfg.out_channels}")
    model.taesd, model.taesd_decode = decoder.eval().requires_grad_(False), decode
    return model


def load_model(path: str, device="auto", dtype="auto", prediction: str | None = None,
               vae: str | None = None, name: str | None = None, control_net: str | None = None,
               cache_dir: str | None = None, cuda_graphs: bool = True, native_size: int | None = None,
               vae_tiling: str = "auto", taesd: str | None = None, taesd_decode: bool = False,
               clip_l: str | None = None, clip_g: str | None = None, t5xxl: str | None = None,
               quantized_weights: str = "dequantize", text_device: str | None = None) -> StableDiffusion:
    """Load a single-file checkpoint (.safetensors/.ckpt/.gguf) or a diffusers folder: SD1.x, SD2.x, SDXL, SD3/3.5.

    ``device``, ``dtype``: "auto" (the server's default, sdcore.device: CUDA when there is a card;
    bfloat16 where the hardware computes it natively, float16 on older CUDA cards, else float32), a
    device, and a torch dtype or its name. ``prediction``: "eps" or "v" to override; else the file's
    metadata, the diffusers scheduler config, or (SD2 only) the one-forward-pass heuristic decide.
    ``vae``: a separate VAE file/folder. ``control_net``: a ControlNet file/folder, loaded on the same
    device/dtype and checked against the model. ``cache_dir``: where to keep weights converted to
    ``dtype`` on the CPU (``sdcore.weights_cache``): later loads memory-map them, and processes loading
    the same model share their memory. None: convert in memory on every load. ``cuda_graphs``: on
    CUDA, replay the UNet and ControlNet as CUDA graphs (``StableDiffusion.use_cuda_graphs``).
    ``native_size``: the default side, overriding the file's. ``vae_tiling``: one of sdcore.tiling.MODES.
    ``taesd``: a TAESD decoder file/folder for previews (sdcore.previews); ``taesd_decode``: for final images too.
    ``clip_l``, ``clip_g``, ``t5xxl``: SD3's and FLUX's text encoders in files of their own (sdcore.formats.read_model).
    ``quantized_weights``: one of QUANTIZED_WEIGHTS. ``text_device``: where the text encoders run, when not on
    ``device`` (stable-diffusion.cpp's --clip-on-cpu: "cpu" keeps T5-XXL and the CLIPs off a card's memory; they
    run once per request), in that device's own "auto" dtype; their outputs are moved to ``device`` and ``dtype``.
    """
    path = os.fspath(path)
    if prediction not in (None, "eps", "v"):
        raise CheckpointError(f"prediction must be 'eps' or 'v', not {prediction!r}")
    if quantized_weights not in QUANTIZED_WEIGHTS:
        raise CheckpointError(f"quantized_weights must be one of {', '.join(QUANTIZED_WEIGHTS)}, not {quantized_weights!r}")
    if vae_tiling not in tiling.MODES:
        raise CheckpointError(f"vae_tiling must be one of {', '.join(tiling.MODES)}, not {vae_tiling!r}")
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    separate = {k: os.fspath(v) if v else None for k, v in (("vae", vae), ("clip_l", clip_l), ("clip_g", clip_g),
                                                            ("t5xxl", t5xxl))}
    parts = read_model(path, **separate)
    family = parts.family
    if parts.prediction == "flow" and prediction is not None:
        raise CheckpointError(f"prediction applies to SD1/SD2/SDXL models; {family} predicts the flow velocity")
    if (family not in (SD3, FLUX) and torch.device(device).type == "cpu" and dtype == torch.bfloat16
            and not parts.unet.cfg.head_dims().isdisjoint(cpu_attention.HEAD_DIMS)):
        cpu_attention.prepare()                     # SD1.5's level-0 attention kernel (built once, cached)

    def built(module_cls, part, what, big=False, text=False):
        where, kind = (resolve_device(text_device), resolve_dtype("auto", text_device)) if text and text_device \
            else (device, dtype)
        return build(module_cls, part.cfg, part.tensors, where, kind, what, part.source, cache_dir,
                     keep_quantized=big and quantized_weights == "keep")
    if family == FLUX:
        unet = LatentFlux(built(Flux, parts.unet, "FLUX transformer", big=True))
    else:
        unet = built(MMDiT, parts.unet, "MMDiT", big=True) if family == SD3 else built(UNet, parts.unet, "UNet", big=True)
    vae_model = built(AutoencoderKL, parts.vae, "VAE")
    text = built(TextEncoder, parts.text, "text encoder", text=True)
    text_2 = built(TextEncoder, parts.text_2, "second text encoder", text=True) if parts.text_2 is not None else None
    text_3 = built(T5Encoder, parts.text_3, "T5 encoder", big=True, text=True) if parts.text_3 is not None else None
    if family == SD3 and text_3 is None:
        log.warning("%s has no T5-XXL encoder (give one with --t5xxl): it runs on its CLIPs alone, T5's tokens zeros, "
                    "which follows long prompts less closely", path)
    prediction = prediction or parts.prediction
    if prediction is None:
        prediction = detect_v_prediction(unet) if family == "sd2" else "eps"
    native = native_size or parts.native_size or (768 if family == "sd2" and prediction == "v" else 512)
    default_name = os.path.splitext(os.path.basename(os.path.normpath(path)))[0]
    model = StableDiffusion(family=family, prediction=prediction, unet=unet, vae=vae_model, text_encoder=text,
                            name=name or default_name, native_size=native, device=device, dtype=dtype, source=path,
                            text_encoder_2=text_2, text_encoder_3=text_3,
                            tokenizer_3=T5Tokenizer(parts.tokenizer_3) if parts.text_3 or family == SD3 else None)
    model.vae_tiling = vae_tiling
    model.flow_shift = parts.flow_shift or model.flow_shift
    if family == SD3:
        model.request_defaults = dict(SD35_REQUEST_DEFAULTS if unet.cfg.qk_norm else SD3_REQUEST_DEFAULTS)
        if "turbo" in os.path.basename(os.path.normpath(path)).lower():     # sd3.5_large_turbo.safetensors
            model.request_defaults.update(TURBO_REQUEST_DEFAULTS)
    if family == FLUX:
        dev = unet.cfg.guidance_embed
        model.request_defaults = dict(FLUX_DEV_REQUEST_DEFAULTS if dev else FLUX_SCHNELL_REQUEST_DEFAULTS)
        model.t5_tokens = FLUX_DEV_T5_TOKENS if dev else T5_TOKENS
    if taesd:
        attach_taesd(model, taesd, taesd_decode)
    elif taesd_decode:
        raise CheckpointError("taesd_decode needs a TAESD decoder (taesd)")
    if control_net and family in (SD3, FLUX):
        raise CheckpointError(f"{path} is an {family} model: ControlNets for it are not supported (only for SD1/SD2/SDXL)")
    if control_net and family != REFINER:      # a refiner finishes the image after the ControlNet's part
        attach_controlnet(model, load_controlnet(control_net, device, dtype, cache_dir))
    return model.use_cuda_graphs() if cuda_graphs else model
