"""The opt-in torch.compile path (--compile / SD_COMPILE): the compiled UNet draws the eager UNet's
image, and the setting parses. Needs a C++ compiler (inductor generates C++ on the CPU)."""
import logging
import shutil

import numpy as np
import pytest
import torch

import sdcore
from api.config import ConfigError, Settings, parse_args
from api.models import load_models
from sdcore.pipeline import GenerationParams, generate
from weights.make_default import DEFAULT_PATH as TINY


def test_compile_setting_parses():
    assert Settings.from_env({}).compile is False
    assert Settings.from_env({"SD_COMPILE": "1"}).compile is True
    assert Settings.from_env({"SD_COMPILE": "off"}).compile is False
    with pytest.raises(ConfigError, match="SD_COMPILE"):
        Settings.from_env({"SD_COMPILE": "maybe"})
    assert parse_args(["--compile"], {})[0].compile is True
    assert parse_args([], {"SD_COMPILE": "yes"})[0].compile is True        # no flag: the environment decides


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None, reason="inductor needs a C++ compiler")
def test_compiled_unet_draws_the_eager_image(caplog):
    settings = Settings.from_mapping({"models": [str(TINY)], "compile": True, "device": "cpu", "dtype": "float32"})
    with caplog.at_level(logging.INFO):
        compiled = load_models(settings).resolve(None)        # the server's path: compiled and warmed up at start
    assert "compiled model 'tiny-sd1'" in caplog.text
    eager = sdcore.load_model(TINY, device="cpu", dtype=torch.float32)
    assert compiled.unet is not eager.unet and compiled.unet.cfg == eager.unet.cfg      # attributes reach through
    p = GenerationParams(prompt="a red circle on a blue background", width=64, height=64, steps=3,
                         sample_method="euler_a", seed=5)
    a, b = (np.asarray(generate(m, p)[0].image, dtype=np.int16) for m in (eager, compiled))
    assert np.abs(a - b).max() <= 2, np.abs(a - b).max()
    assert a.std() > 5                                                  # a picture, not a constant


def test_cuda_graph_wrapper_runs_cpu_and_unreplayable_calls_as_they_are():
    # The capture itself needs a GPU (bench/gpu_check.py checks it on a lent card); off CUDA, outside
    # inference mode, or with ControlNet residuals the wrapper must call the network unchanged.
    import torch

    from sdcore.cuda_graphs import CUDAGraphed
    unet = sdcore.load_model(TINY, device="cpu", dtype=torch.float32).unet
    calls = []

    def fn(x, t, ctx, control=None):
        calls.append(control)
        return unet(x, t, ctx)

    graphed = CUDAGraphed(fn, unet)
    assert graphed.cfg is unet.cfg                                     # attributes reach through
    x, t, ctx = torch.randn(1, 4, 8, 8), torch.tensor([500.0]), torch.randn(1, 77, unet.cfg.context_dim)
    with torch.inference_mode():
        out = graphed(x, t, ctx)
        torch.testing.assert_close(out, unet(x, t, ctx), rtol=0, atol=0)
    with torch.no_grad():
        graphed(x, t, ctx, control="residuals")
    assert calls == [None, "residuals"] and graphed.graphs == {}      # nothing captured off CUDA


def test_cuda_graphs_setting_parses_and_reaches_load_model(monkeypatch):
    assert Settings.from_env({}).cuda_graphs is True                    # on by default (only CUDA uses it)
    assert Settings.from_env({"SD_CUDA_GRAPHS": "0"}).cuda_graphs is False
    assert parse_args(["--no-cuda-graphs"], {})[0].cuda_graphs is False
    assert parse_args(["--cuda-graphs"], {"SD_CUDA_GRAPHS": "off"})[0].cuda_graphs is True
    with pytest.raises(ConfigError, match="SD_CUDA_GRAPHS"):
        Settings.from_env({"SD_CUDA_GRAPHS": "sometimes"})
    seen = []
    monkeypatch.setattr(sdcore, "load_model", lambda *a, **kw: seen.append(kw["cuda_graphs"]) or "model")
    for value in (True, False):
        load_models(Settings.from_mapping({"models": [str(TINY)], "device": "cpu", "cuda_graphs": value}))
    assert seen == [True, False]


def test_cuda_graphs_wrap_only_on_cuda_and_compile_unwraps_them():
    from sdcore.cuda_graphs import CUDAGraphed
    model = sdcore.load_model(TINY, device="cpu", dtype=torch.float32)          # cuda_graphs=True by default
    plain = model.unet
    assert model.use_cuda_graphs().unet is plain                        # on the CPU: nothing to replay
    model.unet = CUDAGraphed(plain, plain)                              # as load_model leaves it on CUDA
    assert model.use_cuda_graphs().unet.module is plain                 # not wrapped twice
    compiled = model.compile().unet                                     # torch.compile is lazy: nothing compiles here
    assert compiled._orig_mod is plain                                  # compiles the network, not the wrapper


