"""Rectified-flow models (SD3/SD3.5, FLUX) in samplers/: the flow schedules, the "flow" denoiser and the
samplers on it, against diffusers' FlowMatchEulerDiscreteScheduler (the independent reference) and
against closed forms on Gaussian data.

A flow latent at level σ ∈ [0, 1] is x = (1 - σ)·x₀ + σ·ε and the network predicts v = ε - x₀, so
D(x, σ) = x - σ·v and the samplers' slope (x - D)/σ is v: Euler on it is diffusers' step x + (σ' - σ)·v.
"""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.flux.pipeline_flux import calculate_shift

import samplers
from tiny_models import random_mlp

F64 = torch.float64
MU, S = 0.3, 0.8
DETERMINISTIC = ["euler", "heun", "dpm2", "dpm++2m", "ipndm", "ipndm_v"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # The tensors here are tiny: on a shared machine two threads only wait for each other (~50 ms a
    # convolution instead of 0.3 ms).
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def rel_err(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def sd3_scheduler(shift=3.0):
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)


def flux_scheduler():
    # FLUX.1's scheduler config: the static shift is ignored under use_dynamic_shifting.
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True,
                                           base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                                           max_image_seq_len=4096)


# ------------------------------------------------------------------------------------- schedules


@pytest.mark.parametrize("shift", [3.0, 1.0])
@pytest.mark.parametrize("steps", [1, 4, 20, 28])
def test_static_shift_schedule_matches_diffusers(steps, shift):
    ref = sd3_scheduler(shift)
    ref.set_timesteps(steps)
    sig = samplers.flow_sigmas(steps, shift)
    assert sig.shape == (steps + 1,) and sig.dtype == F64
    assert sig[0] == 1 and sig[-1] == 0 and bool((sig[:-1] > sig[1:]).all())
    # diffusers works in float32: equal to its rounding.
    assert (sig - ref.sigmas.double()).abs().max().item() <= 1e-7
    t = samplers.flow_sigma_to_t(sig[:-1])
    assert (t - ref.timesteps.double()).abs().max().item() <= 1e-4      # float32 ulp at 1000 is 6e-5
    assert samplers.flow_sigmas(steps, shift, dtype=torch.float32).dtype == torch.float32


def test_sd3_ramp_ends_at_the_shifted_table_minimum():
    # Not linspace(1, 1/1000) shifted: diffusers (and SD3's reference sd3_impls.py) end the ramp at
    # the smallest level of the shifted 1000-level table, shift(1/1000), and shift it again.
    ref = sd3_scheduler(3.0)
    ref.set_timesteps(28)
    naive = samplers.flow_shift(torch.linspace(1, 1e-3, 28, dtype=F64), 3.0)
    assert (naive - ref.sigmas[:-1].double()).abs().max().item() > 5e-3
    assert abs(samplers.flow_sigmas(28, 3.0)[-2].item() - samplers.flow_shift(samplers.flow_shift(1e-3, 3.0), 3.0)) < 1e-15


