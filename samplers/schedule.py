"""The SD noise table, sigma <-> timestep, and the noise schedules (docs/core.md, "Noise levels and schedules").

Everything is computed in float64 on the CPU: the table once, the schedules per request. A
float64 0-dim sigma multiplies a float32 (or bf16) latent without promoting it, so samplers keep
the latent's dtype while their step-size arithmetic stays exact.
"""
import functools
import math

import torch

TIMESTEPS = 1000
BETA_START = 0.00085
BETA_END = 0.012
LCM_ORIGINAL_STEPS = 50

SCHEDULERS = ("discrete", "karras", "exponential", "lcm")


class UnknownNameError(KeyError, ValueError):
    """An unknown sampler or scheduler name; the message lists the valid ones.

    A KeyError so that `SAMPLERS[name]` behaves like a dict lookup, a ValueError so that request
    validation can catch it as a bad value.
    """

    def __str__(self):
        return self.args[0]


def check_name(kind, name, valid):
    if name not in valid:
        raise UnknownNameError(f"unknown {kind} {name!r}; valid: {', '.join(valid)}")
    return name


@functools.lru_cache(maxsize=None)
def _table():
    k = torch.arange(TIMESTEPS, dtype=torch.float64)
    betas = (math.sqrt(BETA_START) + (math.sqrt(BETA_END) - math.sqrt(BETA_START)) * k / (TIMESTEPS - 1)) ** 2
    alphas_cumprod = torch.cumprod(1 - betas, dim=0)
    sigmas = ((1 - alphas_cumprod) / alphas_cumprod).sqrt()
    return alphas_cumprod, sigmas, sigmas.log()


@functools.lru_cache(maxsize=None)
def _log_sigmas_on(device):
    return _table()[2].to(device)


def alphas_cumprod():
    """ᾱ_k, k = 0..999 (float64): the VP view of the same table (diffusers' coordinates)."""
    return _table()[0].clone()


def model_sigmas():
    """σ_k = sqrt((1-ᾱ_k)/ᾱ_k), k = 0..999 (float64, increasing)."""
    return _table()[1].clone()


SIGMA_MIN = _table()[1][0].item()
SIGMA_MAX = _table()[1][-1].item()


def _as_float_tensor(v):
    if not torch.is_tensor(v):
        return torch.tensor(v, dtype=torch.float64)
    return v if v.is_floating_point() else v.to(torch.float64)


def sigma_to_t(sigma):
    """Continuous timestep for σ: linear interpolation of the table in log σ (not rounded).

    Works on python floats and on tensors of any shape, float dtype and device; the result has
    the input's dtype and device (float64 for python numbers). The search runs in float64 so that
    a float32/bf16 σ is not compared against a rounded table.
    """
    sigma = _as_float_tensor(sigma)
    log_sigmas = _log_sigmas_on(sigma.device)
    log_sigma = sigma.to(torch.float64).log()
    # (number of k with log σ_k <= log σ) - 1: the table is increasing, so searchsorted counts them.
    lo = torch.searchsorted(log_sigmas, log_sigma.reshape(-1), right=True).reshape(log_sigma.shape) - 1
    lo = lo.clamp(0, TIMESTEPS - 2)
    low, high = log_sigmas[lo], log_sigmas[lo + 1]
    w = ((low - log_sigma) / (low - high)).clamp(0, 1)
    t = (1 - w) * lo + w * (lo + 1)
    return t.to(sigma.dtype)


def t_to_sigma(t):
    """σ for a (possibly fractional) timestep t in [0, 999]: interpolation in log σ."""
    t = _as_float_tensor(t)
    log_sigmas = _log_sigmas_on(t.device)
    t64 = t.to(torch.float64)
    lo, hi = t64.floor().long(), t64.ceil().long()
    w = t64 - lo
    return ((1 - w) * log_sigmas[lo] + w * log_sigmas[hi]).exp().to(t.dtype)


def _append_zero(s):
    return torch.cat([s, s.new_zeros(1)])


