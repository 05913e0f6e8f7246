"""Weights kept quantized in memory (sdcore.quant): each block format's expansion equals the gguf package's own
dequantization bit for bit (the K-quants', which the package cannot write, on random blocks); a FLUX-shaped
transformer in a Q8_0 / Q4_0 / Q4_K GGUF file (written with the gguf package, Black Forest Labs' names as
stable-diffusion.cpp's converter keeps them) and in float8 loads with its linear layers kept as stored, holds a
fraction of the memory, and computes exactly what the same file dequantized at load computes."""
from dataclasses import replace

import gguf
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType as Q
from safetensors.torch import save_file

from sdcore.flux import Flux, pack
from sdcore.formats.build import build
from sdcore.formats.checkpoints import FLUX_LAYOUT, read_transformer
from sdcore.formats.write import random_init_
from sdcore.quant import BLOCK_SIZES, QuantLinear, dequantize, stored_bytes
from tiny_models import flux_config


K_QUANTS = [kind for kind in BLOCK_SIZES if kind.endswith("_K")]
# where each K-quant block keeps its float16 d (and dmin), from gguf.quants' readers (the rest is packed integers)
K_FLOAT16_AT = {"Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}


def test_block_sizes_are_the_gguf_package_s():
    assert set(K_QUANTS) == set(K_FLOAT16_AT)
    for kind, size in BLOCK_SIZES.items():
        assert gguf.constants.GGML_QUANT_SIZES[Q[kind]] == size, kind


@pytest.mark.parametrize("kind", [kind for kind in BLOCK_SIZES if kind not in K_QUANTS])
def test_each_block_format_expands_as_the_gguf_package_does(kind):
    rng = np.random.default_rng(0)
    values = (rng.standard_normal((64, 256)) * rng.uniform(0.01, 3, (64, 1))).astype(np.float32)
    blocks = gguf.quants.quantize(values, Q[kind])
    want = gguf.quants.dequantize(blocks, Q[kind]).reshape(-1, 32)
    got = dequantize(torch.from_numpy(blocks.reshape(-1, BLOCK_SIZES[kind][1])), kind)
    assert np.abs(want - values.reshape(-1, 32)).max() > 0                     # it is lossy...
    assert torch.equal(got, torch.from_numpy(want))                            # ...and we lose exactly the same


def random_k_blocks(kind: str, n: int, rng, d=None) -> np.ndarray:
    """n random blocks of a K-quant [n, bytes] (the gguf package cannot quantize these): random bytes, with finite
    float16 d and dmin, of magnitudes from 1e-6 (subnormal) to 1 unless ``d`` gives d (and dmin = 7.5·d)."""
    blocks = rng.integers(0, 256, size=(n, BLOCK_SIZES[kind][1]), dtype=np.uint8)
    for i, at in enumerate(K_FLOAT16_AT[kind]):
        value = rng.standard_normal(n) * 10.0 ** rng.uniform(-6, 0, n) if d is None else np.full(n, d * (1, 7.5)[i])
        blocks[:, at:at + 2] = value.astype(np.float16).view(np.uint8).reshape(n, 2)
    return blocks


@pytest.mark.parametrize("kind", K_QUANTS)
def test_each_k_quant_expands_as_the_gguf_package_does(kind):
    blocks = random_k_blocks(kind, 2048, np.random.default_rng(K_QUANTS.index(kind)))
    want = torch.from_numpy(gguf.quants.dequantize(blocks, Q[kind]))
    got = dequantize(torch.from_numpy(blocks), kind)
    assert got.shape == (2048, 256) and want.shape == (2048, 256) and torch.isfinite(want).all()
    assert (want != 0).float().mean() > 0.8 and torch.equal(got, want)


@pytest.mark.parametrize("kind", ["Q4_K", "Q6_K"])
def test_a_k_quant_linear_layer_computes_with_the_reference_weight(kind):
    out_features, in_features = 24, 512
    rng = np.random.default_rng(7)
    blocks = random_k_blocks(kind, out_features * in_features // 256, rng, d=0.001)
    weight = torch.from_numpy(gguf.quants.dequantize(blocks, Q[kind]).reshape(out_features, in_features))
    bias = torch.from_numpy(rng.standard_normal(out_features).astype(np.float32))
    layer = QuantLinear(torch.from_numpy(blocks), kind, (out_features, in_features), bias)
    x = torch.randn(3, 5, in_features, generator=torch.Generator().manual_seed(0))
    assert torch.equal(layer.weight_as(torch.float32), weight)
    assert torch.equal(layer(x), F.linear(x, weight, bias))


def _write_gguf(path, state: dict, kind: str):
    """``state`` with its 2-D tensors of whole blocks in ``kind``, the rest in F32. K-quants are random blocks (the
    gguf package cannot quantize them) with about the replaced weight's spread, centered: with sc, q and m uniform,
    E[d·sc·q] = d·31.5·7.5 = E[7.5·d·m] and the spread is about 258·d."""
    rng = np.random.default_rng(3)
    w = gguf.GGUFWriter(str(path), "flux")
    for name, t in state.items():
        a = t.float().numpy()
        weights, _ = BLOCK_SIZES[kind]
        if a.ndim == 2 and a.shape[1] % weights == 0 and kind.endswith("_K"):
            blocks = random_k_blocks(kind, a.size // weights, rng, d=float(a.std()) / 258)
            w.add_tensor(name, blocks.reshape(a.shape[0], -1), raw_dtype=Q[kind])
        elif a.ndim == 2 and a.shape[1] % weights == 0:
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


@pytest.mark.parametrize("kind", ["Q8_0", "Q4_0", "Q4_K", "float8"])
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
    # those of whole blocks: every linear layer of this model has a whole number of 32; of 256, all but two
    weights = BLOCK_SIZES[kind][0] if kind in BLOCK_SIZES else 1
    whole = sum(isinstance(m, torch.nn.Linear) and m.in_features % weights == 0 for m in full.modules())
    dense = sum(isinstance(m, torch.nn.Linear) for m in full.modules())
    assert len(linears) == whole > dense - 3
    assert {m.kind for m in linears} == {kind}
    assert stored_bytes(kept) < stored_bytes(full) * {"Q8_0": 0.35, "Q4_0": 0.2, "Q4_K": 0.2, "float8": 0.3}[kind]
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
    # Adapters: held beside the kept layers and added at each call, the same numbers as merged into the dequantized
    # weights (a FLUX LoRA in sd-scripts' layout, its q/k/v stacked, and a T5 one); off again, the image is back
    from bench.lora_files import write_transformer_lora
    write_transformer_lora(tmp_path / "flux-lora.safetensors", models["dequantize"], layout="kohya", seed=9)
    key, g = "encoder.block.0.layer.0.SelfAttention.q", torch.Generator().manual_seed(2)
    width = models["dequantize"].text_encoder_3.get_parameter(key + ".weight").shape
    save_file({f"lora_te3_{key.replace('.', '_')}.lora_up.weight": torch.randn(width[0], 4, generator=g),
               f"lora_te3_{key.replace('.', '_')}.lora_down.weight": torch.randn(4, width[1], generator=g)},
              str(tmp_path / "t5-lora.safetensors"))
    loras = [(str(tmp_path / "flux-lora.safetensors"), 0.8), (str(tmp_path / "t5-lora.safetensors"), 0.5)]
    kept_bytes = stored_bytes(models["keep"].unet)
    adapted = {how: np.asarray(generate(m, replace(p, loras=loras))[0].image) for how, m in models.items()}
    assert np.array_equal(adapted["keep"], adapted["dequantize"])
    assert np.abs(adapted["keep"].astype(int) - images["keep"]).mean() > 2          # the adapters do change it
    assert stored_bytes(models["keep"].unet) == kept_bytes                          # nothing dequantized to hold it
    assert np.array_equal(np.asarray(generate(models["keep"], p)[0].image), images["keep"])
    with pytest.raises(sdcore.CheckpointError, match="quantized_weights"):
        sdcore.load_model(tmp_path / "flux1-schnell-Q8_0.gguf", quantized_weights="packed", **kw)
