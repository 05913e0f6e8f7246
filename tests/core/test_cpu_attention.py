"""Our CPU bf16 attention kernel (sdcore/attention_bf16.cpp via sdcore.cpu_attention) against a float64
reference and against ATen's SDPA, the shapes it takes, and the UNet using it. Needs g++ and a CPU with
AVX512-BF16 (the CI machine has both); elsewhere the kernel is never used, which the last test checks."""
import dataclasses

import pytest
import torch
from torch.nn.functional import scaled_dot_product_attention as sdpa

from sdcore import cpu_attention
from sdcore.formats.write import random_init_
from sdcore.unet import UNet, UNetConfig

needs_kernel = pytest.mark.skipif(not cpu_attention.prepare(), reason="no AVX512-BF16 CPU or no g++")


def qkv(b, heads, n, m, d, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, heads, rows, d, generator=g).bfloat16() for rows in (n, m, m)]


@needs_kernel
@pytest.mark.parametrize("shape", [(1, 2, 128, 512, 40), (2, 8, 256, 256, 48), (1, 1, 64, 256, 34)])
def test_kernel_is_as_close_to_float64_as_atens_sdpa(shape):
    q, k, v = qkv(*shape, seed=sum(shape))
    for scale in (1.0, 4.0):                      # 4: sharper softmax rows, a few keys dominate
        q_ = (q.float() * scale).bfloat16()
        assert cpu_attention.takes(q_, k)
        ours = torch.ops.sdcore.attention_bf16(q_, k, v)
        ref = sdpa(q_.double(), k.double(), v.double())
        aten = sdpa(q_, k, v)
        assert ours.shape == aten.shape and ours.dtype == torch.bfloat16
        err, aten_err = (ours.double() - ref).abs().max().item(), (aten.double() - ref).abs().max().item()
        assert err <= 2 * aten_err + 1e-6, (err, aten_err)


@needs_kernel
def test_takes_only_its_shapes():
    q, k, _ = qkv(1, 2, 64, 256, 40, seed=0)
    assert cpu_attention.takes(q, k)
    assert not cpu_attention.takes(q.float(), k.float())                   # bfloat16 only
    assert not cpu_attention.takes(*qkv(1, 2, 64, 256, 64, seed=0)[:2])     # head dimension 64 (SD2)
    assert not cpu_attention.takes(*qkv(1, 2, 64, 256, 32, seed=0)[:2])     # 32 and less: ATen's is as fast
    assert not cpu_attention.takes(*qkv(1, 2, 64, 77, 40, seed=0)[:2])      # cross-attention: 77 text tokens
    assert not cpu_attention.takes(*qkv(1, 2, 72, 256, 40, seed=0)[:2])     # not whole query tiles


@needs_kernel
def test_unet_attention_goes_through_the_kernel(monkeypatch):
    cfg = dataclasses.replace(UNetConfig(), model_channels=160, channel_mult=(1, 2), attention_levels=(0,),
                              transformer_depth=(1, 0), num_heads=4, context_dim=64, num_res_blocks=1)
    unet = random_init_(UNet(cfg), 3).to(torch.bfloat16).eval()
    g = torch.Generator().manual_seed(1)
    x, ctx = torch.randn(1, 4, 16, 16, generator=g).bfloat16(), torch.randn(2, 77, 64, generator=g).bfloat16()
    t = torch.tensor([500.0, 500.0])
    calls = []
    real = torch.ops.sdcore.attention_bf16
    monkeypatch.setattr(cpu_attention, "_kernel", lambda *a: calls.append(a[0].shape) or real(*a), raising=False)
    with torch.inference_mode():
        ours = unet(x, t, ctx)
        monkeypatch.setitem(cpu_attention._state, "loaded", False)           # the same UNet on ATen's SDPA
        aten = unet(x, t, ctx)
    # level 0's self-attentions: the first shared by the CFG pair, then the two of the decoder half
    assert calls == [(1, 4, 256, 40), (2, 4, 256, 40), (2, 4, 256, 40)]
    rel = ((ours.float() - aten.float()).abs().max() / aten.float().abs().max()).item()
    assert 0 < rel <= 2e-2, rel                   # a different bf16 rounding, the same result


def test_off_switch_and_other_cpus_keep_sdpa(monkeypatch):
    monkeypatch.setattr(cpu_attention, "_state", {"loaded": False, "tried": False})
    monkeypatch.setenv("SDCORE_ATTENTION_KERNEL", "0")
    assert cpu_attention.prepare() is False
    monkeypatch.setattr(cpu_attention, "_state", {"loaded": False, "tried": False})
    monkeypatch.delenv("SDCORE_ATTENTION_KERNEL")
    monkeypatch.setattr(cpu_attention, "cpu_has_avx512_bf16", lambda: False)
    assert cpu_attention.prepare() is False
    q, k, v = qkv(1, 2, 64, 256, 40, seed=0)
    assert not cpu_attention.takes(q, k)
    torch.testing.assert_close(cpu_attention.attention(q, k, v), sdpa(q, k, v), rtol=0, atol=0)


@needs_kernel
def test_kernel_refuses_shapes_it_cannot_compute():
    q, k, v = qkv(1, 2, 64, 256, 40, seed=0)
    with pytest.raises(RuntimeError, match="multiple of 64"):
        torch.ops.sdcore.attention_bf16(q[:, :, :60], k, v)
    with pytest.raises(RuntimeError, match="k and v must be"):
        torch.ops.sdcore.attention_bf16(q, k, v[:, :1])


def test_processes_starting_together_compile_once(tmp_path, monkeypatch):
    # the compiler stubbed (slow, writing the library): two builders at once, one compile, the same file
    import subprocess
    import threading
    import time
    compiles = []

    def fake_gxx(cmd, **kw):
        compiles.append(cmd)
        time.sleep(0.5)
        open(cmd[cmd.index("-o") + 1], "wb").write(b"library")
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(cpu_attention.subprocess, "run", fake_gxx)
    results = []
    threads = [threading.Thread(target=lambda: results.append(cpu_attention.build(out_dir=tmp_path))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(compiles) == 1 and len(results) == 2 and results[0] == results[1]
    assert results[0].read_bytes() == b"library" and not list(tmp_path.glob("tmp*"))   # no partial left
