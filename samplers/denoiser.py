"""The UNet as a denoiser D(x, σ), with classifier-free guidance (docs/core.md, "The denoiser" and "Classifier-free guidance").

Three parameterisations of the network output F (`prediction`):

- "eps": F predicts the noise ε of x = x₀ + σ·ε (after scaling x by c_in = 1/sqrt(σ² + 1), which
  turns it into the VP latent the UNet was trained on); D = x - σ·F. Timestep: sigma_to_t(σ).
- "v": F predicts v = α·ε - s·x₀ of the VP latent (α = 1/sqrt(σ² + 1), s = σ·α);
  D = x/(σ² + 1) - σ·α·F. Timestep: sigma_to_t(σ).
- "flow" (rectified flow: SD3/SD3.5, FLUX): the latent is x = (1 - σ)·x₀ + σ·ε with σ ∈ [0, 1] and
  F predicts the velocity v = ε - x₀, so x₀ = x - σ·v: D = x - σ·F. The network takes x as it is
  (c_in = 1) and the timestep flow_sigma_to_t(σ) = 1000·σ. (x - D)/σ = F: the samplers' slope is
  the velocity (schedule.py, "rectified flow").
"""
import torch

from .schedule import check_name, flow_sigma_to_t, sigma_to_t

PREDICTIONS = ("eps", "v", "flow")
_TIMESTEP = {"eps": sigma_to_t, "v": sigma_to_t, "flow": flow_sigma_to_t}


def get_scalings(sigma, prediction="eps"):
    """(c_skip, c_out, c_in) such that D = c_skip·x + c_out·F(c_in·x, t(σ)); σ_data = 1.

    "flow": (1, -σ, 1), i.e. D = x - σ·v on the unscaled latent.
    """
    check_name("prediction type", prediction, PREDICTIONS)
    if prediction == "flow":
        one = sigma * 0 + 1
        return one, -sigma, one
    c_in = 1 / (sigma ** 2 + 1) ** 0.5
    if prediction == "eps":
        return sigma * 0 + 1, -sigma, c_in
    return 1 / (sigma ** 2 + 1), -sigma * c_in, c_in


def add_noise(noise, sigma, prediction="eps", latent=None):
    """The latent at level σ: `latent` (a clean or partly clean x₀; None for txt2img, i.e. zeros) noised by `noise` (ε).

    - "eps", "v": latent + σ·ε (k-diffusion's VE coordinates; txt2img starts from σ_max·ε).
    - "flow": (1 - σ)·latent + σ·ε; txt2img starts at σ = 1, i.e. from ε itself, and img2img from
      (1 - σ₀)·x₀ + σ₀·ε (diffusers' FlowMatchEulerDiscreteScheduler.scale_noise).
    `sigma` is a python float or a 0-dim tensor (float64 from the schedules keeps ε's dtype).
    """
    check_name("prediction type", prediction, PREDICTIONS)
    x = noise * sigma
    if latent is None:
        return x
    return x + (latent * (1 - sigma) if prediction == "flow" else latent)


def _cat(a, b):
    # Conditioning may be a tensor or a dict / tuple of tensors (SDXL's pooled vector, ControlNet
    # hints, ...): every tensor is batched along dim 0.
    if torch.is_tensor(a):
        return torch.cat([a, b])
    if isinstance(a, dict):
        return {k: _cat(a[k], b[k]) for k in a}
    if isinstance(a, (tuple, list)):
        return type(a)(_cat(u, v) for u, v in zip(a, b))
    return a


GUIDANCE_OFF = (0, 1)


def uses_guidance(cfg_scale) -> bool:
    """Whether a guidance scale needs the unconditional pass. At 1 the formula is the conditional output
    alone; 0 is read as diffusers and SDXL-Turbo's model card use it, "guidance off" (the conditional
    output), not as the unconditional image the formula would give."""
    return cfg_scale not in GUIDANCE_OFF


