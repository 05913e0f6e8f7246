"""The ten samplers (docs/research.md, "The samplers").

Every sampler has the signature

    sample_x(denoise, x, sigmas, noise=None, callback=None, ...) -> x at sigmas[-1]

- `denoise(x, sigma) -> D` with sigma a 0-dim tensor taken from `sigmas`;
- `noise`: a callable returning a standard-normal tensor shaped like x, or a torch.Generator
  (float32 draws on the generator's device, moved to x's device and dtype), or None (torch's
  global RNG).
  Ancestral samplers draw exactly once per step with σ' > 0; the others never draw;
- `callback(i, sigma, x, denoised)` is called once per step, after the step's first evaluation,
  with the x that was evaluated.

The step arithmetic is done on 0-dim tensors of `sigmas`' dtype (float64 from get_sigmas), which
multiply x without changing its dtype.

Rectified-flow models (SD3, FLUX; denoiser prediction "flow", schedule.flow_sigmas) run on nine
of the ten samplers; get_sampler(name, "flow") gives the right one or refuses:

- The deterministic ones need nothing: they integrate dx/dσ = (x - D)/σ, and for a flow model that
  slope is the predicted velocity v, so they solve the flow's ODE dx/dt = v with σ = t (`euler` is
  exactly diffusers' FlowMatchEulerDiscreteScheduler step x + (σ' - σ)·v). Measured on Gaussian
  data (tests/core/test_flow_matching.py) they converge on flow schedules with orders euler 1,
  heun, dpm2, dpm++2m 2, and ipndm, ipndm_v 2 too (not the 4 they reach on the eps models' uniform
  σ grid).
- dpm++2mv2 is refused (FLOW_UNSUPPORTED, ValueError): stable-diffusion.cpp's weights use the mean
  of the last two steps in log σ, which is only consistent when consecutive steps become equal;
  a flow schedule runs about linearly down to σ ≈ 1/N, where neighbouring log-σ steps (log 3/2,
  log 2, ...) never do, and the result stays O(1) away from the ODE's however many steps are taken.
- The three that put fresh noise back in (ANCESTRAL) must know, since a flow latent at level σ is
  (1 - σ)·x₀ + σ·ε rather than x₀ + σ·ε: they take `flow=True` (get_sampler(name, "flow") passes it)
  and then renoise as ComfyUI does for its CONST (flow) models (get_ancestral_step_flow, sample_lcm).

Given a denoiser from make_denoiser (which records its prediction type), the ancestral samplers
raise ValueError when `flow` does not match it, and dpm++2mv2 when it is "flow", rather than sample
from the wrong noise model.
"""
import functools

import torch

from .denoiser import PREDICTIONS, add_noise
from .schedule import check_name


def to_d(x, sigma, denoised):
    """The probability-flow ODE slope dx/dσ = (x - D)/σ."""
    return (x - denoised) / sigma


def get_ancestral_step(sigma_from, sigma_to, eta=1.0):
    """Split a step σ → σ' into a deterministic part down to σ_down plus fresh noise of std σ_up."""
    if not eta:
        return sigma_to, sigma_to * 0
    sigma_up = min(sigma_to, eta * (sigma_to ** 2 * (sigma_from ** 2 - sigma_to ** 2) / sigma_from ** 2) ** 0.5)
    sigma_down = (sigma_to ** 2 - sigma_up ** 2) ** 0.5
    return sigma_down, sigma_up


def get_ancestral_step_flow(sigma_from, sigma_to, eta=1.0):
    """The rectified-flow ancestral step σ → σ' as (σ_down, σ_up, scale) (ComfyUI's euler_ancestral_RF).

    x at level σ is (1 - σ)·x₀ + σ·ε. The step goes deterministically (an ODE step) down to
    σ_down = σ'·(1 + (σ'/σ - 1)·eta) (σ'²/σ at eta 1, σ' at eta 0; clamped at 0 for eta > 1), where
    x ≈ (1 - σ_down)·x₀ + σ_down·ε; multiplying by scale = (1 - σ')/(1 - σ_down) gives the signal
    weight of level σ' and noise of std scale·σ_down ≤ σ' (the noise-to-signal ratio σ/(1 - σ) is
    increasing); fresh noise of std σ_up = sqrt(σ'² - (scale·σ_down)²) makes up the rest, so the
    latent has level σ' again. It is k-diffusion's ancestral step done on x/(1 - σ), whose noise level
    is σ/(1 - σ), with ComfyUI's choice of σ_down. At eta 0: (σ', 0, 1), the plain ODE step.
    """
    ratio = 1 + (sigma_to / sigma_from - 1) * eta
    sigma_down = sigma_to * max(ratio, ratio * 0)
    scale = (1 - sigma_to) / (1 - sigma_down)
    var_up = sigma_to ** 2 - (scale * sigma_down) ** 2
    return sigma_down, max(var_up, var_up * 0) ** 0.5, scale


