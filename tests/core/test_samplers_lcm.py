"""The lcm sampler and schedule against diffusers' LCMScheduler.

diffusers works in VP coordinates, x_vp = sqrt(ᾱ_t)·x0 + sqrt(1-ᾱ_t)·ε, we in VE ones,
x_ve = x0 + σ·ε with σ = sqrt((1-ᾱ)/ᾱ): x_vp = x_ve/sqrt(σ²+1) = c_in·x_ve. So the UNet sees the
same input on both sides, and one LCMScheduler step
    x_vp' = sqrt(ᾱ')·x̂0 + sqrt(1-ᾱ')·z
is, divided by sqrt(ᾱ'), our x' = D + σ'·z. diffusers' x̂0 also carries LCM's boundary-condition
scalings (c_skip ≈ 0.25/(10t)², c_out ≈ 1), a difference below 1e-6 at t ≥ 19.
"""
import pytest
import torch
from diffusers.schedulers.scheduling_lcm import LCMScheduler

import samplers

F64 = torch.float64


def eps_model():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(16, 16, generator=g, dtype=F64) / 4

    def f(x_vp, t):
        # t may be an int (diffusers) or a [B] tensor (ours): broadcast it over the sample.
        t = torch.as_tensor(t, dtype=F64).reshape(-1, *(1,) * (x_vp.ndim - 1))
        flat = x_vp.reshape(x_vp.shape[0], -1)
        return torch.tanh(flat @ w + t.reshape(-1, 1) / 400).reshape(x_vp.shape) + 0.3 * x_vp
    return f


@pytest.mark.parametrize("steps", [1, 2, 4, 8, 50])
def test_lcm_schedule_matches_diffusers(steps):
    sched = LCMScheduler()
    sched.set_timesteps(steps)
    ours = samplers.get_sigmas("lcm", steps)
    ref = samplers.t_to_sigma(sched.timesteps.to(F64))
    assert torch.equal(ours[:-1], ref) and ours[-1] == 0
    # And σ ↔ t on the table's integer steps: diffusers' ᾱ (float32) at those timesteps.
    ac = sched.alphas_cumprod[sched.timesteps].to(F64)
    assert torch.allclose(ours[:-1], ((1 - ac) / ac).sqrt(), rtol=2e-5, atol=0)


@pytest.mark.parametrize("steps", [1, 2, 4, 8])
def test_lcm_trajectory_matches_diffusers(steps):
    f = eps_model()
    shape = (2, 4, 2, 2)
    g = torch.Generator().manual_seed(steps)
    x_vp = torch.randn(shape, generator=g, dtype=F64)
    # diffusers draws its z inside step() from the generator it is given; ours draws the same
    # sequence from a twin generator.
    sched = LCMScheduler()  # SD defaults: scaled_linear 0.00085..0.012, epsilon, 50 original steps
    sched.set_timesteps(steps)
    g_ref = torch.Generator().manual_seed(100 + steps)
    ref_traj = [x_vp]
    for t in sched.timesteps:
        ref_traj.append(sched.step(f(ref_traj[-1], int(t)), t, ref_traj[-1], generator=g_ref).prev_sample)

    sigmas = samplers.get_sigmas("lcm", steps)
    denoise = samplers.make_denoiser(lambda x_in, t, ctx: f(x_in, t), "eps", cond=None, cfg_scale=1.0)
    g_ours = torch.Generator().manual_seed(100 + steps)
    ours = []
    x_ve = x_vp * (sigmas[0] ** 2 + 1).sqrt()
    final = samplers.SAMPLERS["lcm"](denoise, x_ve, sigmas,
                                     noise=lambda: torch.randn(shape, generator=g_ours, dtype=F64),
                                     callback=lambda i, s, x, d: ours.append(x / (s ** 2 + 1).sqrt()))
    ours.append(final)  # σ = 0: VE and VP coincide
    assert len(ours) == len(ref_traj) == steps + 1
    for a, b in zip(ours, ref_traj):
        assert (a - b).abs().max().item() <= 1e-4
    # Not vacuous: every step moves x by far more than the tolerance.
    assert min((b - a).abs().max().item() for a, b in zip(ref_traj, ref_traj[1:])) > 1e-2
