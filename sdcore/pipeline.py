"""txt2img / img2img / inpainting on a loaded ``StableDiffusion``: what the HTTP views call.

Reproducibility contract: image i of a request uses seed + i; *all* its noise (the initial latent,
then every ancestral draw, in order) comes from one CPU ``torch.Generator`` seeded with that value
and is moved to the model's device, so a seed gives the same image on CPU and GPU and in a plain
script (see README, "Reproducing an image"). Sampler arithmetic stays in float32 whatever the
network dtype; only the network calls change precision.
"""
import io
import logging
import secrets
import time
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from PIL import Image, PngImagePlugin

import samplers

from . import taesd, tiling
from .canny import canny
from .device import release_freed_memory
from .formats.infer import FLUX, REFINER, SD3
from .formats import CheckpointError
from .infotext import infotext, parse_infotext  # noqa: F401  (parse_infotext: the replay API)
from .lora import LoraError, apply_loras
from .model import AESTHETIC_SCORES, FLUX_GUIDANCE

log = logging.getLogger("sdcore.pipeline")
SEED_MOD = 2 ** 64                     # torch.Generator seeds are unsigned 64-bit
# Random seeds are drawn below 2**32, as AUTOMATIC1111 draws them: JavaScript clients read JSON numbers as
# doubles, exact only below 2**53, and a seed must survive the trip to be replayed.
RANDOM_SEEDS = 2 ** 32
# What the area to repaint starts from (AUTOMATIC1111's "masked content", in its order): the surroundings'
# colours, the original image, unit noise, or nothing (a zero latent)
INPAINT_FILLS = ("fill", "original", "latent_noise", "latent_nothing")
# Rectified-flow models (SD3) have one schedule of their own, the shifted flow ramp (samplers.flow_sigmas),
# reported under the name of the evenly spaced one
FLOW_SCHEDULER = "discrete"


