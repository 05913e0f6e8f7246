"""samplers/ against closed forms and against the step formulas of docs/research.md (The samplers) re-derived here in float64:
convergence orders on Gaussian data, exactness with a constant denoiser, the last step to σ = 0,
the laws of the ancestral samplers (Monte Carlo), the four samplers k-diffusion lacks step by
step, NFE counts, names, img2img slicing and dtypes."""
import math

import pytest
import torch

import samplers
from samplers import orders
from tiny_models import random_mlp

F64 = torch.float64
ALL = ["euler", "euler_a", "heun", "dpm2", "dpm++2s_a", "dpm++2m", "dpm++2mv2", "ipndm", "ipndm_v", "lcm"]
MU, S = 0.3, 0.8


def gaussian_D(mu=MU, s=S):
    return lambda x, sigma: mu + s ** 2 / (s ** 2 + sigma ** 2) * (x - mu)


def mlp_denoiser(dim, seed=0, hidden=16):
    w1, b1, u, w2 = random_mlp(dim, hidden, seed)

    def denoise(x, sigma):
        s = float(sigma)
        flat = x.reshape(x.shape[0], -1).to(F64)
        x_in = flat / math.sqrt(s * s + 1)
        eps = torch.tanh(x_in @ w1 + b1 + math.log(s) * u) @ w2 + 0.5 * x_in
        return (flat - s * eps).reshape(x.shape).to(x.dtype)
    return denoise


def uniform_sigma(n):
    return torch.linspace(samplers.SIGMA_MAX, samplers.SIGMA_MIN, n, dtype=F64)


def irregular_grid():
    # Steps of very different sizes, ending in 0: no schedule's regularity to lean on.
    return torch.tensor([14.0, 9.5, 9.0, 4.0, 2.5, 2.4, 0.9, 0.3, 0.2, 0.05, 0.0], dtype=F64)


# --------------------------------------------------------------------------- convergence orders


def measured_order(name, grid_fn, ns, **kw):
    errs = []
    for n in ns:
        sig = grid_fn(n)
        x = samplers.SAMPLERS[name](gaussian_D(), torch.tensor([sig[0].item()], dtype=F64), sig, **kw)
        # Closed-form probability-flow ODE solution, started at x_T = σ_max.
        x_T, a, b = sig[0].item(), sig[0].item(), sig[-1].item()
        exact = MU + (x_T - MU) * math.sqrt((S ** 2 + b ** 2) / (S ** 2 + a ** 2))
        errs.append(abs(x.item() - exact))
    lx = [math.log(n) for n in ns]
    ly = [math.log(e) for e in errs]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    return -sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / sum((a - mx) ** 2 for a in lx)


def karras(n):
    return samplers.get_sigmas("karras", n)[:-1]


def exponential(n):
    return samplers.get_sigmas("exponential", n)[:-1]


NS = (128, 256, 512, 1024)


@pytest.mark.parametrize("name,kw,expected,tol", [
    ("euler", {}, 1.0, 0.1),
    ("heun", {}, 2.0, 0.15),
    ("dpm2", {}, 2.0, 0.15),
    ("dpm++2m", {}, 2.0, 0.15),
    ("dpm++2s_a", {"eta": 0.0}, 2.0, 0.15),
    # Reproduced as is: first order off log-uniform grids (docs/research.md, Convergence orders).
    ("dpm++2mv2", {}, 1.0, 0.15),
])
def test_order_on_karras(name, kw, expected, tol):
    assert abs(measured_order(name, karras, NS, **kw) - expected) <= tol


@pytest.mark.parametrize("name", ["ipndm", "ipndm_v"])
def test_ipndm_orders(name):
    assert measured_order(name, karras, NS) >= 1.9
    assert measured_order(name, uniform_sigma, (256, 512, 1024, 2048)) >= 3.5


