"""GGUF checkpoints (sdcore.formats.files: read with the gguf package): written here with the gguf package's own
writer and quantizers from the tiny SD1 checkpoint, in the original tensor names, as stable-diffusion.cpp's
converter keeps them. F16 loads bit for bit as the same values in safetensors; Q8_0 dequantizes within Q8_0's
rounding bound; the model built from the Q8_0 file draws an image close to the float32 one."""
import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from safetensors.torch import save_file

from sdcore import load_model
from sdcore.formats.files import CheckpointError, TensorFile
from sdcore.pipeline import GenerationParams, generate


def write_gguf(path, tensors: dict, quant=None, metadata=None) -> None:
    """Every tensor as F16, or with ``quant`` those whose rows fill Q8_0/Q4_0 blocks (32 values), the rest F32;
    ``metadata``: string key-values (our configuration entry, which this tiny model needs: its head count is not
    SD's)."""
    w = gguf.GGUFWriter(str(path), "sd1")
    for key, value in (metadata or {}).items():
        w.add_string(key, value)
    for name, t in tensors.items():
        a = t.float().numpy()
        if quant is not None and a.ndim >= 2 and a.shape[-1] % 32 == 0:
            w.add_tensor(name, gguf.quants.quantize(a, quant), raw_dtype=quant)
        elif quant is not None:
            w.add_tensor(name, a)
        else:
            w.add_tensor(name, a.astype(np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def source(default_model_path):
    tf = TensorFile(default_model_path)
    return {k: tf.get(k) for k in tf.keys()}


def test_f16_gguf_reads_bit_for_bit_as_f16_safetensors(source, tmp_path):
    write_gguf(tmp_path / "m-f16.gguf", source)
    save_file({k: v.half().contiguous() for k, v in source.items()}, str(tmp_path / "m-f16.safetensors"))
    g, s = TensorFile(tmp_path / "m-f16.gguf"), TensorFile(tmp_path / "m-f16.safetensors")
    assert sorted(g.keys()) == sorted(s.keys())
    for k in s.keys():
        assert g.shape(k) == s.shape(k) and g.get(k).dtype == torch.float16
        assert torch.equal(g.get(k), s.get(k)), k


def test_q8_0_dequantizes_within_its_rounding_and_draws_close(source, tmp_path, default_model_path):
    path = tmp_path / "m-q8_0.gguf"
    write_gguf(path, source, Q.Q8_0, TensorFile(default_model_path).metadata)
    g = TensorFile(path)
    quantized = 0
    for k, want in source.items():
        got = g.get(k)
        assert got.shape == want.shape, k
        if want.ndim >= 2 and want.shape[-1] % 32 == 0:
            quantized += 1
            blocks = want.float().reshape(-1, 32)
            # Q8_0: per block of 32, d = max|x| / 127 stored as float16, values round(x / d): error ≤ d/2 (+ d's rounding)
            bound = blocks.abs().amax(1, keepdim=True) / 127 * (0.5 + 127 * 2 ** -11) + 1e-12
            assert ((got.reshape(-1, 32) - blocks).abs() <= bound).all(), k
        else:
            assert torch.equal(got, want.float()), k
    assert quantized > 20
    params = GenerationParams("a red circle", width=64, height=64, steps=4, seed=3, sample_method="euler")
    ref = np.asarray(generate(load_model(default_model_path, device="cpu", dtype="float32"), params)[0].image, float)
    q8 = np.asarray(generate(load_model(str(path), device="cpu", dtype="float32"), params)[0].image, float)
    diff = np.abs(q8 - ref)
    print(f"\nQ8_0 vs float32 image: mean {diff.mean():.2f}, max {diff.max():.0f} of 255")
    assert diff.mean() < 2.0


def test_q4_k_is_read_through_the_gguf_reference_dequantization(tmp_path):
    """A K-quant (which the gguf package cannot write): random Q4_K blocks (144 bytes per 256 values: float16 d and
    dmin, 12 bytes of 6-bit scales, 128 of 4-bit values), with sane d and dmin, read back as the package decodes
    them, in the tensor's shape."""
    rows, cols = 6, 512
    rng = np.random.default_rng(0)
    blocks = rng.integers(0, 256, size=(rows * cols // 256, 144), dtype=np.uint8)
    blocks[:, 0:2] = np.frombuffer(np.float16(0.01).tobytes(), np.uint8)
    blocks[:, 2:4] = np.frombuffer(np.float16(0.002).tobytes(), np.uint8)
    data = blocks.reshape(rows, -1)
    w = gguf.GGUFWriter(str(tmp_path / "k.gguf"), "sd1")
    w.add_tensor("layer.weight", data, raw_dtype=Q.Q4_K)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    got = TensorFile(tmp_path / "k.gguf").get("layer.weight")
    want = torch.from_numpy(gguf.quants.dequantize(data, Q.Q4_K)).reshape(rows, cols)
    assert got.shape == (rows, cols) and torch.isfinite(got).all() and got.std() > 0
    assert torch.equal(got, want)


def test_a_cut_gguf_is_refused_clearly(source, tmp_path):
    write_gguf(tmp_path / "whole.gguf", source)
    data = (tmp_path / "whole.gguf").read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[: len(data) // 3])
    with pytest.raises(CheckpointError, match="GGUF"):
        TensorFile(tmp_path / "cut.gguf")
    (tmp_path / "text.gguf").write_bytes(b"not a gguf file at all")
    with pytest.raises(CheckpointError, match="GGUF"):
        load_model(str(tmp_path / "text.gguf"), device="cpu", dtype="float32")


def test_a_language_model_gguf_and_an_unsupported_type_are_refused_clearly(source, tmp_path, default_model_path):
    """An LLM's GGUF (llama.cpp's names) is not taken for a checkpoint; a tensor of a type the gguf package cannot
    expand (Q8_1, an intermediate type of llama.cpp's that no converter writes to files) names itself and its type."""
    w = gguf.GGUFWriter(str(tmp_path / "llama.gguf"), "llama")
    w.add_tensor("token_embd.weight", np.zeros((10, 64), np.float32))
    w.add_tensor("blk.0.attn_q.weight", np.zeros((64, 64), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(CheckpointError, match="not a Stable Diffusion checkpoint"):
        load_model(str(tmp_path / "llama.gguf"), device="cpu", dtype="float32")
    w = gguf.GGUFWriter(str(tmp_path / "q8_1.gguf"), "sd1")
    for key, value in TensorFile(default_model_path).metadata.items():
        w.add_string(key, value)
    odd = next(k for k, v in source.items() if v.ndim == 2 and v.shape[1] % 32 == 0)
    for name, t in source.items():
        if name == odd:
            blocks, size = gguf.GGML_QUANT_SIZES[Q.Q8_1]
            w.add_tensor(name, np.zeros((t.shape[0], t.shape[1] // blocks * size), np.uint8), raw_dtype=Q.Q8_1)
        else:
            w.add_tensor(name, t.float().numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(CheckpointError, match=f"{odd}: the GGUF type Q8_1 is not supported"):
        load_model(str(tmp_path / "q8_1.gguf"), device="cpu", dtype="float32")


@pytest.mark.parametrize("fp8", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_fp8_safetensors_load_as_their_values(source, tmp_path, default_model_path, fp8):
    """fp8 checkpoints (flux1-dev-fp8 and the like): the weights stored in float8 load as exactly those values in
    the compute dtype (float32 here), the rest as stored; the model draws."""
    stored = {k: (v.to(fp8) if v.is_floating_point() and v.ndim >= 2 else v).contiguous() for k, v in source.items()}
    save_file(stored, str(tmp_path / "m-fp8.safetensors"), metadata=TensorFile(default_model_path).metadata)
    model = load_model(str(tmp_path / "m-fp8.safetensors"), device="cpu", dtype="float32")
    for prefix, net in (("model.diffusion_model.", model.unet), ("first_stage_model.", model.vae)):
        for k, v in net.state_dict().items():
            assert torch.equal(v, stored[prefix + k].float()), k
    image = generate(model, GenerationParams("a red circle", width=64, height=64, steps=2, seed=1))[0].image
    assert np.asarray(image).std() > 0
