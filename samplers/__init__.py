"""Samplers and noise schedules for SD (docs/research.md, docs/core.md), in the style of k-diffusion's sampling.py.

    import samplers
    sigmas = samplers.get_sigmas("karras", steps)          # float64, N+1 values, ends in 0
    denoise = samplers.make_denoiser(unet_fn, "eps", cond, uncond, cfg_scale)
    x = samplers.SAMPLERS["dpm++2m"](denoise, noise() * sigmas[0], sigmas, noise=noise, callback=cb)

Rectified-flow models (SD3/SD3.5, FLUX; schedule.py "rectified flow"): their own schedule, the
"flow" prediction type, and get_sampler(name, "flow") (the ancestral samplers renoise differently;
dpm++2mv2 refuses flow models):

    sigmas = samplers.flow_sigmas(steps, shift=3.0)        # SD3; FLUX: flux_sigmas(steps, image_seq_len)
    denoise = samplers.make_denoiser(mmdit_fn, "flow", cond, uncond, cfg_scale)   # t = 1000·σ, x unscaled
    x = samplers.add_noise(noise(), sigmas[0], "flow")      # = ε at σ = 1; img2img: latent=x0
    x = samplers.get_sampler("euler", "flow")(denoise, x, sigmas, noise=noise, callback=cb)
"""
from .denoiser import (
    GUIDANCE_OFF,
    PREDICTIONS,
    add_noise,
    get_scalings,
    make_denoiser,
    skip_layer_window,
    uses_guidance,
)
from .sampling import (
    ANCESTRAL,
    FLOW_UNSUPPORTED,
    NFE_PER_STEP,
    SAMPLERS,
    default_scheduler,
    get_ancestral_step,
    get_ancestral_step_flow,
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
    flow_shift,
    flow_sigma_to_t,
    flow_sigmas,
    flow_t_to_sigma,
    flow_time_shift,
    flux_mu,
    flux_sigmas,
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
    "ANCESTRAL", "FLOW_UNSUPPORTED", "GUIDANCE_OFF", "NFE_PER_STEP", "PREDICTIONS", "SAMPLERS", "SCHEDULERS",
    "SIGMA_MAX", "SIGMA_MIN", "TIMESTEPS", "UnknownNameError", "add_noise", "alphas_cumprod", "check_sampler",
    "check_scheduler", "default_scheduler", "flow_shift", "flow_sigma_to_t", "flow_sigmas", "flow_t_to_sigma",
    "flow_time_shift", "flux_mu", "flux_sigmas", "get_ancestral_step", "get_ancestral_step_flow", "get_sampler",
    "get_scalings", "get_sigmas", "img2img_sigmas", "make_denoiser", "model_sigmas", "sigma_to_t", "t_to_sigma",
    "skip_layer_window", "to_d", "uses_guidance",
]