def test_dpmpp_2m_v2_is_second_order_on_exponential():
    assert abs(measured_order("dpm++2mv2", exponential, NS) - 2.0) <= 0.15


@pytest.mark.parametrize("steps", [3, 10, 30])
def test_dpmpp_2m_v2_equals_2m_on_exponential(steps):
    d = mlp_denoiser(8, seed=steps)
    sig = samplers.get_sigmas("exponential", steps)
    x0 = torch.randn(3, 8, generator=torch.Generator().manual_seed(steps), dtype=F64) * sig[0]
    a = samplers.SAMPLERS["dpm++2m"](d, x0, sig)
    b = samplers.SAMPLERS["dpm++2mv2"](d, x0, sig)
    assert (a - b).abs().max().item() <= 1e-12
    # ...and not on karras, where the two differ by a first-order term.
    sig = samplers.get_sigmas("karras", steps)
    x0 = x0 / x0.abs().max() * sig[0]
    a = samplers.SAMPLERS["dpm++2m"](d, x0, sig)
    b = samplers.SAMPLERS["dpm++2mv2"](d, x0, sig)
    assert (a - b).abs().max().item() > 1e-6


def test_orders_cli_table(capsys):
    orders.main(["--steps", "64,128"])
    out = capsys.readouterr().out
    rows = {line.split("|")[1].strip(): line for line in out.splitlines() if line.startswith("| ") and "NFE" not in line}
    assert set(ALL) <= set(rows)
    karras_col = lambda name: float(rows[name].split("|")[4])
    assert abs(karras_col("euler") - 1.0) < 0.1
    assert abs(karras_col("heun") - 2.0) < 0.15
    # Ancestral rows report the weak order of the law; compare with the measurement above.
    assert abs(karras_col("euler_a") - 1.0) < 0.2


# ----------------------------------------------------------------------------- exactness, last step


GRIDS = {
    "karras": lambda: samplers.get_sigmas("karras", 12),
    "discrete": lambda: samplers.get_sigmas("discrete", 7),
    "irregular": irregular_grid,
}


@pytest.mark.parametrize("grid", list(GRIDS))
@pytest.mark.parametrize("name,kw", [("euler", {}), ("heun", {}), ("dpm2", {}), ("dpm++2m", {}),
                                     ("dpm++2s_a", {"eta": 0.0}), ("ipndm", {}), ("ipndm_v", {})])
def test_constant_denoiser_is_exact(name, kw, grid):
    sig = GRIDS[grid]()
    mu = torch.tensor([0.3, -1.2, 2.0], dtype=F64)
    x0 = torch.tensor([5.0, -3.0, 11.0], dtype=F64)
    seen = []
    out = samplers.SAMPLERS[name](lambda x, s: mu.clone(), x0, sig, callback=lambda i, s, x, d: seen.append(x), **kw)
    for i, x in enumerate(seen):
        exact = mu + (sig[i] / sig[0]) * (x0 - mu)
        assert (x - exact).abs().max().item() <= 1e-12 * 11
    assert (out - mu).abs().max().item() <= 1e-12


@pytest.mark.parametrize("name", ALL)
def test_last_step_to_zero(name):
    d = mlp_denoiser(8, seed=11)
    sig = samplers.get_sigmas("karras", 6)
    x0 = torch.randn(2, 8, generator=torch.Generator().manual_seed(12), dtype=F64) * sig[0]
    last = []
    out = samplers.SAMPLERS[name](d, x0, sig, noise=torch.Generator().manual_seed(13),
                                  callback=lambda i, s, x, den: last.append(den))
    D_last = last[-1]
    if name in ("ipndm", "ipndm_v"):
        # A choice (docs/research.md, The samplers): the multistep formula also runs on the last step.
        assert (out - D_last).abs().max().item() > 1e-6
    elif name in ("euler", "heun", "dpm2"):
        # An Euler step to σ = 0: x + (x - D)/σ·(0 - σ), D up to rounding.
        assert (out - D_last).abs().max().item() <= 1e-12
    else:
        assert torch.equal(out, D_last)


