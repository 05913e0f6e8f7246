"""Per-worker state: the loaded models, and the generation runner (one generation at a time per
worker process, a bounded wait queue, per-step progress logging, pipeline errors -> 400)."""
from __future__ import annotations

import base64
import inspect
import logging
import math
import threading
import time
from pathlib import Path

from .errors import APIError

log = logging.getLogger("sd_api_server")


class ModelRegistry:
    """Model id -> loaded model; the first one is the default."""

    def __init__(self, models: dict):
        if not models:
            raise ValueError("no model")
        self.models = dict(models)
        self.default_id = next(iter(self.models))
        self.created = int(time.time())

    def resolve(self, model_id: str | None):
        if model_id is None:
            return self.models[self.default_id]
        try:
            return self.models[model_id]
        except KeyError:
            raise APIError(f"The model '{model_id}' does not exist. Available: "
                           f"{', '.join(self.models)}.", status=404, param="model",
                           code="model_not_found") from None

    def ids(self) -> list[str]:
        return list(self.models)

    def as_openai(self, model_id: str) -> dict:
        return {"id": model_id, "object": "model", "created": self.created,
                "owned_by": "sd-api-server"}


def resolve_device(device: str) -> str:
    if device != "auto":
        return device
    import torch
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_models(settings) -> ModelRegistry:
    """Load every configured model (all at start; the first is the default)."""
    import torch
    import sdcore
    if settings.threads:
        torch.set_num_threads(settings.threads)
    device = resolve_device(settings.device)
    dtype = getattr(torch, settings.dtype)
    models = {}
    for name, path in settings.model_specs():
        if not Path(path).exists():
            hint = " (generate it with: python -m weights.make_default)" if path.endswith(
                "tiny-sd1.safetensors") else ""
            raise FileNotFoundError(f"model {name!r}: {path} does not exist{hint}")
        kwargs = dict(device=device, dtype=dtype, vae=settings.vae, name=name)
        if settings.control_net:
            if "control_net" not in inspect.signature(sdcore.load_model).parameters:
                raise RuntimeError("--control-net: this sdcore.load_model has no control_net "
                                   "argument (ControlNet is not supported yet)")
            kwargs["control_net"] = settings.control_net
        t0 = time.monotonic()
        models[name] = sdcore.load_model(path, **kwargs)
        log.info("loaded model %r from %s on %s (%s) in %.1f s", name, path, device,
                 settings.dtype, time.monotonic() - t0)
    return ModelRegistry(models)


def _pipeline_error_class():
    try:
        from sdcore.pipeline import PipelineError
        return PipelineError
    except ImportError:  # pragma: no cover - the pipeline is part of the project
        return ()


class Generator:
    """Serialises generations in this worker. At most ``max_queue`` requests wait behind the
    running one; more get 503 with Retry-After, so that gunicorn threads stay free for health
    checks, downloads and listings."""

    def __init__(self, generate, max_queue: int = 4):
        self._generate = generate
        self._lock = threading.Lock()
        self._count_lock = threading.Lock()
        self._pending = 0
        self.max_queue = max_queue
        self.last_duration = None

    def _retry_after(self) -> str:
        return str(max(1, math.ceil(self.last_duration or 10)))

    def run(self, model, params) -> list:
        rid = getattr(params, "request_id", "")
        with self._count_lock:
            if self._pending >= 1 + self.max_queue:
                raise APIError("The server is busy with other generations; retry later.",
                               status=503, type="server_error", code="server_busy",
                               headers={"Retry-After": self._retry_after()})
            self._pending += 1
        try:
            with self._lock:
                log.info("request %s: generating n=%d %dx%d steps=%d %s/%s seed=%d", rid,
                         params.n, params.width, params.height, params.steps,
                         params.sample_method, params.scheduler or "default", params.seed)

                def progress(step_index, total_steps, seconds_per_step):
                    # step_index is 0-based; total_steps is the number of sampler steps actually
                    # run (fewer than `steps` for img2img with strength < 1)
                    log.info("request %s: step %d/%d, %.3f s/step", rid, step_index + 1,
                             total_steps, seconds_per_step or 0.0)

                t0 = time.monotonic()
                try:
                    images = self._generate(model, params, progress=progress)
                except _pipeline_error_class() as e:
                    raise APIError(getattr(e, "message", None) or str(e), status=400,
                                   param=getattr(e, "param", None)) from None
                self.last_duration = time.monotonic() - t0
                log.info("request %s: done in %.2f s", rid, self.last_duration)
        finally:
            with self._count_lock:
                self._pending -= 1
        images = list(images)
        if len(images) != params.n:
            raise RuntimeError(f"pipeline returned {len(images)} images for n={params.n}")
        return images


def image_item(img, prompt: str, response_format: str, store=None, url_for_file=None) -> dict:
    """One element of the response's ``data``."""
    if response_format == "b64_json":
        item = {"b64_json": base64.b64encode(img.png).decode("ascii")}
    else:
        stored = store.save(img.png, f"image-{int(img.seed)}.png")
        item = {"url": url_for_file(stored)}
    item["prompt"] = prompt
    item["seed"] = int(img.seed)
    return item