def _discrete(n):
    if n == 1:
        return t_to_sigma(torch.tensor([TIMESTEPS - 1.0], dtype=torch.float64))
    i = torch.arange(n, dtype=torch.float64)
    return t_to_sigma((TIMESTEPS - 1) - i * (TIMESTEPS - 1) / (n - 1))


def _karras(n, rho=7.0):
    if n == 1:
        # The ramp would divide by zero (stable-diffusion.cpp does).
        return torch.tensor([SIGMA_MAX], dtype=torch.float64)
    ramp = torch.arange(n, dtype=torch.float64) / (n - 1)
    min_inv_rho, max_inv_rho = SIGMA_MIN ** (1 / rho), SIGMA_MAX ** (1 / rho)
    return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho


def _exponential(n):
    return torch.linspace(math.log(SIGMA_MAX), math.log(SIGMA_MIN), n, dtype=torch.float64).exp()


def _lcm(n):
    # Integer arithmetic as in diffusers' LCMScheduler (original_inference_steps = 50); more than
    # 50 steps repeats timesteps, as stable-diffusion.cpp does.
    k = TIMESTEPS // LCM_ORIGINAL_STEPS
    timesteps = [(LCM_ORIGINAL_STEPS - (LCM_ORIGINAL_STEPS * i) // n) * k - 1 for i in range(n)]
    return t_to_sigma(torch.tensor(timesteps, dtype=torch.float64))


_SCHEDULES = {"discrete": _discrete, "karras": _karras, "exponential": _exponential, "lcm": _lcm}


def get_sigmas(scheduler, steps, device="cpu", dtype=torch.float64):
    """The N+1 noise levels of an N-step schedule, decreasing, ending in 0 (float64 by default)."""
    check_name("scheduler", scheduler, SCHEDULERS)
    steps = int(steps)
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    return _append_zero(_SCHEDULES[scheduler](steps)).to(device=device, dtype=dtype)


def img2img_sigmas(sigmas, strength):
    """The tail of a full N-step schedule that img2img runs (stable-diffusion.cpp convention).

    t_enc = floor(N·strength), at most N-1; the t_enc + 1 last steps are kept, so the result
    starts at σ_start = sigmas[N - t_enc - 1] and the caller starts from init_latent + noise·σ_start.
    """
    strength = float(strength)
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must be in [0, 1], got {strength}")
    n = len(sigmas) - 1
    t_enc = min(int(math.floor(n * strength)), n - 1)
    return sigmas[n - t_enc - 1:]


# ----------------------------------------------------------------------------- rectified flow
#
# SD3/SD3.5 and FLUX are rectified-flow models. Their noised latent at level t ∈ [0, 1] is the straight
# line x_t = (1 - t)·x₀ + t·ε between the data (t = 0) and pure noise (t = 1), and the network predicts
# the velocity v = dx_t/dt = ε - x₀. Writing σ := t the samplers need nothing new: the clean-latent
# estimate is D(x, σ) = x - σ·v (denoiser.py, prediction "flow"), and the slope the samplers integrate,
# (x - D)/σ, is v itself, so an Euler step x + (σ' - σ)·(x - D)/σ is the flow's Euler step
# x + (σ' - σ)·v. What differs from the eps/v models is only (a) the levels, σ ≤ 1 with σ_max = 1
# (the sampler starts from ε itself, not ε·σ_max), (b) the timestep the network takes, t = 1000·σ
# instead of the table lookup of sigma_to_t, and (c) how noise is put on a latent, (1 - σ)·x₀ + σ·ε
# (denoiser.add_noise) rather than x₀ + σ·ε. The schedules below are not in SCHEDULERS: they are
# meaningless for the eps/v models, whose σ run to 14.6.


def flow_sigma_to_t(sigma):
    """The timestep a rectified-flow network takes at level σ: t = 1000·σ (continuous, not rounded).

    Python numbers give a float64 tensor; tensors keep their dtype and device.
    """
    sigma = _as_float_tensor(sigma)
    return sigma * TIMESTEPS


def flow_t_to_sigma(t):
    """Inverse of flow_sigma_to_t: σ = t/1000."""
    t = _as_float_tensor(t)
    return t / TIMESTEPS


def flow_shift(sigma, shift):
    """The static "timestep shift" of SD3: σ' = shift·σ / (1 + (shift - 1)·σ).

    It keeps 0 and 1 fixed and, for shift > 1, moves every level towards 1, i.e. spends more of
    the steps at high noise: it multiplies the noise-to-signal ratio σ/(1 - σ) by shift (divides
    the SNR ((1 - σ)/σ)² by shift²). Works on python floats and tensors alike.
    """
    return shift * sigma / (1 + (shift - 1) * sigma)


def flow_time_shift(mu, power, sigma):
    """FLUX's resolution-dependent shift: σ' = e^mu / (e^mu + (1/σ - 1)^power) (power 1 in FLUX).

    With power 1 this is flow_shift with shift = e^mu; mu comes from the image size (flux_mu).
    On a tensor σ = 0 maps to 0 (1/σ is +inf); a python 0 raises ZeroDivisionError.
    """
    return math.exp(mu) / (math.exp(mu) + (1 / sigma - 1) ** power)


def flux_mu(image_seq_len, base_seq_len=256, max_seq_len=4096, base_shift=0.5, max_shift=1.15):
    """FLUX's mu for an image of `image_seq_len` tokens (latent height/2 · width/2, its 2×2 patches).

    The straight line through (base_seq_len, base_shift) and (max_seq_len, max_shift), extended
    beyond them (diffusers' FluxPipeline `calculate_shift`, the defaults of FLUX.1's scheduler config).
    A 1024² image (4096 tokens) gets mu = 1.15, a shift of e^1.15 ≈ 3.16.
    """
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * m + (base_shift - m * base_seq_len)


def flow_sigmas(steps, shift=1.0, mu=None, t_min=None, device="cpu", dtype=torch.float64):
    """The N+1 levels of an N-step rectified-flow schedule, from 1 down, ending in 0 (float64 by default).

    The unshifted ramp is N points evenly spaced from 1 to t_min; each is then shifted, by
    flow_shift(σ, shift) or, given mu, by flow_time_shift(mu, 1, σ) (shift must then stay 1: the two
    are alternatives); a final 0 is appended. This is diffusers' FlowMatchEulerDiscreteScheduler
    `set_timesteps(steps)` (`mu=mu` with use_dynamic_shifting), and the default t_min is the one it
    uses: the smallest level of its 1000-level training table, i.e. flow_shift(1/1000, shift) with a
    static shift -- so for SD3 (shift 3) the ramp ends at 0.002994 and the shift is applied on top of
    it; Stability AI's SD3 reference code (sd3_impls.py) does the same -- and 1/1000 with mu. FLUX's
    pipelines use t_min = 1/N instead (flux_sigmas). The network's timesteps are
    flow_sigma_to_t(sigmas[:-1]).
    """
    steps = int(steps)
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    if not shift > 0:
        raise ValueError(f"shift must be positive, got {shift}")
    if mu is not None and shift != 1:
        raise ValueError("give either a static shift or mu (the dynamic shift), not both")
    if t_min is None:
        t_min = 1 / TIMESTEPS if mu is not None else flow_shift(1 / TIMESTEPS, shift)
    if not 0 < t_min <= 1:
        raise ValueError(f"t_min must be in (0, 1], got {t_min}")
    ramp = torch.linspace(1, t_min, steps, dtype=torch.float64)
    sigmas = flow_time_shift(mu, 1.0, ramp) if mu is not None else flow_shift(ramp, shift)
    return _append_zero(sigmas).to(device=device, dtype=dtype)


def flux_sigmas(steps, image_seq_len, device="cpu", dtype=torch.float64, **mu_kw):
    """FLUX.1's schedule for an image of `image_seq_len` tokens: flow_sigmas with t_min = 1/N and
    mu = flux_mu(image_seq_len, **mu_kw).

    As diffusers' FluxPipeline (ramp np.linspace(1, 1/N, N), dynamic shift) and Black Forest Labs'
    reference get_schedule (linspace(1, 0, N + 1), shifted, whose 0 stays 0) give it.
    """
    steps = int(steps)
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    return flow_sigmas(steps, mu=flux_mu(image_seq_len, **mu_kw), t_min=1 / steps, device=device, dtype=dtype)