@pytest.mark.parametrize("seq_len", [256, 1024, 4096, 6000])
@pytest.mark.parametrize("steps", [1, 4, 20, 28])
def test_dynamic_shift_schedule_matches_diffusers(steps, seq_len):
    mu = calculate_shift(seq_len, 256, 4096, 0.5, 1.15)
    assert abs(samplers.flux_mu(seq_len) - mu) <= 1e-15
    ref = flux_scheduler()
    # As FluxPipeline calls it: ramp linspace(1, 1/N, N), mu from the latent's token count.
    ref.set_timesteps(steps, sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    sig = samplers.flux_sigmas(steps, seq_len)
    assert (sig - ref.sigmas.double()).abs().max().item() <= 2e-7
    assert (samplers.flow_sigma_to_t(sig[:-1]) - ref.timesteps.double()).abs().max().item() <= 2e-4
    # The scheduler's own ramp (no sigmas given): linspace(1, 1/1000, N).
    ref.set_timesteps(steps, mu=mu)
    assert (samplers.flow_sigmas(steps, mu=mu) - ref.sigmas.double()).abs().max().item() <= 2e-7


def test_time_shift_is_a_static_shift_by_exp_mu():
    s = torch.linspace(1, 1e-3, 50, dtype=F64)
    for mu in (0.5, 1.15, -0.3):
        assert (samplers.flow_time_shift(mu, 1.0, s) - samplers.flow_shift(s, math.exp(mu))).abs().max() < 1e-15
    assert samplers.flow_time_shift(1.0, 1.0, torch.tensor([0.0, 1.0], dtype=F64)).tolist() == [0.0, 1.0]
    # The shift multiplies the noise-to-signal ratio σ/(1 - σ).
    sh = samplers.flow_shift(s[1:], 3.0)
    assert (sh / (1 - sh) - 3 * s[1:] / (1 - s[1:])).abs().max() < 1e-10


def test_flow_timesteps_and_errors():
    assert samplers.flow_sigma_to_t(0.25).item() == 250.0
    t32 = samplers.flow_sigma_to_t(torch.tensor([1.0, 0.5], dtype=torch.float32))
    assert t32.dtype == torch.float32 and t32.tolist() == [1000.0, 500.0]
    assert samplers.flow_t_to_sigma(samplers.flow_sigma_to_t(0.3)).item() == pytest.approx(0.3, abs=1e-15)
    for bad in (lambda: samplers.flow_sigmas(0), lambda: samplers.flow_sigmas(4, 0.0),
                lambda: samplers.flow_sigmas(4, 3.0, mu=1.0), lambda: samplers.flow_sigmas(4, t_min=0.0),
                lambda: samplers.flux_sigmas(0, 4096)):
        with pytest.raises(ValueError):
            bad()
    # Flow schedules are functions, not entries of the scheduler registry the API lists.
    assert samplers.SCHEDULERS == ("discrete", "karras", "exponential", "lcm")


# ---------------------------------------------------------------------------------------- denoiser


def test_flow_denoiser_scalings_and_inputs():
    seen = []

    def net(x_in, t, ctx):
        seen.append((x_in, t))
        return torch.tanh(x_in) * 0.7 + ctx

    x = torch.randn(2, 3, generator=torch.Generator().manual_seed(0), dtype=F64)
    ctx = torch.tensor([[0.1], [0.2]], dtype=F64)
    d = samplers.make_denoiser(net, "flow", ctx)
    assert d.prediction == "flow"
    for sigma in (torch.tensor(0.6, dtype=F64), 0.6, torch.tensor([0.6, 0.25], dtype=F64)):
        out = d(x, sigma)
        x_in, t = seen[-1]
        s = torch.as_tensor(sigma, dtype=F64).reshape(-1, 1)
        assert torch.equal(x_in, x)                                  # no c_in scaling
        assert torch.allclose(t, (s * 1000).reshape(-1).expand(2), rtol=0, atol=1e-12)
        assert torch.allclose(out, x - s * net(x, t, ctx), rtol=0, atol=1e-15)
    c_skip, c_out, c_in = samplers.get_scalings(torch.tensor(0.4, dtype=F64), "flow")
    assert (c_skip.item(), c_out.item(), c_in.item()) == (1.0, -0.4, 1.0)
    # float32 latents get float32 timesteps, as for eps/v.
    d(x.float(), 0.5)
    assert seen[-1][1].dtype == torch.float32


@pytest.mark.parametrize("share_latent", [False, True])
def test_guidance_on_the_velocity_is_guidance_on_D(share_latent):
    net = ToyVelocity()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 4, 8, 8, generator=g, dtype=F64)
    cond, uncond = torch.randn(1, 8, generator=g, dtype=F64), torch.randn(1, 8, generator=g, dtype=F64)
    scale = 4.5
    guided = samplers.make_denoiser(net, "flow", cond, uncond, scale, share_latent=share_latent)
    d_c = samplers.make_denoiser(net, "flow", cond)
    d_u = samplers.make_denoiser(net, "flow", uncond)
    for sigma in (1.0, 0.37):
        s = torch.tensor(sigma, dtype=F64)
        want = d_u(x, s) + scale * (d_c(x, s) - d_u(x, s))
        assert rel_err(guided(x, s), want) <= 1e-13