# --------------------------------------------------------------------------------- NFE, callback


@pytest.mark.parametrize("name", ALL)
def test_nfe_and_callback(name):
    n = 7
    sig = samplers.get_sigmas("karras", n)
    calls, cb, draws = [], [], []

    def d(x, s):
        calls.append(s)
        return 0.5 * x

    def noise():
        draws.append(1)
        return torch.zeros(4, dtype=F64)

    samplers.SAMPLERS[name](d, torch.ones(4, dtype=F64) * sig[0], sig, noise=noise,
                            callback=lambda i, s, x, den: cb.append((i, s.item())))
    expected = 2 * n - 1 if name in ("heun", "dpm2", "dpm++2s_a") else n
    assert len(calls) == expected
    assert cb == [(i, sig[i].item()) for i in range(n)]
    assert len(draws) == (n - 1 if name in ("euler_a", "dpm++2s_a", "lcm") else 0)


# ---------------------------------------------------------------------------- ancestral: Monte Carlo


def ancestral_split(s, s_next, eta):
    up = min(s_next, eta * math.sqrt(s_next ** 2 * (s ** 2 - s_next ** 2) / s ** 2))
    return math.sqrt(s_next ** 2 - up ** 2), up


def affine_coefficients(name, s, s_next, eta):
    """(K, σ_u) of x' - μ = K(x - μ) + σ_u·z for D linear (docs/research.md, Convergence orders)."""
    g = lambda sig: S ** 2 / (S ** 2 + sig ** 2)
    if s_next == 0:
        return g(s), 0.0
    if name == "lcm":
        return g(s), s_next
    s_d, s_u = ancestral_split(s, s_next, eta)
    if name == "euler_a":
        assert eta == 1.0
        return (S ** 2 + s_next ** 2) / (S ** 2 + s ** 2), s_u
    s_s = math.sqrt(s * s_d)
    return s_d / s + (1 - s_d / s) * g(s_s) * (s_s / s + (1 - s_s / s) * g(s)), s_u


@pytest.mark.parametrize("name,eta", [("euler_a", 1.0), ("dpm++2s_a", 1.0), ("dpm++2s_a", 0.5), ("lcm", None)])
def test_ancestral_law(name, eta):
    n_samples = 200_000
    sig = samplers.get_sigmas("karras", 6)
    gen = torch.Generator().manual_seed(21)
    x0 = torch.randn(n_samples, generator=gen, dtype=F64) * sig[0]
    seen = []
    kw = {} if eta is None else {"eta": eta}
    out = samplers.SAMPLERS[name](gaussian_D(), x0, sig, noise=gen,
                                  callback=lambda i, s, x, d: seen.append(x), **kw)
    seen.append(out)
    m, v = 0.0, sig[0].item() ** 2
    for i, x in enumerate(seen):
        tol_m = 5 * math.sqrt(v / n_samples)
        tol_v = 5 * v * math.sqrt(2 / (n_samples - 1))
        assert abs(x.mean().item() - m) <= tol_m, (i, x.mean().item(), m)
        assert abs(x.var().item() - v) <= tol_v, (i, x.var().item(), v)
        if i < len(sig) - 1:
            K, s_u = affine_coefficients(name, sig[i].item(), sig[i + 1].item(), eta)
            m, v = MU + K * (m - MU), K * K * v + s_u * s_u


# ------------------------------------------------------ re-derivations: dpm++2mv2, ipndm(_v), lcm