def _check_flow(denoise, sigmas, flow):
    """The ancestral samplers' guard: `flow` must match the denoiser's prediction type when it is known."""
    prediction = getattr(denoise, "prediction", None)
    if prediction is not None and (prediction == "flow") != bool(flow):
        raise ValueError(f"the denoiser predicts {prediction!r} but the sampler was called with flow={bool(flow)}: "
                         f"an ancestral sampler must know whether the model is a rectified-flow one to add noise "
                         f"right; use samplers.get_sampler(name, prediction)")
    if flow and len(sigmas) and sigmas[0] > 1:
        raise ValueError(f"a rectified-flow schedule has levels in [0, 1], got {float(sigmas[0])}")


def default_noise(noise, x):
    if noise is None:
        return lambda: torch.randn_like(x)
    if isinstance(noise, torch.Generator):
        # Drawn in float32 whatever x's dtype, so a seed gives the same noise in every precision.
        gen = noise
        return lambda: torch.randn(x.shape, generator=gen, device=gen.device).to(x.device, x.dtype)
    return noise


def _prepare(sigmas):
    if not torch.is_tensor(sigmas):
        sigmas = torch.tensor(sigmas, dtype=torch.float64)
    return sigmas, len(sigmas) - 1


def _lambda(sigma):
    # λ = -log σ; the multistep samplers measure their steps in it.
    return -sigma.log()


@torch.no_grad()
def sample_euler(denoise, x, sigmas, noise=None, callback=None):
    sigmas, n = _prepare(sigmas)
    for i in range(n):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoise(x, sigma)
        if callback is not None:
            callback(i, sigma, x, denoised)
        x = x + to_d(x, sigma, denoised) * (sigma_next - sigma)
    return x


@torch.no_grad()
def sample_euler_ancestral(denoise, x, sigmas, noise=None, callback=None, eta=1.0, flow=False):
    """Euler ancestral; `flow=True` for a rectified-flow model (get_ancestral_step_flow)."""
    sigmas, n = _prepare(sigmas)
    _check_flow(denoise, sigmas, flow)
    noise = default_noise(noise, x)
    for i in range(n):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoise(x, sigma)
        if callback is not None:
            callback(i, sigma, x, denoised)
        if sigma_next == 0:
            # Exactly D rather than D up to rounding (stable-diffusion.cpp, ComfyUI).
            x = denoised
            continue
        if flow:
            sigma_down, sigma_up, scale = get_ancestral_step_flow(sigma, sigma_next, eta)
            x = (x + to_d(x, sigma, denoised) * (sigma_down - sigma)) * scale
        else:
            sigma_down, sigma_up = get_ancestral_step(sigma, sigma_next, eta)
            x = x + to_d(x, sigma, denoised) * (sigma_down - sigma)
        x = x + noise() * sigma_up
    return x


@torch.no_grad()
def sample_heun(denoise, x, sigmas, noise=None, callback=None):
    sigmas, n = _prepare(sigmas)
    for i in range(n):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoise(x, sigma)
        if callback is not None:
            callback(i, sigma, x, denoised)
        d = to_d(x, sigma, denoised)
        dt = sigma_next - sigma
        if sigma_next == 0:
            # The corrector would evaluate at σ = 0, where d is undefined.
            x = x + d * dt
        else:
            x_2 = x + d * dt
            d_2 = to_d(x_2, sigma_next, denoise(x_2, sigma_next))
            x = x + (d + d_2) / 2 * dt
    return x


@torch.no_grad()
def sample_dpm_2(denoise, x, sigmas, noise=None, callback=None):
    sigmas, n = _prepare(sigmas)
    for i in range(n):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoise(x, sigma)
        if callback is not None:
            callback(i, sigma, x, denoised)
        d = to_d(x, sigma, denoised)
        if sigma_next == 0:
            x = x + d * (sigma_next - sigma)
        else:
            # Midpoint in log σ.
            sigma_mid = (sigma * sigma_next) ** 0.5
            x_2 = x + d * (sigma_mid - sigma)
            d_2 = to_d(x_2, sigma_mid, denoise(x_2, sigma_mid))
            x = x + d_2 * (sigma_next - sigma)
    return x


# Where the flow DPM-Solver++(2S) evaluates its second point when it starts from σ = 1 (ComfyUI).
FLOW_2S_FIRST_MIDPOINT = 0.9999


