"""Samplers and noise schedules for SD (docs/research.md, docs/core.md), in the style of k-diffusion's sampling.py.

    import samplers
    sigmas = samplers.get_sigmas("karras", steps)          # float64, N+1 values, ends in 0
    denoise = samplers.make_denoiser(unet_fn, "eps", cond, uncond, cfg_scale)
    x = samplers.SAMPLERS["dpm++2m"](denoise, noise() * sigmas[0], sigmas, noise=noise, callback=cb)
"""
from .denoiser import GUIDANCE_OFF, PREDICTIONS, get_scalings, make_denoiser, uses_guidance
from .sampling import (
    ANCESTRAL,
    NFE_PER_STEP,
    SAMPLERS,
    default_scheduler,
    get_ancestral_step,
    get_sampler,
    to_d,
)
from .schedule import (
    SCHEDULERS,
    SIGMA_MAX,
    SIGMA_MIN,
    TIMESTEPS,
    UnknownNameError,
    alphas_cumprod,
    check_name,
    get_sigmas,
    img2img_sigmas,
    model_sigmas,
    sigma_to_t,
    t_to_sigma,
)


def check_sampler(name):
    """Return `name` if it is a sampler, else raise UnknownNameError (a ValueError) listing them."""
    return check_name("sampler", name, tuple(SAMPLERS))


def check_scheduler(name):
    return check_name("scheduler", name, SCHEDULERS)


__all__ = [
    "ANCESTRAL", "GUIDANCE_OFF", "NFE_PER_STEP", "PREDICTIONS", "SAMPLERS", "SCHEDULERS", "SIGMA_MAX", "SIGMA_MIN",
    "TIMESTEPS", "UnknownNameError", "alphas_cumprod", "check_sampler", "check_scheduler",
    "default_scheduler", "get_ancestral_step", "get_sampler", "get_scalings", "get_sigmas",
    "img2img_sigmas", "make_denoiser", "model_sigmas", "sigma_to_t", "t_to_sigma", "to_d", "uses_guidance",
]