def skip_layer_window(sigmas, start, stop):
    """The noise levels (σ_high, σ_low) over which skip-layer guidance acts in a run over ``sigmas`` (N steps): those
    of the steps i with N·start < i < N·stop, diffusers' SD3 rule (i counted from 0; stable-diffusion.cpp counts
    from 1, so its window starts and ends one step earlier). None when no step falls inside."""
    n = len(sigmas) - 1
    inside = [i for i in range(n) if n * start < i < n * stop]
    return (sigmas[inside[0]], sigmas[inside[-1]]) if inside else None


def make_denoiser(unet_fn, prediction="eps", cond=None, uncond=None, cfg_scale=7.0, share_latent=False, slg=None):
    """Wrap `unet_fn(x_in, t, ctx) -> F` (eps, v or flow velocity) as `denoise(x, sigma) -> D`.

    - x_in = c_in·x (x itself for "flow"); t = sigma_to_t(σ) (1000·σ for "flow") as a [B] tensor on
      x's device, float32 (float64 when x is float64); ctx = cond (or the batched [uncond, cond]).
    - Guidance mixes the raw outputs, F = F_u + cfg·(F_c - F_u). Cond and uncond run as ONE call
      on a batch of 2B ordered [uncond, cond]; with cfg_scale 0 or 1 (uses_guidance) or no uncond
      the unconditional pass is skipped (one call on B). D is affine in F with coefficients that
      do not depend on the prompt, so this is the same as mixing D_u and D_c (for "flow": mixing
      the velocities, as diffusers' SD3 pipeline does, is mixing the x₀ estimates).
    - share_latent: under guidance unet_fn gets x_in once, [B] against t and ctx of 2B rows, instead of
      [x_in, x_in] (sdcore's UNet then runs its layers before the text enters once, not twice).
    - slg: skip-layer guidance (SD3.5's), ``(weak_fn, scale, window)``: under guidance, at a σ within
      window = (σ_high, σ_low) (skip_layer_window), F += scale·(F_c − F_w), where F_w = weak_fn(x_in, t, cond) is the
      conditional output of the network with some of its blocks left out. Guidance pushes away from what the
      weakened network draws, towards the structure the left-out blocks contribute (diffusers' SD3 pipeline;
      one more call on B rows at the steps inside the window).
    - sigma: python float, 0-dim tensor, or a [B] tensor of per-sample levels.
    - The returned function has `denoise.prediction = prediction`: the ancestral samplers check it
      against their `flow` argument (sampling.py).
    """
    check_name("prediction type", prediction, PREDICTIONS)
    guided = uncond is not None and uses_guidance(cfg_scale)
    to_t = _TIMESTEP[prediction]

    def denoise(x, sigma):
        sigma = torch.as_tensor(sigma, dtype=torch.float64 if not torch.is_tensor(sigma) else None)
        t_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        t = to_t(sigma.to(torch.float64)).to(device=x.device, dtype=t_dtype).reshape(-1).expand(x.shape[0])
        # Broadcast per-sample scalings over the non-batch dims; 0-dim ones broadcast as they are.
        shape = (-1,) + (1,) * (x.ndim - 1) if sigma.ndim else ()
        c_skip, c_out, c_in = (c.to(device=x.device, dtype=x.dtype).reshape(shape)
                               for c in get_scalings(sigma, prediction))
        x_in = x * c_in
        if guided:
            # Mixed in x's dtype: a bf16 UNet output would otherwise keep the guidance in bf16.
            x_pair = x_in if share_latent else torch.cat([x_in, x_in])
            out = unet_fn(x_pair, torch.cat([t, t]), _cat(uncond, cond)).to(x.dtype)
            out_u, out_c = out.chunk(2)
            out = out_u + cfg_scale * (out_c - out_u)
            if slg is not None and _within(sigma, slg[2]):
                weak_fn, scale, _ = slg
                out = out + scale * (out_c - weak_fn(x_in, t, cond).to(x.dtype))
        else:
            out = unet_fn(x_in, t, cond).to(x.dtype)
        return c_skip * x + c_out * out

    denoise.prediction = prediction
    return denoise


def _within(sigma, window) -> bool:
    if window is None:
        return False
    high, low = window
    return bool(((low <= sigma) & (sigma <= high)).all())