def _flow_midpoint(sigma, sigma_down):
    """The midpoint of [σ_down, σ] in the flow's λ = log((1 - σ)/σ), i.e. the geometric mean of the
    noise-to-signal ratios σ/(1 - σ). λ(1) = -inf has no midpoint: from σ = 1 it is 0.9999."""
    if sigma >= 1:
        return sigma * 0 + FLOW_2S_FIRST_MIDPOINT
    ratio = (sigma / (1 - sigma) * sigma_down / (1 - sigma_down)) ** 0.5
    return ratio / (1 + ratio)


@torch.no_grad()
def sample_dpmpp_2s_ancestral(denoise, x, sigmas, noise=None, callback=None, eta=1.0, flow=False):
    """DPM-Solver++(2S) ancestral; `flow=True` for a rectified-flow model.

    With flow the noise split is get_ancestral_step_flow's and the second evaluation is at the
    midpoint in λ = log((1 - σ)/σ), the flow's half log-SNR (ComfyUI's dpmpp_2s_ancestral_RF). Since
    α = 1 - σ, DPM-Solver++'s first-order update (σ_b/σ_a)·x + (α_b - α_a·σ_b/σ_a)·D is the same
    (σ_b/σ_a)·x + (1 - σ_b/σ_a)·D as for the eps models, so only σ_s and the renoising change.
    """
    sigmas, n = _prepare(sigmas)
    _check_flow(denoise, sigmas, flow)
    noise = default_noise(noise, x)
    scale = 1
    for i in range(n):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoise(x, sigma)
        if callback is not None:
            callback(i, sigma, x, denoised)
        if flow:
            sigma_down, sigma_up, scale = get_ancestral_step_flow(sigma, sigma_next, eta)
        else:
            sigma_down, sigma_up = get_ancestral_step(sigma, sigma_next, eta)
        if sigma_down == 0:
            x = denoised
        else:
            # DPM-Solver++(2S): exponential-integrator steps, the second one from D at the
            # log-σ midpoint σ_s (k-diffusion; evaluating at σ' instead is only first order).
            sigma_s = _flow_midpoint(sigma, sigma_down) if flow else (sigma * sigma_down) ** 0.5
            x_2 = (sigma_s / sigma) * x + (1 - sigma_s / sigma) * denoised
            denoised_2 = denoise(x_2, sigma_s)
            x = (sigma_down / sigma) * x + (1 - sigma_down / sigma) * denoised_2
        if sigma_next > 0:
            if flow:
                x = x * scale
            x = x + noise() * sigma_up
    return x


@torch.no_grad()
def sample_dpmpp_2m(denoise, x, sigmas, noise=None, callback=None):
    sigmas, n = _prepare(sigmas)
    old_denoised = None
    for i in range(n):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoise(x, sigma)
        if callback is not None:
            callback(i, sigma, x, denoised)
        a = sigma_next / sigma
        if old_denoised is None or sigma_next == 0:
            x = a * x + (1 - a) * denoised
        else:
            # Extrapolate D linearly in λ from the previous step's value.
            h = _lambda(sigma_next) - _lambda(sigma)
            h_last = _lambda(sigma) - _lambda(sigmas[i - 1])
            r = h_last / h
            denoised_d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
            x = a * x + (1 - a) * denoised_d
        old_denoised = denoised
    return x


@torch.no_grad()
def sample_dpmpp_2m_v2(denoise, x, sigmas, noise=None, callback=None):
    """stable-diffusion.cpp's variant of DPM++(2M), reproduced as is.

    Its weights use the ratio of the longer to the shorter of the last two steps and the mean
    step, so it only equals DPM++(2M) (and is only second order) on grids uniform in log σ.
    Refuses rectified-flow models (ValueError; see FLOW_UNSUPPORTED).
    """
    if getattr(denoise, "prediction", None) == "flow":
        raise ValueError(FLOW_UNSUPPORTED["dpm++2mv2"])
    sigmas, n = _prepare(sigmas)
    old_denoised = None
    for i in range(n):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoise(x, sigma)
        if callback is not None:
            callback(i, sigma, x, denoised)
        a = sigma_next / sigma
        if old_denoised is None or sigma_next == 0:
            x = a * x + (1 - a) * denoised
        else:
            h = _lambda(sigma_next) - _lambda(sigma)
            h_last = _lambda(sigma) - _lambda(sigmas[i - 1])
            r = max(h_last, h) / min(h_last, h)
            b = torch.exp(-(h_last + h) / 2) - 1
            denoised_d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
            x = a * x - b * denoised_d
        old_denoised = denoised
    return x


# Adams–Bashforth weights for constant steps, newest slope first.
_AB_WEIGHTS = {
    1: (1.0,),
    2: (3 / 2, -1 / 2),
    3: (23 / 12, -16 / 12, 5 / 12),
    4: (55 / 24, -59 / 24, 37 / 24, -9 / 24),
}


