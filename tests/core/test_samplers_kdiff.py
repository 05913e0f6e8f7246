"""samplers/ against k-diffusion 0.1.1.post1 (see bench/kdiff.py for how it is imported):
noise table and σ↔t, the four schedules, the denoiser wrapper, and whole trajectories of the six
samplers k-diffusion has, with a nonlinear denoiser and the same injected noise, in float64."""
import contextlib
import math

import numpy as np
import pytest
import torch

import samplers

from bench import kdiff
from tiny_models import random_mlp

F64 = torch.float64


@contextlib.contextmanager
def default_dtype(dtype):
    # k-diffusion builds ramps with torch.linspace in the default dtype; run it in float64 so
    # that the comparison is not limited by float32.
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def reference_alphas_cumprod():
    # The scaled-linear table written out in numpy, independently of samplers/schedule.py.
    k = np.arange(1000, dtype=np.float64)
    betas = (math.sqrt(0.00085) + (math.sqrt(0.012) - math.sqrt(0.00085)) * k / 999) ** 2
    return torch.from_numpy(np.cumprod(1 - betas))


@pytest.fixture(scope="module")
def kd_eps():
    return kdiff.external.DiscreteEpsDDPMDenoiser(None, reference_alphas_cumprod(), quantize=False)


# ---------------------------------------------------------------------------------------- table


def test_noise_table_matches_formula_and_spec_values():
    ac = reference_alphas_cumprod()
    assert torch.allclose(samplers.alphas_cumprod(), ac, rtol=1e-14, atol=0)
    sig = ((1 - ac) / ac).sqrt()
    assert torch.allclose(samplers.model_sigmas(), sig, rtol=1e-14, atol=0)
    assert abs(samplers.SIGMA_MIN - 0.0291672) < 1e-7
    assert abs(samplers.SIGMA_MAX - 14.614641) < 1e-6


def test_sigma_to_t_matches_kdiffusion(kd_eps):
    g = torch.Generator().manual_seed(1)
    log_sigma = torch.empty(4000, dtype=F64).uniform_(math.log(0.005), math.log(40.0), generator=g)
    sigma = torch.cat([log_sigma.exp(), samplers.model_sigmas(), torch.tensor([0.01, 100.0], dtype=F64)])
    ours = samplers.sigma_to_t(sigma)
    ref = kd_eps.sigma_to_t(sigma)
    assert ours.dtype == F64 and ours.shape == sigma.shape
    assert (ours - ref).abs().max().item() <= 1e-9
    # Table entries map to their integer timesteps; out-of-range σ clamps to [0, 999].
    assert (samplers.sigma_to_t(samplers.model_sigmas()) - torch.arange(1000, dtype=F64)).abs().max() < 1e-9
    assert samplers.sigma_to_t(torch.tensor([1e-3, 1e3], dtype=F64)).tolist() == [0.0, 999.0]


def test_sigma_to_t_dtypes_and_python_floats(kd_eps):
    s64 = torch.tensor([0.1, 1.0, 7.5], dtype=F64)
    ref = kd_eps.sigma_to_t(s64)
    t32 = samplers.sigma_to_t(s64.float())
    assert t32.dtype == torch.float32
    assert torch.allclose(t32.double(), ref, atol=2e-4, rtol=0)
    t = samplers.sigma_to_t(1.0)
    assert torch.is_tensor(t) and t.dtype == F64
    assert abs(t.item() - ref[1].item()) < 1e-9


def test_t_to_sigma_matches_kdiffusion(kd_eps):
    # k-diffusion casts t to float32 first, so use values that float32 represents exactly.
    g = torch.Generator().manual_seed(2)
    t = torch.cat([torch.arange(0, 999.01, 0.125, dtype=F64),
                   torch.rand(2000, generator=g, dtype=F64).mul(999).float().double()])
    ours = samplers.t_to_sigma(t)
    ref = kd_eps.t_to_sigma(t)
    assert ref.dtype == F64
    assert ((ours - ref).abs() / ref).max().item() <= 1e-13
    # Round trip.
    assert (samplers.sigma_to_t(ours) - t).abs().max().item() < 1e-9


# ------------------------------------------------------------------------------------ schedules


@pytest.mark.parametrize("n", [1, 2, 3, 5, 20, 50, 1000])
def test_discrete_schedule(kd_eps, n):
    ours = samplers.get_sigmas("discrete", n)
    assert ours.dtype == F64 and ours.shape == (n + 1,) and ours[-1] == 0
    with default_dtype(F64):
        ref = kd_eps.get_sigmas(n)
    # k-diffusion rounds t to float32 (t_to_sigma calls t.float()): about 1e-7 relative in σ.
    assert torch.allclose(ours, ref, rtol=2e-6, atol=0)
    assert abs(ours[0].item() - samplers.SIGMA_MAX) < 1e-12