def rederived(name, D, x, sigmas, zs):
    """The samplers' step formulas (docs/research.md), written out on python floats / float64 tensors."""
    sig = [float(s) for s in sigmas]
    traj, Ds, ds = [], [], []
    zs = iter(zs)
    for i in range(len(sig) - 1):
        s, s1 = sig[i], sig[i + 1]
        traj.append(x)
        Di = D(x, s)
        if name == "lcm":
            x = Di + s1 * next(zs) if s1 > 0 else Di
        elif name == "dpm++2mv2":
            a = s1 / s
            if i == 0 or s1 == 0:
                x = a * x + (1 - a) * Di
            else:
                h = -math.log(s1) + math.log(s)
                h_last = -math.log(s) + math.log(sig[i - 1])
                r = max(h_last, h) / min(h_last, h)
                b = math.exp(-(h_last + h) / 2) - 1
                x = a * x - b * ((1 + 1 / (2 * r)) * Di - (1 / (2 * r)) * Ds[-1])
        else:
            ds.append((x - Di) / s)
            k, dt = min(4, i + 1), s1 - s
            d0 = ds[-1]
            if k == 1:
                x = x + dt * d0
            elif k == 2 and name == "ipndm_v":
                w = dt / (s - sig[i - 1])
                x = x + dt * ((1 + w / 2) * d0 - (w / 2) * ds[-2])
            elif k == 2:
                x = x + dt * (3 * d0 - ds[-2]) / 2
            elif k == 3:
                x = x + dt * (23 * d0 - 16 * ds[-2] + 5 * ds[-3]) / 12
            else:
                x = x + dt * (55 * d0 - 59 * ds[-2] + 37 * ds[-3] - 9 * ds[-4]) / 24
        Ds.append(Di)
    return traj, x


@pytest.mark.parametrize("grid", ["karras10", "discrete7", "irregular", "lcm4", "karras1"])
@pytest.mark.parametrize("name", ["dpm++2mv2", "ipndm", "ipndm_v", "lcm"])
def test_rederived_trajectory(name, grid):
    sig = {"karras10": lambda: samplers.get_sigmas("karras", 10),
           "discrete7": lambda: samplers.get_sigmas("discrete", 7),
           "irregular": irregular_grid,
           "lcm4": lambda: samplers.get_sigmas("lcm", 4),
           "karras1": lambda: samplers.get_sigmas("karras", 1)}[grid]()
    d = mlp_denoiser(8, seed=31)
    g = torch.Generator().manual_seed(32)
    x0 = torch.randn(2, 8, generator=g, dtype=F64) * sig[0]
    zs = [torch.randn(2, 8, generator=g, dtype=F64) for _ in range(len(sig))]
    traj = []
    it = iter(zs)
    out = samplers.SAMPLERS[name](d, x0, sig, noise=lambda: next(it), callback=lambda i, s, x, den: traj.append(x))
    ref_traj, ref = rederived(name, d, x0, sig, zs)
    assert len(traj) == len(ref_traj) == len(sig) - 1
    for x, rx in zip(traj, ref_traj):
        assert (x - rx).abs().max().item() <= 1e-10
    assert (out - ref).abs().max().item() <= 1e-10


# ------------------------------------------------------------------------------ interface details


def test_names_and_errors():
    assert list(samplers.SAMPLERS) == ALL
    assert samplers.SCHEDULERS == ("discrete", "karras", "exponential", "lcm")
    for bad in (lambda: samplers.SAMPLERS["dpm++3m"], lambda: samplers.get_sampler("ddim"),
                lambda: samplers.check_sampler("Euler"), lambda: samplers.default_scheduler("nope")):
        with pytest.raises(ValueError) as e:
            bad()
        assert isinstance(e.value, KeyError)
        assert all(n in str(e.value) for n in ALL)
    for bad in (lambda: samplers.get_sigmas("simple", 10), lambda: samplers.check_scheduler("ays")):
        with pytest.raises(ValueError) as e:
            bad()
        assert all(n in str(e.value) for n in samplers.SCHEDULERS)
    with pytest.raises(ValueError):
        samplers.get_sigmas("karras", 0)
    with pytest.raises(ValueError):
        samplers.make_denoiser(lambda *a: a[0], "x0")
    assert samplers.default_scheduler("lcm") == "lcm"
    assert {samplers.default_scheduler(n) for n in ALL if n != "lcm"} == {"discrete"}