def _ab_step(x, dt, ds, weights):
    return x + dt * sum(w * d for w, d in zip(weights, ds))


@torch.no_grad()
def sample_ipndm(denoise, x, sigmas, noise=None, callback=None):
    """iPNDM: Adams–Bashforth in σ up to order 4 on the stored slopes.

    As in stable-diffusion.cpp the formula also runs on the last step to σ = 0, so the result
    is not exactly D there.
    """
    sigmas, n = _prepare(sigmas)
    ds = []  # newest first, at most 4
    for i in range(n):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoise(x, sigma)
        if callback is not None:
            callback(i, sigma, x, denoised)
        ds = [to_d(x, sigma, denoised)] + ds[:3]
        x = _ab_step(x, sigma_next - sigma, ds, _AB_WEIGHTS[len(ds)])
    return x


@torch.no_grad()
def sample_ipndm_v(denoise, x, sigmas, noise=None, callback=None):
    """iPNDM with the variable-step order-2 weights; orders 3 and 4 keep the constant-step
    weights and the last step has no special case (stable-diffusion.cpp)."""
    sigmas, n = _prepare(sigmas)
    ds = []
    for i in range(n):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoise(x, sigma)
        if callback is not None:
            callback(i, sigma, x, denoised)
        ds = [to_d(x, sigma, denoised)] + ds[:3]
        h = sigma_next - sigma
        if len(ds) == 2:
            w = h / (sigma - sigmas[i - 1])
            x = _ab_step(x, h, ds, (1 + w / 2, -w / 2))
        else:
            x = _ab_step(x, h, ds, _AB_WEIGHTS[len(ds)])
    return x


@torch.no_grad()
def sample_lcm(denoise, x, sigmas, noise=None, callback=None, flow=False):
    """Latent consistency sampling: jump to D, then re-noise to σ' with fresh noise.

    Re-noising is D + σ'·z, or (1 - σ')·D + σ'·z with `flow=True` (a rectified-flow model; this is
    diffusers' FlowMatchEulerDiscreteScheduler with stochastic_sampling).
    """
    sigmas, n = _prepare(sigmas)
    _check_flow(denoise, sigmas, flow)
    noise = default_noise(noise, x)
    for i in range(n):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoise(x, sigma)
        if callback is not None:
            callback(i, sigma, x, denoised)
        x = denoised
        if sigma_next > 0:
            x = add_noise(noise(), sigma_next, "flow", x) if flow else x + noise() * sigma_next
    return x


class _Registry(dict):
    def __missing__(self, name):
        check_name("sampler", name, tuple(self))


SAMPLERS = _Registry({
    "euler": sample_euler,
    "euler_a": sample_euler_ancestral,
    "heun": sample_heun,
    "dpm2": sample_dpm_2,
    "dpm++2s_a": sample_dpmpp_2s_ancestral,
    "dpm++2m": sample_dpmpp_2m,
    "dpm++2mv2": sample_dpmpp_2m_v2,
    "ipndm": sample_ipndm,
    "ipndm_v": sample_ipndm_v,
    "lcm": sample_lcm,
})

ANCESTRAL = ("euler_a", "dpm++2s_a", "lcm")
# Samplers that refuse rectified-flow models, with the reason (the ValueError's message).
FLOW_UNSUPPORTED = {
    "dpm++2mv2": "dpm++2mv2 (stable-diffusion.cpp's variant of DPM++(2M)) does not converge on rectified-flow "
                 "models: its step weights assume equal consecutive steps in log σ, which a flow schedule "
                 "running down to σ ≈ 1/N never has; use dpm++2m",
}
NFE_PER_STEP = {name: 2 if name in ("heun", "dpm2", "dpm++2s_a") else 1 for name in SAMPLERS}


def get_sampler(name, prediction=None):
    """The sampler `name`, ready for a model of `prediction` type (None: as in SAMPLERS).

    For "flow" the ANCESTRAL samplers come with flow=True bound (functools.partial), the samplers of
    FLOW_UNSUPPORTED raise ValueError, and the others are returned as they are.
    """
    fn = SAMPLERS[name]
    if prediction is not None:
        check_name("prediction type", prediction, PREDICTIONS)
        if prediction == "flow" and name in FLOW_UNSUPPORTED:
            raise ValueError(FLOW_UNSUPPORTED[name])
        if prediction == "flow" and name in ANCESTRAL:
            return functools.partial(fn, flow=True)
    return fn


def default_scheduler(sample_method):
    """The schedule used when a request names none: lcm for the lcm sampler, else discrete."""
    check_name("sampler", sample_method, tuple(SAMPLERS))
    return "lcm" if sample_method == "lcm" else "discrete"
