"""Live progress in the core: the per-step report (sdcore.pipeline.Step), stopping a generation (Interrupt:
A1111's interrupt and skip), previews (sdcore.previews: TAESD, and the projection fitted to the VAE) and
TAESD for final images (taesd_decode)."""
from __future__ import annotations

import pytest
import torch

import samplers
from safetensors.torch import save_file

from api.config import TRAINED_MODEL
from sdcore import load_model, previews, taesd
from sdcore.formats import CheckpointError
from sdcore.model import attach_taesd
from sdcore.pipeline import GenerationParams, Interrupt, decode_latent, generate, tensor_to_image
from sdcore.taesd import TinyDecoder


@pytest.fixture(scope="module")
def model():
    return load_model(TRAINED_MODEL, device="cpu", dtype="float32")


def pixels(img) -> torch.Tensor:
    return torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).float()


def params(**kw) -> GenerationParams:
    return GenerationParams(**{"prompt": "a red circle on a blue background", "width": 64, "height": 64,
                               "steps": 6, "seed": 7, "sample_method": "euler", **kw})


def test_steps_are_reported_in_order_with_the_denoised_latent(model):
    seen = []
    generate(model, params(n=2), progress=seen.append)
    assert [(s.image, s.index, s.total, s.images) for s in seen] == [(i, k, 6, 2) for i in range(2) for k in range(6)]
    assert all(s.denoised.shape == (1, 4, 8, 8) and s.seconds >= 0 for s in seen)
    # img2img with strength 0.5 takes the steps of the end of the schedule, and says so
    from PIL import Image
    seen.clear()
    generate(model, params(init_image=Image.new("RGB", (64, 64), (200, 30, 30)), strength=0.5), progress=seen.append)
    total = len(samplers.img2img_sigmas(samplers.get_sigmas(samplers.default_scheduler("euler"), 6), 0.5)) - 1
    assert total < 6 and [s.total for s in seen] == [total] * total


def test_interrupt_finishes_the_image_from_the_latest_estimate_and_draws_no_more(model):
    full, kept = [], {}

    def record(step):
        full.append(step)
        if (step.image, step.index) == (0, 2):
            kept["denoised"] = step.denoised.clone()
    generate(model, params(n=2), progress=record)

    def stop_at_2(step):
        if (step.image, step.index) == (0, 2):
            raise Interrupt()
    images = generate(model, params(n=2), progress=stop_at_2)
    assert len(images) == 1
    with torch.inference_mode():
        want = tensor_to_image(decode_latent(model, kept["denoised"])[0])
    assert images[0].image.tobytes() == want.tobytes()


def test_skip_finishes_this_image_early_and_draws_the_next_as_usual(model):
    normal = generate(model, params(n=2))

    def skip_first(step):
        if (step.image, step.index) == (0, 1):
            raise Interrupt(skip=True)
    images = generate(model, params(n=2), progress=skip_first)
    assert len(images) == 2 and [i.seed for i in images] == [7, 8]
    assert images[1].png == normal[1].png                  # the next image is untouched
    assert images[0].image.tobytes() != normal[0].image.tobytes()


def test_previews_leave_the_image_unchanged(model):
    plain = generate(model, params())
    shots = []
    with_previews = generate(model, params(), progress=lambda s: shots.append(previews.preview(model, s.denoised,
                                                                                               (64, 64))))
    assert with_previews[0].png == plain[0].png
    assert len(shots) == 6 and all(s.size == (64, 64) for s in shots)


def test_the_projection_fitted_to_the_vae_predicts_its_decodes_of_latents_it_never_saw(model):
    """Least squares against the VAE's own decodes, on synthetic pictures: on the latents of the pictures the
    default model draws (its training data's) it predicts the decode's cell colours better than their mean
    colour does. (This small VAE's latent is far from linear in colour: the projection leaves about 2/3 of
    the variance; TAESD is the faithful preview.)"""
    from weights.shapes import batch
    matrix = previews.fit_projection(model.vae)
    assert matrix.shape == (5, 3)
    with torch.inference_mode():
        latent, decoded = previews.encode_decode(model.vae, batch(5, 0, 8)[0])
    got, want = previews.project(matrix, latent), torch.nn.functional.avg_pool2d(decoded, 8)
    residual = ((got - want) ** 2).sum()
    spread = ((want - want.mean(dim=(0, 2, 3), keepdim=True)) ** 2).sum()
    assert residual < 0.8 * spread, (residual / spread).item()
    # and on its own pictures it is the least-squares solution: the residual is orthogonal to every regressor
    with torch.inference_mode():
        latent, decoded = previews.encode_decode(model.vae, previews.synthetic_images(
            previews.FIT_IMAGES, previews.FIT_SIDE, seed=0))
    a = torch.cat([latent, torch.ones_like(latent[:, :1])], 1).double()
    r = (torch.einsum("bchw,cr->brhw", a.float(), matrix) - torch.nn.functional.avg_pool2d(decoded, 8)).double()
    normal = torch.einsum("bchw,brhw->cr", a, r)           # Aᵀ(Ax - b), zero at the minimum
    assert normal.abs().max() < 1e-4 * a.abs().sum() * r.abs().mean()


def _taesd_file(tmp_path, channels=4, seed=0):
    torch.manual_seed(seed)
    decoder = TinyDecoder(channels)
    with torch.no_grad():
        for p in decoder.parameters():
            p.copy_(torch.randn_like(p) * (1.5 / p[0].numel()) ** 0.5)
    path = tmp_path / f"taesd-{channels}.safetensors"
    save_file({k: v.contiguous() for k, v in decoder.state_dict().items()}, str(path))
    return path


def test_taesd_previews_and_final_images(model, tmp_path, monkeypatch):
    import sdcore.pipeline as pipeline
    path = _taesd_file(tmp_path)
    latents = []
    real = pipeline.decode_latent
    monkeypatch.setattr(pipeline, "decode_latent", lambda m, x: latents.append(x) or real(m, x))
    vae_image = generate(model, params())[0]
    try:
        attach_taesd(model, str(path), decode=True)
        assert previews.method(model) == "taesd"
        shot = previews.preview(model, latents[0])
        with torch.inference_mode():
            want = tensor_to_image(taesd.decode(model.taesd, latents[0])[0])
        assert shot.tobytes() == want.tobytes() and shot.size == (64, 64)
        fast = generate(model, params())[0]
        assert fast.image.tobytes() == want.tobytes() != vae_image.image.tobytes()
    finally:
        model.taesd, model.taesd_decode = None, False
    with pytest.raises(CheckpointError, match="16-channel"):
        attach_taesd(model, str(_taesd_file(tmp_path, channels=16)))
    assert model.taesd is None
