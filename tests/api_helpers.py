"""Shared helpers for the HTTP tests: a stub model and a stub ``generate`` injected through
``create_app(config, model=..., generate=...)``, and small image builders."""
from __future__ import annotations

import hashlib
import io
import random
import threading

from PIL import Image, PngImagePlugin

import torch

from sdcore.pipeline import GeneratedImage, Interrupt, Step


class StubModel:
    def __init__(self, name="stub-sd"):
        self.name = name
        self.family = "sd1"
        self.device = "cpu"


def stub_png(width: int, height: int, seed: int, prompt: str) -> tuple[Image.Image, bytes]:
    """A deterministic PNG whose colour depends on (seed, prompt), with a parameters chunk."""
    h = hashlib.sha256(f"{seed}:{prompt}".encode()).digest()
    img = Image.new("RGB", (width, height), (h[0], h[1], h[2]))
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", f"{prompt}\nSteps: 1, Seed: {seed}, Size: {width}x{height}")
    buf = io.BytesIO()
    img.save(buf, format="PNG", pnginfo=info)
    return img, buf.getvalue()


class StubGenerate:
    """Records (model, params) of every call; returns n deterministic images seeded seed+i."""

    def __init__(self, error: Exception | None = None, gate: threading.Event | None = None):
        self.calls = []
        self.error = error
        self.gate = gate
        self.started = threading.Event()

    def __call__(self, model, params, progress=None):
        self.calls.append((model, params))
        self.started.set()
        if self.gate is not None:
            self.gate.wait(10)
        if self.error is not None:
            raise self.error
        base = params.seed if params.seed >= 0 else random.randrange(2 ** 32)
        out = []
        for i in range(params.n):
            stopped = None
            for k in range(params.steps):          # as sdcore.pipeline: a Step per sampler step, 0-based
                if progress is not None:
                    # the stand-in "latent": the step's number in every cell, read back by preview()
                    latent = torch.full((1, 4, params.height // 8, params.width // 8), float(k + 1))
                    try:
                        progress(Step(k, params.steps, 0.001, i, params.n, latent))
                    except Interrupt as e:
                        stopped = e
                        break
            img, png = stub_png(params.width, params.height, base + i, params.prompt)
            out.append(GeneratedImage(image=img, seed=base + i, png=png))
            if stopped is not None and not stopped.skip:
                break
        return out

    @staticmethod
    def preview(model, latent, size):
        """A grey picture whose level is the stand-in latent's step number."""
        return Image.new("RGB", size, (int(latent.flatten()[0]),) * 3)

    @property
    def params(self):
        return self.calls[-1][1]


def encode(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def png_bytes(size=(64, 64), mode="RGB", color=(10, 20, 30)) -> bytes:
    if mode == "RGBA" and len(color) == 3:
        color = color + (255,)
    return encode(Image.new(mode, size, color))


def make_app(tmp_path, stub=None, model=None, **settings):
    from app import create_app
    config = {"data_dir": str(tmp_path / "data"), "api_key": None}
    config.update(settings)
    stub = stub or StubGenerate()
    app = create_app(config, model=model if model is not None else StubModel(), generate=stub,
                     preview=getattr(stub, "preview", None))
    app.config["TESTING"] = True
    return app, stub


def error_of(resp, status: int) -> dict:
    """Assert ``resp`` is an OpenAI-shaped error with ``status``; return its error object."""
    assert resp.status_code == status, (resp.status_code, resp.get_data(as_text=True))
    assert resp.mimetype == "application/json"
    body = resp.get_json()
    assert set(body) == {"error"}
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]
    return err
