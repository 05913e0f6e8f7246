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
"""
import torch

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
def sample_euler_ancestral(denoise, x, sigmas, noise=None, callback=None, eta=1.0):
    sigmas, n = _prepare(sigmas)
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


@torch.no_grad()
def sample_dpmpp_2s_ancestral(denoise, x, sigmas, noise=None, callback=None, eta=1.0):
    sigmas, n = _prepare(sigmas)
    noise = default_noise(noise, x)
    for i in range(n):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoise(x, sigma)
        if callback is not None:
            callback(i, sigma, x, denoised)
        sigma_down, sigma_up = get_ancestral_step(sigma, sigma_next, eta)
        if sigma_down == 0:
            x = denoised
        else:
            # DPM-Solver++(2S): exponential-integrator steps, the second one from D at the
            # log-σ midpoint σ_s (k-diffusion; evaluating at σ' instead is only first order).
            sigma_s = (sigma * sigma_down) ** 0.5
            x_2 = (sigma_s / sigma) * x + (1 - sigma_s / sigma) * denoised
            denoised_2 = denoise(x_2, sigma_s)
            x = (sigma_down / sigma) * x + (1 - sigma_down / sigma) * denoised_2
        if sigma_next > 0:
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
    """
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
def sample_lcm(denoise, x, sigmas, noise=None, callback=None):
    """Latent consistency sampling: jump to D, then re-noise to σ' with fresh noise."""
    sigmas, n = _prepare(sigmas)
    noise = default_noise(noise, x)
    for i in range(n):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoise(x, sigma)
        if callback is not None:
            callback(i, sigma, x, denoised)
        x = denoised
        if sigma_next > 0:
            x = x + noise() * sigma_next
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
NFE_PER_STEP = {name: 2 if name in ("heun", "dpm2", "dpm++2s_a") else 1 for name in SAMPLERS}


def get_sampler(name):
    return SAMPLERS[name]


def default_scheduler(sample_method):
    """The schedule used when a request names none: lcm for the lcm sampler, else discrete."""
    check_name("sampler", sample_method, tuple(SAMPLERS))
    return "lcm" if sample_method == "lcm" else "discrete"