@pytest.mark.parametrize("scheduler", ["discrete", "karras", "exponential", "lcm"])
@pytest.mark.parametrize("n", [1, 2, 4, 20, 50])
def test_schedule_shape(scheduler, n):
    sig = samplers.get_sigmas(scheduler, n)
    assert sig.shape == (n + 1,) and sig.dtype == F64 and sig[-1] == 0
    assert bool((sig[:-1] > sig[1:]).all())
    assert abs(sig[0].item() - samplers.SIGMA_MAX) < 1e-12
    if scheduler in ("discrete", "karras", "exponential") and n > 1:
        assert abs(sig[-2].item() - samplers.SIGMA_MIN) < 1e-12
    assert samplers.get_sigmas(scheduler, n, dtype=torch.float32).dtype == torch.float32


def test_lcm_schedule_timesteps():
    t = samplers.sigma_to_t(samplers.get_sigmas("lcm", 4)[:-1])
    assert (t - torch.tensor([999.0, 759.0, 499.0, 259.0], dtype=F64)).abs().max() < 1e-9
    t = samplers.sigma_to_t(samplers.get_sigmas("lcm", 50)[:-1])
    assert (t - torch.arange(999, 0, -20, dtype=F64)).abs().max() < 1e-9


@pytest.mark.parametrize("n,strength,start", [(20, 0.75, 4), (20, 1.0, 0), (20, 0.0, 19), (10, 0.55, 4),
                                              (4, 0.5, 1), (1, 1.0, 0), (1, 0.3, 0)])
def test_img2img_sigmas(n, strength, start):
    # t_enc = floor(N·strength) capped at N-1; keep sigmas[N - t_enc - 1:] (t_enc + 1 steps).
    sig = samplers.get_sigmas("discrete", n)
    kept = samplers.img2img_sigmas(sig, strength)
    assert torch.equal(kept, sig[start:])
    with pytest.raises(ValueError):
        samplers.img2img_sigmas(sig, 1.5)


@pytest.mark.parametrize("name", ALL)
def test_float32_latent_stays_float32(name):
    sig = samplers.get_sigmas("karras", 5)
    d64 = mlp_denoiser(8, seed=41)
    x64 = torch.randn(2, 8, generator=torch.Generator().manual_seed(42), dtype=F64) * sig[0]
    out32 = samplers.SAMPLERS[name](d64, x64.float(), sig, noise=torch.Generator().manual_seed(43))
    out64 = samplers.SAMPLERS[name](d64, x64, sig, noise=torch.Generator().manual_seed(43))
    assert out32.dtype == torch.float32
    # Same draws from a seeded generator in both dtypes, so the runs agree to float32 rounding.
    assert (out32.double() - out64).abs().max().item() <= 1e-3


def test_generator_noise_is_the_generators_sequence():
    sig = samplers.get_sigmas("lcm", 4)
    x0 = torch.zeros(3, 5, dtype=F64)
    g = torch.Generator().manual_seed(7)
    out = samplers.SAMPLERS["lcm"](lambda x, s: x * 0, x0, sig, noise=g)
    g2 = torch.Generator().manual_seed(7)
    # float32 draws whatever x's dtype, so that a seed means the same noise in every precision.
    zs = [torch.randn(3, 5, generator=g2).double() for _ in range(3)]
    # With D = 0 the last step returns D; the draws show in the trajectory instead.
    traj = []
    samplers.SAMPLERS["lcm"](lambda x, s: x * 0, x0, sig, noise=torch.Generator().manual_seed(7),
                             callback=lambda i, s, x, d: traj.append(x))
    for i in range(1, 4):
        assert torch.equal(traj[i], zs[i - 1] * sig[i])
    assert torch.equal(out, torch.zeros_like(out))