@pytest.mark.parametrize("n", [2, 3, 5, 20, 50, 1000])
def test_karras_schedule(n):
    ours = samplers.get_sigmas("karras", n)
    with default_dtype(F64):
        ref = kdiff.sampling.get_sigmas_karras(n, samplers.SIGMA_MIN, samplers.SIGMA_MAX, rho=7.0)
    assert ref.dtype == F64
    assert torch.allclose(ours, ref, rtol=1e-13, atol=0)


def test_karras_one_step_is_sigma_max():
    assert samplers.get_sigmas("karras", 1).tolist() == [samplers.SIGMA_MAX, 0.0]


@pytest.mark.parametrize("n", [1, 2, 5, 20, 50])
def test_exponential_schedule(n):
    ours = samplers.get_sigmas("exponential", n)
    with default_dtype(F64):
        ref = kdiff.sampling.get_sigmas_exponential(n, samplers.SIGMA_MIN, samplers.SIGMA_MAX)
    assert torch.allclose(ours, ref, rtol=1e-13, atol=0)


# ------------------------------------------------------------------------------------- denoiser


def raw_unet(dim_ctx=3):
    """A small nonlinear stand-in for the UNet: F(x_in, t, ctx), ctx of shape [B, L, C]."""
    g = torch.Generator().manual_seed(3)
    w = torch.randn(dim_ctx, generator=g, dtype=F64)

    def f(x_in, t, ctx):
        c = (ctx.to(F64) @ w).mean(1)  # [B]
        shape = (-1,) + (1,) * (x_in.ndim - 1)
        return torch.tanh(x_in * (1 + c.reshape(shape)) + t.reshape(shape) / 700) + 0.1 * x_in
    return f


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_wrapper_matches_kdiffusion(prediction):
    ac = reference_alphas_cumprod()
    f = raw_unet()
    g = torch.Generator().manual_seed(4)
    cond = torch.randn(2, 77, 3, generator=g, dtype=F64)
    uncond = torch.randn(2, 77, 3, generator=g, dtype=F64)
    x = torch.randn(2, 4, 5, 5, generator=g, dtype=F64) * 3
    cls = kdiff.external.DiscreteEpsDDPMDenoiser if prediction == "eps" else kdiff.external.DiscreteVDDPMDenoiser
    for sigma in [0.05, 1.3, 14.0]:
        sig_b = torch.full((2,), sigma, dtype=F64)
        # Without guidance.
        ours = samplers.make_denoiser(f, prediction, cond, cfg_scale=1.0)(x, sigma)
        ref = cls(lambda x_in, t: f(x_in, t, cond), ac, quantize=False)(x, sig_b)
        assert (ours - ref).abs().max().item() <= 1e-12
        # Guidance mixes the raw outputs (k-diffusion's wrapper around the guided inner model).
        cfg = 7.5
        ours = samplers.make_denoiser(f, prediction, cond, uncond, cfg)(x, sigma)

        def guided(x_in, t):
            fu, fc = f(x_in, t, uncond), f(x_in, t, cond)
            return fu + cfg * (fc - fu)
        ref = cls(guided, ac, quantize=False)(x, sig_b)
        assert (ours - ref).abs().max().item() <= 1e-12


def test_wrapper_batches_cond_and_uncond_in_one_call():
    f = raw_unet()
    calls = []

    def recording(x_in, t, ctx):
        calls.append((x_in.shape[0], t.clone(), ctx))
        return f(x_in, t, ctx)
    g = torch.Generator().manual_seed(5)
    cond, uncond = torch.randn(2, 77, 3, generator=g), torch.randn(2, 77, 3, generator=g)
    x = torch.randn(2, 4, 8, 8, generator=g)
    d = samplers.make_denoiser(recording, "eps", cond, uncond, cfg_scale=5.0)
    out = d(x, torch.tensor(2.0, dtype=F64))
    assert len(calls) == 1 and calls[0][0] == 4
    assert torch.equal(calls[0][2][:2], uncond) and torch.equal(calls[0][2][2:], cond)
    t = calls[0][1]
    assert t.dtype == torch.float32 and t.shape == (4,)
    assert abs(t[0].item() - samplers.sigma_to_t(2.0).item()) < 1e-4
    assert out.dtype == torch.float32 and out.shape == x.shape
    calls.clear()
    samplers.make_denoiser(recording, "eps", cond, uncond, cfg_scale=1.0)(x, 2.0)
    assert len(calls) == 1 and calls[0][0] == 2 and calls[0][2] is cond
    # Dict conditioning (SDXL-style) is batched key by key.
    seen = []
    dict_cond = {"ctx": cond, "y": torch.ones(2, 6)}
    dict_uncond = {"ctx": uncond, "y": torch.zeros(2, 6)}
    samplers.make_denoiser(lambda x_in, t, c: seen.append(c) or x_in, "eps", dict_cond, dict_uncond, 3.0)(x, 2.0)
    assert seen[0]["y"].shape == (4, 6) and seen[0]["y"][:2].sum() == 0 and seen[0]["y"][2:].sum() == 12