class PipelineError(ValueError):
    """A request this model cannot serve; ``field`` names the offending ``GenerationParams`` field."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.message, self.field = message, field


@dataclass
class GenerationParams:
    prompt: str
    negative_prompt: str = ""
    n: int = 1
    width: int = 512
    height: int = 512
    steps: int = 20
    cfg_scale: float = 7.0
    sample_method: str = "euler_a"
    scheduler: str | None = None          # None: samplers.default_scheduler(sample_method)
    seed: int = 42                        # negative: a random one (reported back per image)
    strength: float = 0.75                # img2img only
    control_strength: float = 0.9
    init_image: Image.Image | None = field(default=None, repr=False)
    mask: Image.Image | None = field(default=None, repr=False)      # transparent (alpha 0) = repaint
    control_image: Image.Image | None = field(default=None, repr=False)
    apply_canny_preprocessor: bool = False   # control_image is a photo: use its edges (sdcore.canny)
    clip_skip: int = 1
    inpaint_fill: str = "original"          # one of INPAINT_FILLS; applies where a mask repaints
    # A second model (an SDXL refiner) that takes the last steps, from the fraction refiner_switch_at of
    # them on: the "ensemble of experts" split of SDXL's paper
    refiner: object | None = field(default=None, repr=False)
    refiner_switch_at: float = 0.8          # A1111's default
    # FLUX dev's distilled guidance, an input of the network (None: sdcore.model.FLUX_GUIDANCE); other models take none
    guidance: float | None = None
    # SDXL's micro-conditioning (other models ignore it): the size the picture "had" before it was cropped
    # at (crop_top, crop_left) and resized to target_size, all (width, height), None: the image's size;
    # the refiner's aesthetic scores for the prompt and the negative prompt
    original_size: tuple[int, int] | None = None
    target_size: tuple[int, int] | None = None
    crop_top: int = 0
    crop_left: int = 0
    aesthetic_score: float = AESTHETIC_SCORES[0]
    negative_aesthetic_score: float = AESTHETIC_SCORES[1]
    # Skip-layer guidance (SD3 and SD3.5; stable-diffusion.cpp's names and defaults): with slg_scale > 0 and
    # classifier-free guidance on, the steps from skip_layer_start to skip_layer_end (fractions of the run) are
    # also guided away from the conditional output of the transformer with the joint blocks skip_layers left out
    # (samplers.make_denoiser). SD3.5 medium's model card uses scale 2.5 on these blocks.
    slg_scale: float = 0.0
    skip_layers: tuple[int, ...] = (7, 8, 9)
    skip_layer_start: float = 0.01
    skip_layer_end: float = 0.2
    # Adapters merged into the model for this request (sdcore.lora): (file, multiplier) pairs, e.g. those the
    # prompt's <lora:NAME:W> tags name (sdcore.lora.resolve_loras); the tags themselves are not encoded
    loras: list = field(default_factory=list)


@dataclass
class Step:
    """What ``generate`` tells its ``progress`` callback after every sampler step."""
    index: int                  # 0-based step of this image
    total: int                  # the steps this image takes (fewer than ``steps`` for img2img, strength < 1)
    seconds: float              # how long the step took
    image: int                  # which image of the request (0-based)
    images: int                 # how many the request asks for
    denoised: torch.Tensor = field(repr=False)     # the model's estimate of the finished latent [1, C, h, w]


class Interrupt(Exception):
    """Raised by a ``progress`` callback to stop sampling at once. The image being drawn is finished from the
    model's latest estimate of it (A1111's "interrupt" and "skip" return that too); ``skip``: the request's
    next images are drawn all the same, else none is."""

    def __init__(self, skip: bool = False):
        super().__init__("skip" if skip else "interrupt")
        self.skip = skip


@dataclass
class GeneratedImage:
    image: Image.Image
    seed: int
    png: bytes                            # with the "parameters" text chunk
    parameters: str = ""                  # that infotext

    def encoded(self, fmt: str = "png", quality: int = 100) -> bytes:
        """The image as PNG, JPEG or WebP, its infotext carried as PNG text or as EXIF UserComment."""
        return self.png if fmt == "png" else to_jpeg_or_webp(self.image, self.parameters, fmt, quality)


def generate(model, p: GenerationParams, progress=None) -> list[GeneratedImage]:
    """``progress(step: Step)`` is called after every sampler step; it may raise ``Interrupt``, after which
    fewer than ``p.n`` images may come back (at least one)."""
    _check(model, p)
    try:
        adapters = apply_loras(model, p.loras)
    except LoraError as e:
        raise PipelineError(str(e), "loras") from None
    scheduler = p.scheduler or _default_scheduler(model, p.sample_method)
    seed = p.seed if p.seed >= 0 else secrets.randbelow(RANDOM_SEEDS)
    embeddings = model.embeddings.used(p.prompt, p.negative_prompt) if model.embeddings else []
    with torch.inference_mode():
        try:
            conds = [_conditionings(m, p) for m in (model, p.refiner) if m is not None]
        except CheckpointError as e:        # an embedding the prompt names that this model cannot take
            raise PipelineError(str(e), "prompt") from None
        init = _prepare_init(model, p)
        guided_hint = _prepare_control(model, p)
        out = []
        for i in range(p.n):
            image_seed = (seed + i) % SEED_MOD
            report = _step_reporter(progress, i, p.n)
            image, stopped = _generate_one(model, p, scheduler, image_seed, conds, init, report, guided_hint)
            params = replace(p, seed=image_seed, scheduler=scheduler, n=1, guidance=_guidance(model, p))
            text = infotext(params, model.name, adapters, embeddings)
            out.append(GeneratedImage(image, image_seed, to_png(image, text), text))
            if stopped is not None and not stopped.skip:
                break
    return out


def _guidance(model, p: GenerationParams) -> float | None:
    """The guidance input a FLUX dev model drew with (the infotext records it); None for the others."""
    if model.family == FLUX and model.unet.cfg.guidance_embed:
        return FLUX_GUIDANCE if p.guidance is None else p.guidance
    return None


def _step_reporter(progress, image: int, images: int):
    if progress is None:
        return None
    return lambda index, total, seconds, denoised: progress(Step(index, total, seconds, image, images, denoised))


def _conditionings(model, p: GenerationParams):
    """(cond, uncond) of a request on ``model``; uncond None when the scale needs no unconditional pass."""
    kw = dict(clip_skip=p.clip_skip, original_size=p.original_size, target_size=p.target_size,
              crop=(p.crop_top, p.crop_left), aesthetic_scores=(p.aesthetic_score, p.negative_aesthetic_score),
              guidance=p.guidance)
    if not samplers.uses_guidance(p.cfg_scale):
        return model.conditioning([p.prompt], p.width, p.height, **kw), None
    both = model.conditioning([p.prompt, p.negative_prompt], p.width, p.height, negative=[False, True],
                              **kw)     # one text-encoder batch for both prompts
    return rows(both, 0), rows(both, 1)


def rows(cond, i: int):
    """Row i of a conditioning (a tensor, or SDXL's dict of tensors), kept as a batch of one."""
    if isinstance(cond, dict):
        return {k: v[i:i + 1] for k, v in cond.items()}
    return cond[i:i + 1]


def _default_scheduler(model, sample_method):
    return FLOW_SCHEDULER if model.prediction == "flow" else samplers.default_scheduler(sample_method)


def _check(model, p: GenerationParams):
    # the VAE works on 8×8 pixel blocks, an MMDiT on 2×2 latent patches of them
    block = 8 * getattr(model.unet.cfg, "patch_size", 1)
    for name, value in (("width", p.width), ("height", p.height)):
        if value % block:
            raise PipelineError(f"{name} must be a multiple of {block} for {model.name!r}, got {value}", name)
    if model.family in (SD3, FLUX):
        _check_flow(model, p)
    if p.slg_scale:
        _check_skip_layers(model, p)
    if p.guidance is not None and not (model.family == FLUX and model.unet.cfg.guidance_embed):
        raise PipelineError(f"guidance is an input of FLUX dev models only; {model.name!r} takes none (cfg_scale sets "
                            "classifier-free guidance)", "guidance")
    try:
        samplers.get_sampler(samplers.check_sampler(p.sample_method), model.prediction)
    except ValueError as e:
        raise PipelineError(str(e), "sample_method") from None
    try:
        if p.scheduler is not None:
            samplers.check_scheduler(p.scheduler)
    except ValueError as e:
        raise PipelineError(str(e), "scheduler") from None
    if (p.scheduler or _default_scheduler(model, p.sample_method)) == "lcm" and p.steps > 50:
        # the lcm schedule has 50 distinct timesteps (original_inference_steps); past that it repeats
        # them, and the multistep samplers would divide by a zero step
        raise PipelineError(f"the lcm schedule allows at most 50 steps, got {p.steps}", "steps")
    if p.control_image is not None and getattr(model, "controlnet", None) is None:
        raise PipelineError("control_image was sent but this server has no ControlNet loaded "
                            "(start it with --control-net PATH)", "control_image")
    if p.mask is not None and p.init_image is None:
        raise PipelineError("a mask needs an image to edit", "mask")
    if p.inpaint_fill not in INPAINT_FILLS:
        raise PipelineError(f"inpaint_fill must be one of {', '.join(INPAINT_FILLS)}, got {p.inpaint_fill!r}", "inpaint_fill")
    if model.family == REFINER and p.init_image is None:
        raise PipelineError(f"{model.name!r} is an SDXL refiner: it finishes images rather than starting them. Name it "
                            f"as the refiner of an SDXL base model, or send it an image to edit", "model")
    if p.refiner is not None:
        r = p.refiner
        if (r.vae.cfg.scale_factor, r.unet.cfg.out_channels) != (model.vae.cfg.scale_factor, model.unet.cfg.out_channels):
            raise PipelineError(f"the refiner {r.name!r} ({r.family}) works in another latent space than the model "
                                f"{model.name!r} ({model.family})", "refiner")
        if not 0 <= p.refiner_switch_at <= 1:
            raise PipelineError(f"refiner_switch_at must be between 0 and 1, got {p.refiner_switch_at}", "refiner_switch_at")
    # the blocks up to each encoder's own output layer
    most = min(e.cfg.output_layer % e.cfg.layers + 1 for m in (model, p.refiner) if m is not None for e, _ in m.encoders)
    if not 1 <= p.clip_skip <= most:
        raise PipelineError(f"clip_skip must be between 1 and {most} for this model's text encoder, got {p.clip_skip}",
                            "clip_skip")


def _check_flow(model, p: GenerationParams):
    """What the rectified-flow families (SD3, FLUX) cannot take."""
    table = getattr(model.unet.cfg, "pos_embed_max_size", None)       # SD3's positions; FLUX rotates by any position
    side = table * 8 * model.unet.cfg.patch_size if table else None
    for name, value in (("width", p.width), ("height", p.height)):
        if side and value > side:
            raise PipelineError(f"{name} {value} is past what {model.name!r} can place: its position table covers "
                                f"{side}×{side} pixels", name)
    if p.control_image is not None:
        raise PipelineError(f"{model.name!r} is an {model.family} model: ControlNets for it are not supported",
                            "control_image")
    if p.scheduler not in (None, FLOW_SCHEDULER):
        raise PipelineError(f"{model.name!r} is a rectified-flow model with a schedule of its own: scheduler must be "
                            f"{FLOW_SCHEDULER} or left out, got {p.scheduler!r}", "scheduler")
    if p.refiner is not None:
        raise PipelineError(f"a refiner finishes SDXL images; {model.family} models take none", "refiner")


def _check_skip_layers(model, p: GenerationParams):
    if model.family != SD3:
        raise PipelineError(f"skip-layer guidance (slg_scale) is for SD3 models; {model.name!r} is {model.family}",
                            "slg_scale")
    depth = model.unet.cfg.depth
    if not p.skip_layers or not all(0 <= i < depth for i in p.skip_layers):
        raise PipelineError(f"skip_layers must name joint blocks of {model.name!r}, from 0 to {depth - 1}; got "
                            f"{list(p.skip_layers)}", "skip_layers")
    if not 0 <= p.skip_layer_start < p.skip_layer_end <= 1:
        raise PipelineError(f"skip-layer guidance needs 0 <= skip_layer_start < skip_layer_end <= 1, got "
                            f"{p.skip_layer_start} and {p.skip_layer_end}", "skip_layer_start")


def _skip_layer_guidance(p: GenerationParams, unet_fn, sigmas):
    """make_denoiser's ``slg`` for this run (None: off, or no step inside its window)."""
    if not (p.slg_scale and samplers.uses_guidance(p.cfg_scale)):
        return None
    window = samplers.skip_layer_window(sigmas, p.skip_layer_start, p.skip_layer_end)
    skip = tuple(sorted(set(p.skip_layers)))
    return (lambda x_in, t, ctx: unet_fn(x_in, t, ctx, skip_layers=skip), p.slg_scale, window) if window else None


def sigmas_for(model, scheduler: str, steps: int, width: int, height: int) -> torch.Tensor:
    """The noise levels of a whole ``steps``-step run: the scheduler's, or a flow model's own. SD3: the ramp
    shifted by ``model.flow_shift``. FLUX dev: shifted by how many 2×2 patches the image has (flux_sigmas); schnell:
    unshifted, from 1 down to 1/steps, as Black Forest Labs' and diffusers' pipelines run them."""
    if model.family == FLUX:
        if model.unet.cfg.guidance_embed:
            return samplers.flux_sigmas(steps, (width // 16) * (height // 16))
        return samplers.flow_sigmas(steps, shift=1.0, t_min=1 / steps)
    if model.prediction == "flow":
        return samplers.flow_sigmas(steps, shift=model.flow_shift)
    return samplers.get_sigmas(scheduler, steps)


# ------------------------------------------------------------------------------------------------
def _generate_one(model, p, scheduler, seed, conds, init, progress, guided_hint=None):
    """(one image, the ``Interrupt`` that stopped it or None). ``conds``: (cond, uncond) for the model and, with
    a refiner, for the refiner. ``progress(index, total, seconds, denoised)`` after every step."""
    gen = torch.Generator("cpu").manual_seed(seed)
    shape = (1, model.unet.cfg.out_channels, p.height // 8, p.width // 8)

    def noise():
        return torch.randn(shape, generator=gen, dtype=torch.float32).to(model.device)

    sigmas = sigmas_for(model, scheduler, p.steps, p.width, p.height)
    latent = None
    if init is not None:
        sigmas = samplers.img2img_sigmas(sigmas, p.strength)
        latent = init["latent"]
        if init["noise_fill"] is not None:        # "latent_noise": unit noise where the mask repaints
            latent = latent * (1 - init["noise_fill"]) + noise() * init["noise_fill"]
    # x₀ + σ·ε, for flow (1 − σ)·x₀ + σ·ε; txt2img: no x₀
    x = samplers.add_noise(noise(), sigmas[0], model.prediction, latent)

    # The model takes the steps up to the switch, the refiner the rest, on the same noise stream; the
    # ControlNet and an inpainting UNet's extra input belong to the model's part only.
    total = len(sigmas) - 1
    switch = round(p.refiner_switch_at * total) if p.refiner is not None else total
    extra = init["unet_extra"] if init is not None else _txt2img_unet_extra(model, shape)
    parts = [(model, conds[0], extra, guided_hint, 0, sigmas[:switch + 1])]
    if p.refiner is not None:
        parts.append((p.refiner, conds[1], None, None, switch, sigmas[switch:]))
    clock, latest = [time.perf_counter()], [None]
    stopped = None
    try:
        for part_model, (cond, uncond), part_extra, hint, first, part_sigmas in parts:
            if len(part_sigmas) < 2:
                continue

            def callback(i, sigma, x_i, denoised, first=first):
                now = time.perf_counter()
                dt, clock[0] = now - clock[0], now
                latest[0] = denoised
                log.debug("step %d/%d %.3fs/step", first + i + 1, total, dt)
                if progress:
                    progress(first + i, total, dt, denoised)

            denoise = _denoiser(part_model, p, cond, uncond, part_extra, hint, init, part_sigmas)
            sample = samplers.get_sampler(p.sample_method, part_model.prediction)
            x = sample(denoise, x, part_sigmas, noise=noise, callback=callback)
    except Interrupt as stop:          # the picture so far: the latest estimate of the finished latent
        stopped = stop
        if latest[0] is not None:
            x = latest[0]
    release_freed_memory(x.device)
    return tensor_to_image(decode_latent(model, x)[0]), stopped


def _denoiser(model, p, cond, uncond, extra, guided_hint, init, sigmas):
    """The guided denoiser D(x, σ) of one model over the noise levels ``sigmas``: its UNet (+ an inpainting UNet's
    extra input, + the ControlNet's residuals), classifier-free and skip-layer guidance, and the original latent
    kept outside a mask."""
    def unet_fn(x_in, t, ctx, **skip):
        x_in = x_in.to(model.dtype)
        if extra is not None:                    # inpainting UNet: + mask + masked-image latent
            x_in = torch.cat([x_in, extra.expand(x_in.shape[0], -1, -1, -1)], dim=1)
        if guided_hint is None:       # SDXL, SD3: context and y; FLUX dev: and its guidance
            return model.unet(x_in, t, **ctx, **skip) if isinstance(ctx, dict) else model.unet(x_in, t, ctx)
        context, y = (ctx["context"], ctx["y"]) if isinstance(ctx, dict) else (ctx, None)
        control = control_residuals(model.controlnet, x_in, t, context, guided_hint, p.control_strength, y)
        return model.unet(x_in, t, context, y=y, control=control)

    denoise = samplers.make_denoiser(unet_fn, model.prediction, cond, uncond, p.cfg_scale, share_latent=True,
                                     slg=_skip_layer_guidance(p, unet_fn, sigmas))
    if init is not None and init["keep"] is not None and extra is None:
        denoise = _keep_outside_mask(denoise, init["original"], init["keep"])
    return denoise


def decode_latent(model, x):
    """The VAE decode of latent x, as float32 in [-1, 1]; with ``model.taesd_decode`` TAESD's (fast, rougher).
    SDXL's original VAE overflows float16 (its activations pass 65504): a float16 decode that comes out
    non-finite is done again in float32, never returned black."""
    if model.taesd_decode and model.taesd is not None:
        return taesd.decode(model.taesd, x)
    img = vae_decode(model, x.to(model.dtype))
    if model.dtype == torch.float16 and not torch.isfinite(img).all():
        log.warning("the VAE overflowed float16; decoding in float32 (an fp16-fixed VAE via --vae avoids this)")
        model.vae.to(torch.float32)
        try:
            img = vae_decode(model, x.float())
        finally:
            model.vae.to(torch.float16)
    return img


def vae_decode(model, z):
    """The VAE's decode of z as float32, in tiles where ``model.vae_tiling`` asks (sdcore.tiling)."""
    if tiling.should_tile(model.vae_tiling, *z.shape[-2:], z.dtype, z.device):
        return tiling.decode(model.vae, z)
    return model.vae.decode(z).float()


def vae_encode(model, img):
    """The VAE's encode of img [-1, 1] as float32, in tiles where ``model.vae_tiling`` asks."""
    img = img.to(model.dtype)
    if tiling.should_tile(model.vae_tiling, img.shape[-2] // 8, img.shape[-1] // 8, img.dtype, img.device):
        return tiling.encode(model.vae, img)
    return model.vae.encode(img).float()


def _keep_outside_mask(denoise, latent, keep):
    """Ordinary (4-channel) models: outside the mask the prediction *is* the original latent, so every
    step moves x back onto the original, noised to that step's σ; inside, the model paints.
    For first-order samplers this equals blending ``latent + σ·noise`` back after every step."""
    def masked(x, sigma):
        return keep * latent + (1 - keep) * denoise(x, sigma)
    return masked


def _txt2img_unet_extra(model, shape):
    if not model.inpainting:
        return None
    # txt2img on an inpainting UNet: everything is to be painted; the masked image is blank (grey).
    blank = vae_encode(model, torch.zeros(1, 3, shape[2] * 8, shape[3] * 8, device=model.device))
    return torch.cat([torch.ones(1, 1, *shape[2:], device=model.device), blank], dim=1).to(model.dtype)


def control_residuals(controlnet, x_in, t, ctx, guided_hint, strength, y=None):
    """The ControlNet's 13 residuals × strength, on the same batch as the UNet. With CFG that batch is
    [uncond, cond], so both halves are controlled alike (as diffusers' ControlNet pipeline without
    guess mode, AUTOMATIC1111's "Balanced" and stable-diffusion.cpp): guidance then pushes towards the
    prompt, not towards the control, and the control strength alone sets how strongly it binds."""
    # an inpainting UNet's extra input channels are not for a ControlNet of a 4-channel model
    return [r * strength for r in controlnet(x_in[:, :controlnet.cfg.in_channels], t, ctx, guided_hint, y=y)]


def _prepare_control(model, p):
    """Once per request: the control image covering the output size (cover_resize, as edits), RGB in
    [0, 1], edge-detected if asked, through the ControlNet's hint block. None: the ControlNet is not
    run at all (no control image, or strength 0, which so gives exactly the uncontrolled image)."""
    if p.control_image is None or p.control_strength == 0:
        return None
    hint = (image_to_tensor(cover_resize(p.control_image.convert("RGB"), p.width, p.height)).to(model.device) + 1) / 2
    if p.apply_canny_preprocessor:
        hint = canny(hint)
    return model.controlnet.embed_hint(hint)


def _prepare_init(model, p):
    if p.init_image is None:
        return None
    img = image_to_tensor(cover_resize(p.init_image.convert("RGB"), p.width, p.height)).to(model.device)
    repaint_px = None
    if p.mask is not None:
        repaint_px = mask_to_repaint(cover_resize(p.mask, p.width, p.height)).to(model.device)   # [1,1,H,W], 1 = repaint
    fill = p.inpaint_fill if repaint_px is not None else "original"
    source = fill_masked(img, repaint_px) if fill == "fill" else img
    latent = original = vae_encode(model, source)
    keep = repaint = None
    if repaint_px is not None:
        repaint = F.interpolate(repaint_px, size=latent.shape[-2:], mode="area")
        keep = 1 - repaint
        if fill == "latent_nothing":
            latent = latent * keep
    extra = None
    if model.inpainting:
        repaint_px = repaint_px if repaint_px is not None else torch.ones(1, 1, p.height, p.width, device=model.device)
        masked = img * (repaint_px < 0.5)        # the area to repaint is blanked (0 = grey in [-1, 1])
        masked_latent = vae_encode(model, masked)
        mask_latent = F.interpolate(repaint_px, size=latent.shape[-2:], mode="nearest")
        extra = torch.cat([mask_latent, masked_latent], dim=1).to(model.dtype)
    return {"latent": latent, "original": original, "keep": keep, "unet_extra": extra,
            "noise_fill": repaint if fill == "latent_noise" else None}


def fill_masked(img: torch.Tensor, repaint: torch.Tensor) -> torch.Tensor:
    """The "fill" start for inpainting: the area to repaint takes the colours around it (push-pull). Pull: halve
    the image again and again, each cell averaging the kept pixels it covers, until one cell is left. Push: from
    the coarsest level down, a cell that saw no kept pixel takes the (bilinearly upsampled) colour of the level
    above. So each repainted pixel gets the mean colour of the smallest neighbourhood that has kept pixels.
    ``img`` [1,3,H,W] in [-1, 1], ``repaint`` [1,1,H,W] (1 = repaint); kept pixels are returned unchanged."""
    keep = (repaint < 0.5).to(img.dtype)
    levels = [(img * keep, keep)]                 # (colour × weight, weight) per level
    while max(levels[-1][1].shape[-2:]) > 1:
        c, w = levels[-1]
        levels.append((F.avg_pool2d(c, 2, ceil_mode=True), F.avg_pool2d(w, 2, ceil_mode=True)))
    c, w = levels[-1]
    colour = c / w.clamp_min(1e-12)
    for c, w in reversed(levels[:-1]):
        above = F.interpolate(colour, size=c.shape[-2:], mode="bilinear", align_corners=False)
        colour = torch.where(w > 0, c / w.clamp_min(1e-12), above)
    return keep * img + (1 - keep) * colour


# ------------------------------------------------------------------------------------------------
# Images
# ------------------------------------------------------------------------------------------------
def cover_resize(img: Image.Image, width: int, height: int) -> Image.Image:
    """Scale to cover width×height, then center-crop (the rule for edits and control images)."""
    if img.size == (width, height):
        return img
    scale = max(width / img.width, height / img.height)
    w, h = max(width, round(img.width * scale)), max(height, round(img.height * scale))
    img = img.resize((w, h), Image.Resampling.LANCZOS)
    left, top = (w - width) // 2, (h - height) // 2
    return img.crop((left, top, left + width, top + height))


def image_to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL image -> [1, 3, H, W] in [-1, 1]."""
    data = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(img.height, img.width, 3)
    return data.permute(2, 0, 1)[None].float() / 127.5 - 1


def tensor_to_image(x: torch.Tensor) -> Image.Image:
    """[3, H, W] in [-1, 1] -> RGB PIL image (rounded, not truncated)."""
    x = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).contiguous().cpu()
    return Image.fromarray(x.numpy(), "RGB")


def mask_to_repaint(mask: Image.Image) -> torch.Tensor:
    """OpenAI semantics: transparent pixels are repainted. Masks without alpha: white = repaint."""
    if mask.mode in ("RGBA", "LA", "PA") or "transparency" in mask.info:
        alpha = mask.convert("RGBA").getchannel("A")
        values = 255 - torch.frombuffer(bytearray(alpha.tobytes()), dtype=torch.uint8).float()
    else:
        values = torch.frombuffer(bytearray(mask.convert("L").tobytes()), dtype=torch.uint8).float()
    return (values / 255).view(1, 1, mask.height, mask.width)


# ------------------------------------------------------------------------------------------------
# Encoded files: the infotext (sdcore/infotext.py) rides in every format
# ------------------------------------------------------------------------------------------------
EXIF_IFD, USER_COMMENT = 0x8769, 0x9286


def to_jpeg_or_webp(img: Image.Image, parameters: str, fmt: str, quality: int) -> bytes:
    """JPEG or WebP at ``quality`` (0-100) with the infotext as EXIF UserComment, the way AUTOMATIC1111
    stores it (an 8-byte "UNICODE" character-code prefix, then UTF-16 big-endian text)."""
    exif = Image.Exif()
    exif.get_ifd(EXIF_IFD)[USER_COMMENT] = b"UNICODE\0" + parameters.encode("utf-16-be")
    buf = io.BytesIO()
    img.save(buf, format={"jpeg": "JPEG", "webp": "WEBP"}[fmt], quality=quality, exif=exif.tobytes())
    return buf.getvalue()


def to_png(img: Image.Image, parameters: str) -> bytes:
    info = PngImagePlugin.PngInfo()
    info.add_itxt("parameters", parameters)       # iTXt: UTF-8, so any prompt survives
    buf = io.BytesIO()
    img.save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()
