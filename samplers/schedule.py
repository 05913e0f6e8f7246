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
