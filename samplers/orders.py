"""Measured convergence orders of the ten samplers: `python -m samplers.orders`.

Data N(μ, s²) per coordinate (μ = 0.3, s = 0.8) has the exact denoiser D = μ + g(σ)(x - μ),
g = s²/(s²+σ²), and the probability-flow ODE has the closed form
x(σ_b) = μ + (x(σ_a) - μ)·sqrt((s²+σ_b²)/(s²+σ_a²)). Each sampler runs from x = σ_max down to
σ_min (the trailing 0 dropped: the discrete schedule and σ = 0 are not smooth) in float64; the
order is the least-squares slope of -log(error) against log N over N = 256…2048 by default. That
is the asymptotic range: below ~100 steps the higher-order terms still weigh on non-log-uniform
grids (a fit over N = 8…2048 gives e.g. 3.3 instead of 4.0 for ipndm on the uniform σ grid).

ODE samplers: error = |x_N - x(σ_min)|. Ancestral samplers (default eta) solve the SDE; with a
linear D every step is affine in (x, z), so the law of x_N is Gaussian and computed exactly
by running the sampler itself on basis inputs (one column for the initial deviation, one per
noise draw). They start from the exact marginal N(μ, s²+σ_max²) and the error is the distance
of the final standard deviation from the exact sqrt(s²+σ_min²) (the mean stays μ): a weak order.
"""
import argparse
import math

import torch

from .sampling import ANCESTRAL, NFE_PER_STEP, SAMPLERS
from .schedule import SIGMA_MAX, SIGMA_MIN, get_sigmas

MU, S = 0.3, 0.8
NS = (256, 512, 1024, 2048)
GRIDS = ("karras", "exponential", "uniform σ")


def gaussian_denoiser(mu=MU, s=S):
    def denoise(x, sigma):
        return mu + s ** 2 / (s ** 2 + sigma ** 2) * (x - mu)
    return denoise


def exact_ode(x_a, sigma_a, sigma_b, mu=MU, s=S):
    return mu + (x_a - mu) * math.sqrt((s ** 2 + sigma_b ** 2) / (s ** 2 + sigma_a ** 2))


def grid(kind, n):
    """n noise levels from σ_max to σ_min, no trailing 0."""
    if kind == "uniform σ":
        return torch.linspace(SIGMA_MAX, SIGMA_MIN, n, dtype=torch.float64)
    return get_sigmas(kind, n)[:-1]


def ode_error(name, sigmas, **kw):
    x = torch.tensor([SIGMA_MAX], dtype=torch.float64)
    x = SAMPLERS[name](gaussian_denoiser(), x, sigmas, **kw)
    return abs(x.item() - exact_ode(SIGMA_MAX, SIGMA_MAX, sigmas[-1].item()))


def law_error(name, sigmas, **kw):
    n_draws = len(sigmas) - 1
    # Column 0 carries the initial deviation (std of the exact marginal), column j+1 the j-th draw.
    x = torch.full((n_draws + 1,), MU, dtype=torch.float64)
    x[0] += math.sqrt(S ** 2 + sigmas[0].item() ** 2)
    draws = iter(range(1, n_draws + 1))

    def noise():
        z = torch.zeros_like(x)
        z[next(draws)] = 1
        return z

    x = SAMPLERS[name](gaussian_denoiser(), x, sigmas, noise=noise, **kw)
    std = (x - MU).pow(2).sum().sqrt().item()
    return abs(std - math.sqrt(S ** 2 + sigmas[-1].item() ** 2))


def slope(ns, errs):
    pts = [(math.log(n), math.log(e)) for n, e in zip(ns, errs) if e > 0]
    if len(pts) < 2:
        return float("nan")
    mx = sum(p[0] for p in pts) / len(pts)
    my = sum(p[1] for p in pts) / len(pts)
    return -sum((a - mx) * (b - my) for a, b in pts) / sum((a - mx) ** 2 for a, _ in pts)


def measure(name, kind, ns=NS, **kw):
    err = law_error if name in ANCESTRAL and kw.get("eta", 1) != 0 else ode_error
    return slope(ns, [err(name, grid(kind, n), **kw) for n in ns])


ROWS = [(name, {}) for name in SAMPLERS] + [("dpm++2s_a", {"eta": 0.0})]


def order_table(ns=NS):
    return [(name, kw, {kind: measure(name, kind, ns, **kw) for kind in GRIDS}) for name, kw in ROWS]


def markdown(table, ns=NS):
    lines = [f"Measured order (slope of -log error vs log N, N = {ns[0]}…{ns[-1]}, Gaussian data, float64)",
             "",
             "| sampler | NFE/step | error measured | " + " | ".join(GRIDS) + " |",
             "|---|---|---|" + "---|" * len(GRIDS)]
    for name, kw, orders in table:
        label = name + "".join(f" ({k} {v:g})" for k, v in kw.items())
        what = "law (std), weak" if name in ANCESTRAL and kw.get("eta", 1) != 0 else "ODE, pathwise"
        lines.append(f"| {label} | {NFE_PER_STEP[name]} | {what} | "
                     + " | ".join(f"{orders[k]:.2f}" for k in GRIDS) + " |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", default=",".join(map(str, NS)),
                   help="comma-separated step counts N to fit over (default %(default)s)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    ns = tuple(sorted(int(n) for n in args.steps.split(",")))
    print(markdown(order_table(ns), ns))


if __name__ == "__main__":
    main()