class _ReplayOnCPU:
    """Stands in for a captured CUDA graph: replaying reruns the network on the static inputs and writes
    into the static output, which is what a graph does."""

    def __init__(self, run, out):
        self.run, self.out = run, out

    def replay(self):
        new = self.run()
        for static, value in zip(*(v if isinstance(v, list) else [v] for v in (self.out, new))):
            static.copy_(value)


def _graphed_on_cpu(fn, module, fail_on=()):
    """sdcore.cuda_graphs.CUDAGraphed with only the CUDA parts replaced: it replays CPU tensors, and a
    'graph' reruns the network (its signature logic, static buffers, copies and eviction are the real ones)."""
    from sdcore.cuda_graphs import CUDAGraphed

    class OnCPU(CUDAGraphed):
        captured = []

        @staticmethod
        def _replayable(x):
            return True

        def _record(self, run, device):
            out = run()
            self.captured.append(tuple(out.shape if hasattr(out, "shape") else len(out)))
            if self.captured[-1] in fail_on:
                raise RuntimeError("operation not permitted when stream is capturing")
            return out, _ReplayOnCPU(run, out)

    return OnCPU(fn, module)


def test_cuda_graph_wrapper_replays_named_inputs_and_keys_on_constants():
    # SDXL and the transformers take their text as context= and y= (FLUX dev: guidance=), SD3's skip-layer pass
    # names the blocks it leaves out: named tensors are copied in like positional ones, a constant is part of the
    # signature.
    import torch
    seen = []

    def fn(x, t, context=None, y=None, skip_layers=()):
        seen.append(skip_layers)
        return x * t[:, None, None, None] + context.sum() + y.sum() * (1 + len(skip_layers))

    graphed = _graphed_on_cpu(fn, None)
    g = torch.Generator().manual_seed(1)
    calls = [dict(x=torch.randn(1, 4, 8, 8, generator=g), t=torch.rand(1, generator=g),
                  context=torch.randn(1, 5, 3, generator=g), y=torch.randn(1, 6, generator=g)) for _ in range(2)]
    with torch.inference_mode():
        for skip in ((), (7, 8, 9), [7, 8, 9]):
            for c in calls:
                got = graphed(c["x"], c["t"], context=c["context"], y=c["y"], skip_layers=skip)
                torch.testing.assert_close(got, fn(c["x"], c["t"], context=c["context"], y=c["y"], skip_layers=skip),
                                           rtol=0, atol=0)
    assert len(graphed.captured) == 2            # one per constant: a list of layers is the tuple's signature
    assert {tuple(s) for s in seen} == {(), (7, 8, 9)}


def test_cuda_graph_wrapper_keys_copies_and_evicts(monkeypatch, caplog):
    import torch

    import sdcore.cuda_graphs as cuda_graphs
    unet = sdcore.load_model(TINY, device="cpu", dtype=torch.float32).unet
    monkeypatch.setattr(cuda_graphs, "MAX_GRAPHS", 2)
    graphed = _graphed_on_cpu(unet, unet, fail_on=[(2, 4, 12, 12)])
    g = torch.Generator().manual_seed(0)
    ctx = torch.randn(2, 77, unet.cfg.context_dim, generator=g)
    t = torch.tensor([500.0, 500.0])
    x1, x2 = (torch.randn(1, 4, 8, 8, generator=g) for _ in range(2))

    def residuals():                                        # ControlNet-shaped: one per skip, then the middle's
        skips, h = unet.encode(*unet.embed_batch(x1, t, ctx, None)[:2], ctx)
        return [torch.randn(v.shape, generator=g) for v in (*skips, h)]

    with torch.inference_mode():
        out1, out2 = graphed(x1, t, ctx), graphed(x2, t, ctx)          # one capture, then a replay
        torch.testing.assert_close(out1, unet(x1, t, ctx), rtol=0, atol=0)      # kept although the graph ran again
        torch.testing.assert_close(out2, unet(x2, t, ctx), rtol=0, atol=0)
        assert len(graphed.captured) == 1
        c1, c2 = residuals(), residuals()                               # with residuals: a signature of its own
        out_c1, out_c2 = graphed(x1, t, ctx, control=c1), graphed(x1, t, ctx, control=c2)
        torch.testing.assert_close(out_c1, unet(x1, t, ctx, control=c1), rtol=0, atol=0)
        torch.testing.assert_close(out_c2, unet(x1, t, ctx, control=c2), rtol=0, atol=0)   # residuals copied in
        assert len(graphed.captured) == 2 and (out_c1 - out1).abs().max() > 0
        with caplog.at_level("WARNING"):
            out3 = graphed(torch.randn(1, 4, 12, 12, generator=g), t, ctx)    # capture fails: runs without a graph
        assert "CUDA graph capture failed" in caplog.text and out3.shape == (2, 4, 12, 12)
        # MAX_GRAPHS 2: the plain 8×8 signature, least recently used, was dropped for the failed 12×12 one
        assert [(k[0][1:] != (), k[2][0]) for k in graphed.graphs] == [(True, (1, 4, 8, 8)), (False, (1, 4, 12, 12))]
        assert list(graphed.graphs.values())[-1] is None
        graphed(x1, t, ctx)                                             # back: captured again
        assert graphed.captured[-1] == (2, 4, 8, 8) and len(graphed.captured) == 4