def test_wrapper_can_pass_the_latent_once_for_both_conditionings():
    """share_latent: unet_fn gets x_in [B] against t and ctx of 2B rows (the UNet repeats it itself);
    the guided result is the one of the [x_in, x_in] call."""
    f = raw_unet()
    calls = []

    def repeating(x_in, t, ctx):
        calls.append(x_in.shape[0])
        return f(x_in.repeat(ctx.shape[0] // x_in.shape[0], 1, 1, 1), t, ctx)
    g = torch.Generator().manual_seed(8)
    cond, uncond = torch.randn(2, 77, 3, generator=g, dtype=F64), torch.randn(2, 77, 3, generator=g, dtype=F64)
    x = torch.randn(2, 4, 8, 8, generator=g, dtype=F64)
    shared = samplers.make_denoiser(repeating, "eps", cond, uncond, 6.0, share_latent=True)(x, 1.7)
    assert calls == [2]
    assert (shared - samplers.make_denoiser(f, "eps", cond, uncond, 6.0)(x, 1.7)).abs().max() <= 1e-15
    samplers.make_denoiser(repeating, "eps", cond, uncond, 1.0, share_latent=True)(x, 1.7)
    assert calls == [2, 2]                            # unguided: one call on B, as without the flag


def test_wrapper_sigma_forms_agree():
    f = raw_unet()
    cond = torch.randn(3, 77, 3, generator=torch.Generator().manual_seed(6), dtype=F64)
    x = torch.randn(3, 4, 4, 4, generator=torch.Generator().manual_seed(7), dtype=F64)
    d = samplers.make_denoiser(f, "v", cond, cfg_scale=1.0)
    a = d(x, 0.7)
    b = d(x, torch.tensor(0.7, dtype=F64))
    c = d(x, torch.full((3,), 0.7, dtype=F64))
    assert torch.equal(a, b) and (a - c).abs().max() <= 1e-15


# -------------------------------------------------------------------------------------- samplers


def mlp_denoiser(dim, seed=0, hidden=32):
    """A random nonlinear denoiser; sigma may be 0-dim (ours) or [B] (k-diffusion)."""
    w1, b1, u, w2 = random_mlp(dim, hidden, seed)

    def denoise(x, sigma):
        s = torch.as_tensor(sigma, dtype=F64)
        s = s.reshape(-1, 1) if s.ndim else s
        flat = x.reshape(x.shape[0], -1)
        x_in = flat / (s ** 2 + 1) ** 0.5
        eps = torch.tanh(x_in @ w1 + b1 + s.log() * u) @ w2 + 0.5 * x_in
        return (flat - s * eps).reshape(x.shape)
    return denoise


KD_SAMPLERS = {  # ours: (k-diffusion's, takes a noise_sampler)
    "euler": ("sample_euler", False),
    "euler_a": ("sample_euler_ancestral", True),
    "heun": ("sample_heun", False),
    "dpm2": ("sample_dpm_2", False),
    "dpm++2s_a": ("sample_dpmpp_2s_ancestral", True),
    "dpm++2m": ("sample_dpmpp_2m", False),
}


@pytest.mark.parametrize("steps", [5, 20, 50])
@pytest.mark.parametrize("scheduler", ["discrete", "karras"])
@pytest.mark.parametrize("name", list(KD_SAMPLERS))
def test_trajectory_matches_kdiffusion(name, scheduler, steps):
    shape = (2, 4, 4, 4)
    denoise = mlp_denoiser(64, seed=steps)
    sigmas = samplers.get_sigmas(scheduler, steps)
    g = torch.Generator().manual_seed(100 + steps)
    x0 = torch.randn(shape, generator=g, dtype=F64) * sigmas[0]
    zs = [torch.randn(shape, generator=g, dtype=F64) for _ in range(steps)]

    ours_noise, ref_noise = iter(zs), iter(zs)
    ours_traj, ref_traj = [], []
    ours = samplers.SAMPLERS[name](denoise, x0, sigmas, noise=lambda: next(ours_noise),
                                   callback=lambda i, s, x, d: ours_traj.append((i, s.item(), x, d)))
    fn_name, ancestral = KD_SAMPLERS[name]
    kw = {"noise_sampler": lambda s, s_next: next(ref_noise)} if ancestral else {}
    ref = getattr(kdiff.sampling, fn_name)(
        denoise, x0, sigmas, disable=True, **kw,
        callback=lambda info: ref_traj.append((info["i"], info["sigma"].item(), info["x"], info["denoised"])))

    assert len(ours_traj) == len(ref_traj) == steps
    for (i, s, x, d), (ri, rs, rx, rd) in zip(ours_traj, ref_traj):
        assert (i, s) == (ri, rs)
        assert (x - rx).abs().max().item() <= 1e-6
        assert (d - rd).abs().max().item() <= 1e-6
    assert (ours - ref).abs().max().item() <= 1e-6
    # Both consumed the same draws: one per step that ends above σ = 0.
    if name in ("euler_a", "dpm++2s_a"):
        assert len(list(ours_noise)) == len(list(ref_noise)) == 1
