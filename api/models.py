"""The loaded models of a worker process: loading them (the thread split, optional compile and
warm-up; the device and dtype policy is the core's, ``sdcore.device``) and looking them up by id."""
from __future__ import annotations

import logging
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


def compile_and_warm_up(model):
    """Compile now, at the native size with CFG, rather than inside the first request's time limit."""
    from sdcore.pipeline import GenerationParams, generate
    model.compile()
    generate(model, GenerationParams(prompt="warm-up", width=model.native_size, height=model.native_size,
                                     steps=1, sample_method="euler"))


def worker_threads(settings, default: int) -> int | None:
    """Torch threads for one worker: --threads, else the cores split among the workers (None: leave
    torch's default): every worker taking all cores would oversubscribe them, and concurrent
    generations would each run slower than with their share."""
    if settings.threads:
        return settings.threads
    return max(1, default // settings.workers) if settings.workers > 1 else None


def load_models(settings) -> ModelRegistry:
    """Load every configured model (all at start; the first is the default)."""
    import torch

    import sdcore
    from sdcore.device import resolve_device, resolve_dtype
    threads = worker_threads(settings, torch.get_num_threads())
    if threads:
        torch.set_num_threads(threads)
    device = resolve_device(settings.device)
    dtype = resolve_dtype(settings.dtype, device)
    models = {}
    for name, path in settings.model_specs():
        if not Path(path).exists():
            hint = " (generate it with: python -m weights.make_default)" if path.endswith(
                "tiny-sd1.safetensors") else ""
            raise FileNotFoundError(f"model {name!r}: {path} does not exist{hint}")
        t0 = time.monotonic()
        models[name] = sdcore.load_model(path, device=device, dtype=dtype, vae=settings.vae, name=name,
                                         control_net=settings.control_net, cache_dir=settings.weights_cache_dir(),
                                         cuda_graphs=settings.cuda_graphs)
        log.info("loaded model %r from %s on %s (%s) in %.1f s", name, path, device,
                 str(dtype).removeprefix("torch."), time.monotonic() - t0)
        if settings.compile:
            t0 = time.monotonic()
            compile_and_warm_up(models[name])
            log.info("compiled model %r's UNet at %d×%d in %.1f s", name, models[name].native_size,
                     models[name].native_size, time.monotonic() - t0)
    return ModelRegistry(models)