def test_skip_layer_guidance_adds_its_term_inside_its_window_only():
    # D = D_u + cfg·(D_c − D_u) + slg·(D_c − D_w) at the steps i with N·start < i < N·stop, D_w being the weakened
    # network's conditional estimate; elsewhere plain CFG, and without guidance nothing at all.
    net, weak = ToyVelocity(), ToyVelocity(seed=5)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1, 4, 8, 8, generator=g, dtype=F64)
    cond, uncond = torch.randn(1, 8, generator=g, dtype=F64), torch.randn(1, 8, generator=g, dtype=F64)
    sigmas = samplers.flow_sigmas(10, shift=3.0)
    window = samplers.skip_layer_window(sigmas, 0.01, 0.2)
    assert window == (sigmas[1], sigmas[1])                   # 10 steps: 0.1 < i < 2, i.e. step 1 alone
    assert samplers.skip_layer_window(sigmas, 0.3, 0.35) is None and samplers.skip_layer_window(sigmas, 0, 1)[1] == sigmas[9]
    window = samplers.skip_layer_window(sigmas, 0.01, 0.5)    # steps 1-4
    d = samplers.make_denoiser(net, "flow", cond, uncond, 4.5, slg=(weak, 3.0, window))
    plain = samplers.make_denoiser(net, "flow", cond, uncond, 4.5)
    d_c, d_w = samplers.make_denoiser(net, "flow", cond), samplers.make_denoiser(weak, "flow", cond)
    for i, sigma in enumerate(sigmas[:-1]):
        want = plain(x, sigma) + (3.0 * (d_c(x, sigma) - d_w(x, sigma)) if 1 <= i <= 4 else 0)
        assert rel_err(d(x, sigma), want) <= 1e-13, i
    off = samplers.make_denoiser(net, "flow", cond, uncond, 1.0, slg=(weak, 3.0, window))
    assert torch.equal(off(x, sigmas[2]), d_c(x, sigmas[2]))


# ------------------------------------------------------------------------ euler against diffusers


