"""Weights kept quantized in memory (sdcore.quant): each block format's expansion equals the gguf package's own
dequantization bit for bit; a FLUX-shaped transformer in a Q8_0 / Q4_0 GGUF file (written with the gguf package's
quantizers, Black Forest Labs' names as stable-diffusion.cpp's converter keeps them) and in float8 loads with its
linear layers kept as stored, holds a fraction of the memory, and computes exactly what the same file dequantized
at load computes."""
import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from safetensors.torch import save_file

from sdcore.flux import Flux, pack
from sdcore.formats.build import build
from sdcore.formats.checkpoints import FLUX_LAYOUT, read_transformer
from sdcore.formats.write import random_init_
from sdcore.quant import BLOCK_BYTES, QuantLinear, dequantize, stored_bytes
from tiny_models import flux_config


@pytest.mark.parametrize("kind", list(BLOCK_BYTES))
def test_each_block_format_expands_as_the_gguf_package_does(kind):
    rng = np.random.default_rng(0)
    values = (rng.standard_normal((64, 256)) * rng.uniform(0.01, 3, (64, 1))).astype(np.float32)
    blocks = gguf.quants.quantize(values, Q[kind])
    want = gguf.quants.dequantize(blocks, Q[kind]).reshape(-1, 32)
    got = dequantize(torch.from_numpy(blocks.reshape(-1, BLOCK_BYTES[kind])), kind)
    assert np.abs(want - values.reshape(-1, 32)).max() > 0                     # it is lossy...
    assert torch.equal(got, torch.from_numpy(want))                            # ...and we lose exactly the same


def _write_gguf(path, state: dict, kind: str):
    w = gguf.GGUFWriter(str(path), "flux")
    for name, t in state.items():
        a = t.float().numpy()
        if a.ndim == 2 and a.shape[1] % 32 == 0:
            w.add_tensor(name, gguf.quants.quantize(a, Q[kind]), raw_dtype=Q[kind])
        else:
            w.add_tensor(name, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def state():
    with torch.no_grad():
        return {k: v.contiguous() for k, v in random_init_(Flux(flux_config(dev=True)), 2).state_dict().items()}


def _inputs():
    g = torch.Generator().manual_seed(1)
    img, img_ids = pack(torch.randn(1, 16, 8, 8, generator=g))
    return img, img_ids, torch.randn(1, 7, 256, generator=g), torch.zeros(1, 7, 3), torch.tensor([0.6]), \
        torch.randn(1, 64, generator=g), torch.tensor([3.5])


@pytest.mark.parametrize("kind", ["Q8_0", "Q4_0", "float8"])
def test_kept_weights_compute_what_dequantized_ones_do(state, tmp_path, kind):
    if kind == "float8":
        path = tmp_path / "flux1-dev-fp8.safetensors"
        save_file({k: v.to(torch.float8_e4m3fn) if v.ndim == 2 else v for k, v in state.items()}, str(path))
    else:
        path = tmp_path / f"flux1-dev-{kind}.gguf"
        _write_gguf(path, state, kind)
    part = read_transformer(str(path), FLUX_LAYOUT)
    full = build(Flux, part.cfg, part.tensors, "cpu", torch.float32, "FLUX transformer", str(path))
    kept = build(Flux, part.cfg, part.tensors, "cpu", torch.float32, "FLUX transformer", str(path), keep_quantized=True)
    linears = [m for m in kept.modules() if isinstance(m, QuantLinear)]
    dense = sum(isinstance(m, torch.nn.Linear) for m in full.modules())
    assert len(linears) == dense                       # every linear layer of this model has a whole-block width
    assert {m.kind for m in linears} == {kind}
    assert stored_bytes(kept) < stored_bytes(full) * {"Q8_0": 0.35, "Q4_0": 0.2, "float8": 0.3}[kind]
    with torch.inference_mode():
        want, got = full(*_inputs()), kept(*_inputs())
    assert want.std() > 0.1 and torch.equal(got, want)


def test_a_whole_flux_model_with_kept_weights_draws_the_dequantized_image(tmp_path):
    """load_model(quantized_weights="keep") on a Q8_0 transformer and T5 (GGUF, as LlamaEdge's guides have users
    download them): the same image as the same files dequantized at load, in a fraction of the memory."""
    from safetensors.torch import load_file

    import sdcore
    from sdcore.pipeline import GenerationParams, generate
    from tiny_models import flux_files
    parts = flux_files(tmp_path, dev=False, seed=5)
    _write_gguf(tmp_path / "flux1-schnell-Q8_0.gguf", parts["transformer"], "Q8_0")
    _write_gguf(tmp_path / "t5xxl-Q8_0.gguf", load_file(str(tmp_path / "t5xxl.safetensors")), "Q8_0")
    kw = dict(device="cpu", dtype=torch.float32, vae=tmp_path / "ae.safetensors", clip_l=tmp_path / "clip_l.safetensors",
              t5xxl=tmp_path / "t5xxl-Q8_0.gguf")
    models = {how: sdcore.load_model(tmp_path / "flux1-schnell-Q8_0.gguf", quantized_weights=how, **kw)
              for how in ("dequantize", "keep")}
    assert stored_bytes(models["keep"].unet) < 0.35 * stored_bytes(models["dequantize"].unet)
    # T5's blocks (its token table, a gather, is dequantized at load: 3 % of T5-XXL, most of this small one)
    assert stored_bytes(models["keep"].text_encoder_3.encoder) < 0.35 * stored_bytes(models["dequantize"].text_encoder_3.encoder)
    p = GenerationParams(prompt="a lantern", width=64, height=64, steps=2, cfg_scale=1.0, sample_method="euler", seed=3)
    images = {how: np.asarray(generate(m, p)[0].image) for how, m in models.items()}
    assert images["keep"].std() > 10 and np.array_equal(images["keep"], images["dequantize"])
    with pytest.raises(sdcore.CheckpointError, match="quantized_weights"):
        sdcore.load_model(tmp_path / "flux1-schnell-Q8_0.gguf", quantized_weights="packed", **kw)