class ToyVelocity:
    """A fixed small network v(x, t, ctx): two 3×3 convolutions with a sinusoidal time embedding and a
    context projection, on [B, 4, H, W]. Takes x of B rows against t/ctx of 2B (share_latent)."""

    def __init__(self, ch=4, hidden=16, ctx_dim=8, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.w1 = torch.randn(hidden, ch, 3, 3, generator=g, dtype=F64) * 0.15
        self.w2 = torch.randn(ch, hidden, 3, 3, generator=g, dtype=F64) * 0.1
        self.freqs = torch.randn(hidden, generator=g, dtype=F64) * 3
        self.wc = torch.randn(ctx_dim, hidden, generator=g, dtype=F64) * 0.3
        self.calls = 0

    def __call__(self, x, t, ctx):
        self.calls += 1
        if x.shape[0] != t.shape[0]:
            x = x.repeat(t.shape[0] // x.shape[0], 1, 1, 1)
        dt = x.dtype
        emb = torch.sin(t.to(dt)[:, None] / 1000 * self.freqs.to(dt) + 0.5)
        h = F.conv2d(x, self.w1.to(dt), padding=1) + (emb + ctx.to(dt) @ self.wc.to(dt))[:, :, None, None]
        return F.conv2d(F.silu(h), self.w2.to(dt), padding=1) + 0.8 * x - 0.2


def diffusers_loop(sched, net, latents, cond, uncond=None, scale=1.0, begin=None):
    """The sampling loop of diffusers' StableDiffusion3Pipeline / FluxPipeline: timesteps from the
    scheduler, guidance on the network's velocities, scheduler.step."""
    timesteps = sched.timesteps if begin is None else sched.timesteps[begin:]
    if begin is not None:
        sched.set_begin_index(begin)
    traj = []
    for t in timesteps:
        traj.append(latents)
        if uncond is None:
            v = net(latents, t.expand(latents.shape[0]), cond)
        else:
            out = net(torch.cat([latents, latents]), t.expand(2 * latents.shape[0]), torch.cat([uncond, cond]))
            v_u, v_c = out.chunk(2)
            v = v_u + scale * (v_c - v_u)
        latents = sched.step(v, t, latents, return_dict=False)[0]
    return latents, traj


SCHEDULES = {
    "sd3-28": (lambda: samplers.flow_sigmas(28, 3.0), lambda: (sd3_scheduler(3.0), {"num_inference_steps": 28})),
    "shift1-4": (lambda: samplers.flow_sigmas(4, 1.0), lambda: (sd3_scheduler(1.0), {"num_inference_steps": 4})),
    # A 16×16 latent in 2×2 patches: 64 tokens (mu extrapolated below base_seq_len).
    "flux-20": (lambda: samplers.flux_sigmas(20, 64),
                lambda: (flux_scheduler(), {"num_inference_steps": 20, "sigmas": np.linspace(1.0, 1 / 20, 20),
                                            "mu": calculate_shift(64, 256, 4096, 0.5, 1.15)})),
}


@pytest.mark.parametrize("guidance", [None, 4.5, "shared"])
@pytest.mark.parametrize("schedule", list(SCHEDULES))
def test_euler_equals_diffusers_flow_match_euler(schedule, guidance):
    ours_sigmas, make_ref = SCHEDULES[schedule]
    sched, kw = make_ref()
    sched.set_timesteps(**kw)
    net = ToyVelocity()
    g = torch.Generator().manual_seed(5)
    noise = torch.randn(1, 4, 16, 16, generator=g)
    cond, uncond = torch.randn(1, 8, generator=g), torch.randn(1, 8, generator=g)
    guided = guidance is not None
    scale = 4.5 if guided else 1.0
    ref, ref_traj = diffusers_loop(sched, net, noise.clone(), cond, uncond if guided else None, scale)

    sigmas = ours_sigmas()
    denoise = samplers.make_denoiser(net, "flow", cond, uncond if guided else None, scale,
                                     share_latent=guidance == "shared")
    x = samplers.add_noise(noise, sigmas[0], "flow")
    assert torch.equal(x, noise)                         # σ_max = 1: the start is ε itself
    traj = []
    out = samplers.get_sampler("euler", "flow")(denoise, x, sigmas, callback=lambda i, s, xi, d: traj.append(xi))
    assert out.dtype == torch.float32 and len(traj) == len(ref_traj) == len(sigmas) - 1
    for a, b in zip(traj, ref_traj):
        assert rel_err(a, b) <= 2e-6
    assert rel_err(out, ref) <= 2e-6
    # In float64 the two agree to float32 rounding, the precision diffusers' step works in.
    out64 = samplers.SAMPLERS["euler"](denoise, x.double(), sigmas)
    assert rel_err(out64, ref) <= 2e-6


# ----------------------------------------------------------------------------------------- img2img


@pytest.mark.parametrize("strength", [1.0, 0.75, 0.5, 0.2])
def test_img2img_start_and_run_match_diffusers(strength):
    n = 20
    full = samplers.flow_sigmas(n, 3.0)
    sigmas = samplers.img2img_sigmas(full, strength)
    start = n + 1 - len(sigmas)
    g = torch.Generator().manual_seed(7)
    x0, noise = torch.randn(1, 4, 16, 16, generator=g), torch.randn(1, 4, 16, 16, generator=g)
    cond = torch.randn(1, 8, generator=g)

    x = samplers.add_noise(noise, sigmas[0], "flow", latent=x0)
    s0 = sigmas[0].item()
    assert torch.allclose(x, (1 - s0) * x0 + s0 * noise, rtol=0, atol=1e-6)
    assert not torch.allclose(x, x0 + s0 * noise, atol=1e-2)        # not the eps models' rule
    if strength == 1.0:
        assert torch.equal(x, noise)

    sched = sd3_scheduler(3.0)
    sched.set_timesteps(n)
    sched.set_begin_index(start)       # as StableDiffusion3Img2ImgPipeline does with its t_start
    ref_x = sched.scale_noise(x0, sched.timesteps[start:start + 1], noise)
    assert rel_err(x, ref_x) <= 1e-6

    net = ToyVelocity(seed=3)
    ref, _ = diffusers_loop(sched, net, ref_x, cond, begin=start)
    out = samplers.SAMPLERS["euler"](samplers.make_denoiser(net, "flow", cond), x, sigmas)
    assert rel_err(out, ref) <= 2e-6


def test_add_noise_eps_rule_unchanged():
    g = torch.Generator().manual_seed(8)
    x0, z = torch.randn(2, 3, generator=g), torch.randn(2, 3, generator=g)
    s = samplers.get_sigmas("karras", 10)[3]
    for pred in ("eps", "v"):
        assert torch.equal(samplers.add_noise(z, s, pred, latent=x0), x0 + z * s)
        assert torch.equal(samplers.add_noise(z, s, pred), z * s)
    with pytest.raises(ValueError):
        samplers.add_noise(z, s, "x0")


# ---------------------------------------------------------------- the samplers on Gaussian flow data


def gaussian_flow_D(mu=MU, s=S):
    """The exact D = E[x₀ | x] for x₀ ~ N(μ, s²) and x = (1 - σ)·x₀ + σ·ε."""
    def denoise(x, sigma):
        sig = float(sigma)
        return mu + (1 - sig) * s ** 2 / ((1 - sig) ** 2 * s ** 2 + sig ** 2) * (x - (1 - sig) * mu)
    return denoise


def flow_std(sigma, s=S):
    return math.sqrt((1 - sigma) ** 2 * s ** 2 + sigma ** 2)


def exact_flow_ode(x_a, a, b, mu=MU):
    # The ODE moves the deviation from the mean (1 - σ)μ in proportion to the marginal std.
    return (1 - b) * mu + flow_std(b) / flow_std(a) * (x_a - (1 - a) * mu)


def fitted_order(ns, errs):
    lx, ly = [math.log(n) for n in ns], [math.log(e) for e in errs]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    return -sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / sum((a - mx) ** 2 for a in lx)


def ode_error(name, n, **kw):
    # The SD3 schedule without its last step to 0: that step starts from a level (0.0089) that does
    # not shrink with N, and would add the same error at every N.
    sig = samplers.flow_sigmas(n, 3.0)[:-1]
    x = torch.tensor([1.3], dtype=F64)
    out = samplers.get_sampler(name, "flow")(gaussian_flow_D(), x, sig, **kw)
    return abs(out.item() - exact_flow_ode(1.3, 1.0, sig[-1].item()))


@pytest.mark.parametrize("name,kw,expected", [(n, {}, 1.0 if n == "euler" else 2.0) for n in DETERMINISTIC]
                         + [("euler_a", {"eta": 0.0}, 1.0), ("dpm++2s_a", {"eta": 0.0}, 2.0)])
def test_deterministic_orders_on_flow(name, kw, expected):
    ns = (64, 128, 256)
    assert abs(fitted_order(ns, [ode_error(name, n, **kw) for n in ns]) - expected) <= 0.25


def test_constant_velocity_is_exact():
    # A straight path (D constant) is followed exactly by every ODE sampler, down to σ = 0.
    mu = torch.tensor([0.3, -1.2, 2.0], dtype=F64)
    eps = torch.tensor([0.5, 1.0, -0.7], dtype=F64)
    sig = samplers.flow_sigmas(9, 3.0)
    for name in DETERMINISTIC + ["euler_a", "dpm++2s_a"]:
        kw = {"eta": 0.0} if name in samplers.ANCESTRAL else {}
        seen = []
        out = samplers.get_sampler(name, "flow")(lambda x, s: mu.clone(), eps.clone(), sig,
                                                 callback=lambda i, s, x, d: seen.append(x), **kw)
        for i, x in enumerate(seen):
            assert (x - ((1 - sig[i]) * mu + sig[i] * eps)).abs().max().item() <= 1e-12, (name, i)
        assert (out - mu).abs().max().item() <= 1e-12


def test_dpmpp_2m_v2_fails_on_flow_and_is_refused():
    # Its mean-log-step weights are inconsistent on a flow schedule: no convergence.
    sig = samplers.flow_sigmas(256, 3.0)[:-1]
    out = samplers.SAMPLERS["dpm++2mv2"](gaussian_flow_D(), torch.tensor([1.3], dtype=F64), sig)
    assert abs(out.item() - exact_flow_ode(1.3, 1.0, sig[-1].item())) > 0.1
    assert ode_error("dpm++2m", 256) < 1e-3
    with pytest.raises(ValueError, match="dpm\\+\\+2m"):
        samplers.get_sampler("dpm++2mv2", "flow")
    d = samplers.make_denoiser(lambda x, t, c: x * 0, "flow")
    with pytest.raises(ValueError):
        samplers.SAMPLERS["dpm++2mv2"](d, torch.ones(3), sig)
    assert set(samplers.FLOW_UNSUPPORTED) == {"dpm++2mv2"}
    assert samplers.get_sampler("dpm++2mv2", "eps") is samplers.SAMPLERS["dpm++2mv2"]


def exact_law(sampler, sig, **kw):
    """(mean, std) of x after each step (and at the end), computed exactly: D is affine, so each step
    is affine in x and in the noise draws; column 0 carries the initial deviation, column k the k-th
    draw, the last column the mean path (sampler run on basis inputs, as samplers/orders.py does)."""
    n = len(sig) - 1
    x = torch.zeros(n + 2, dtype=F64)
    x[:] = (1 - sig[0].item()) * MU
    x[0] += flow_std(sig[0].item())
    draws = iter(range(1, n + 1))

    def noise():
        z = torch.zeros_like(x)
        z[next(draws)] = 1
        return z

    traj = []
    out = sampler(gaussian_flow_D(), x, sig, noise=noise, callback=lambda i, s, xi, d: traj.append(xi), **kw)
    traj.append(out)
    return [(xi[-1].item(), (xi[:-1] - xi[-1]).pow(2).sum().sqrt().item()) for xi in traj]


@pytest.mark.parametrize("name,eta,order", [("euler_a", 1.0, 1.0), ("euler_a", 0.5, 1.0),
                                            ("dpm++2s_a", 1.0, 1.5), ("dpm++2s_a", 0.5, 1.5)])
def test_ancestral_flow_samplers_converge_in_law(name, eta, order):
    ns = (32, 64, 128)
    errs = []
    for n in ns:
        sig = samplers.flow_sigmas(n, 3.0)
        law = exact_law(samplers.get_sampler(name, "flow"), sig, eta=eta)
        for i, (m, sd) in enumerate(law):
            s = sig[i].item()
            assert abs(m - (1 - s) * MU) <= 1e-12                   # the mean is exact
            assert abs(sd - flow_std(s)) <= 0.15                     # every marginal close to the truth
        errs.append(abs(law[-1][1] - S))
    assert errs[0] > errs[1] > errs[2]
    assert fitted_order(ns, errs) >= order - 0.2


def test_eps_renoising_is_wrong_for_flow():
    # Why the ancestral samplers need flow=True: the eps rule x + σ_up·z gives a flow latent too much
    # noise, and the error does not go away with more steps.
    errs = []
    for n in (32, 128):
        law = exact_law(samplers.SAMPLERS["euler_a"], samplers.flow_sigmas(n, 3.0))
        errs.append(abs(law[-1][1] - S))
    assert min(errs) > 0.1


def mlp_flow_denoiser(dim, seed=0, hidden=16):
    w1, b1, u, w2 = random_mlp(dim, hidden, seed)

    def denoise(x, sigma):
        s = float(sigma)
        x64 = x.to(F64)
        v = torch.tanh(x64 @ w1 + b1 + s * u) @ w2 + 0.5 * x64
        return (x64 - s * v).to(x.dtype)
    return denoise


def comfy_rf_reference(name, D, x, sigmas, zs, eta=1.0):
    """ComfyUI's euler_ancestral_RF / dpmpp_2s_ancestral_RF and its lcm with CONST noise scaling,
    written out on python floats."""
    sig = [float(s) for s in sigmas]
    zs = iter(zs)
    traj = []
    for i in range(len(sig) - 1):
        s, s1 = sig[i], sig[i + 1]
        traj.append(x)
        Di = D(x, s)
        if name == "lcm":
            x = (1 - s1) * Di + s1 * next(zs) if s1 > 0 else Di
            continue
        sd = s1 * (1 + (s1 / s - 1) * eta)
        a1, ad = 1 - s1, 1 - sd
        renoise = math.sqrt(s1 ** 2 - sd ** 2 * a1 ** 2 / ad ** 2)
        if s1 == 0:
            x = Di
            continue
        if name == "euler_a":
            x = (sd / s) * x + (1 - sd / s) * Di
        else:
            if s == 1.0:
                ss = 0.9999
            else:
                lam_i, lam_d = math.log((1 - s) / s), math.log((1 - sd) / sd)
                ss = 1 / (math.exp(lam_i + (lam_d - lam_i) / 2) + 1)
            u = (ss / s) * x + (1 - ss / s) * Di
            x = (sd / s) * x + (1 - sd / s) * D(u, ss)
        x = (a1 / ad) * x + renoise * next(zs)
    return traj, x


@pytest.mark.parametrize("name,eta", [("euler_a", 1.0), ("euler_a", 0.5), ("dpm++2s_a", 1.0), ("dpm++2s_a", 0.5),
                                      ("lcm", None)])
@pytest.mark.parametrize("grid", ["sd3", "flux", "img2img"])
def test_ancestral_flow_steps_are_comfyuis(name, eta, grid):
    sig = {"sd3": lambda: samplers.flow_sigmas(10, 3.0), "flux": lambda: samplers.flux_sigmas(7, 4096),
           "img2img": lambda: samplers.img2img_sigmas(samplers.flow_sigmas(12, 3.0), 0.6)}[grid]()
    d = mlp_flow_denoiser(8, seed=31)
    g = torch.Generator().manual_seed(32)
    x0 = torch.randn(2, 8, generator=g, dtype=F64)
    zs = [torch.randn(2, 8, generator=g, dtype=F64) for _ in range(len(sig))]
    it = iter(zs)
    kw = {} if name == "lcm" else {"eta": eta}
    traj = []
    out = samplers.get_sampler(name, "flow")(d, x0, sig, noise=lambda: next(it),
                                             callback=lambda i, s, x, den: traj.append(x), **kw)
    ref_traj, ref = comfy_rf_reference(name, d, x0, sig, zs, eta)
    assert len(traj) == len(ref_traj)
    for a, b in zip(traj, ref_traj):
        assert (a - b).abs().max().item() <= 1e-12
    assert (out - ref).abs().max().item() <= 1e-12


def test_get_ancestral_step_flow():
    s, s1 = torch.tensor(0.8, dtype=F64), torch.tensor(0.5, dtype=F64)
    down, up, scale = samplers.get_ancestral_step_flow(s, s1, 0.0)
    assert (down.item(), up.item(), scale.item()) == (0.5, 0.0, 1.0)
    down, up, scale = samplers.get_ancestral_step_flow(s, s1, 1.0)
    assert down.item() == pytest.approx(0.5 ** 2 / 0.8, abs=1e-15)
    # Back at level σ': the noise std after rescaling plus the fresh noise make σ'.
    assert ((scale * down) ** 2 + up ** 2).item() == pytest.approx(0.25, abs=1e-15)
    assert scale.item() == pytest.approx(0.5 / (1 - 0.5 ** 2 / 0.8), abs=1e-15)
    # eta > 1 clamps σ_down at 0: jump to D, then all the noise is fresh.
    down, up, scale = samplers.get_ancestral_step_flow(s, s1, 5.0)
    assert (down.item(), up.item(), scale.item()) == (0.0, 0.5, 0.5)


@pytest.mark.parametrize("name", samplers.ANCESTRAL)
def test_flow_flag_guard_and_draws(name):
    n = 6
    sig = samplers.flow_sigmas(n, 3.0)
    flow_d = samplers.make_denoiser(lambda x, t, c: 0.5 * x, "flow")
    eps_d = samplers.make_denoiser(lambda x, t, c: 0.5 * x, "eps")
    x = torch.ones(4, dtype=F64)
    with pytest.raises(ValueError, match="flow"):
        samplers.SAMPLERS[name](flow_d, x, sig)
    with pytest.raises(ValueError, match="flow"):
        samplers.SAMPLERS[name](eps_d, x, samplers.get_sigmas("karras", n), flow=True)
    with pytest.raises(ValueError, match="levels"):
        samplers.SAMPLERS[name](lambda x, s: x, x, samplers.get_sigmas("karras", n), flow=True)
    calls, draws = [], []

    def d(x, s):
        calls.append(s)
        return flow_d(x, s)

    def noise():
        draws.append(1)
        return torch.zeros(4, dtype=F64)

    samplers.get_sampler(name, "flow")(d, x, sig, noise=noise)
    assert len(calls) == (2 * n - 1 if name == "dpm++2s_a" else n)
    assert len(draws) == n - 1


def test_get_sampler_for_flow():
    for name in samplers.SAMPLERS:
        if name in samplers.FLOW_UNSUPPORTED:
            continue
        fn = samplers.get_sampler(name, "flow")
        if name in samplers.ANCESTRAL:
            assert fn.func is samplers.SAMPLERS[name] and fn.keywords == {"flow": True}
        else:
            assert fn is samplers.SAMPLERS[name]
        for pred in (None, "eps", "v"):
            assert samplers.get_sampler(name, pred) is samplers.SAMPLERS[name]
    with pytest.raises(ValueError):
        samplers.get_sampler("euler", "x0")
    assert "flow" in samplers.PREDICTIONS


def test_flow_euler_a_eta0_is_euler_and_float32_stays_float32():
    sig = samplers.flow_sigmas(8, 3.0)
    d = mlp_flow_denoiser(8, seed=41)
    x = torch.randn(2, 8, generator=torch.Generator().manual_seed(42), dtype=F64)
    a = samplers.get_sampler("euler_a", "flow")(d, x, sig, eta=0.0, noise=torch.Generator().manual_seed(1))
    b = samplers.SAMPLERS["euler"](d, x, sig)
    assert (a - b).abs().max().item() <= 1e-12
    for name in samplers.SAMPLERS:
        if name in samplers.FLOW_UNSUPPORTED:
            continue
        out = samplers.get_sampler(name, "flow")(d, x.float(), sig, noise=torch.Generator().manual_seed(1))
        assert out.dtype == torch.float32 and torch.isfinite(out).all()
