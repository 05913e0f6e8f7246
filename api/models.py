"""The loaded models of a worker process: loading them (the thread split, optional compile and
warm-up; the device and dtype policy is the core's, ``sdcore.device``) and looking them up by id."""
from __future__ import annotations

import logging
import time
from pathlib import Path

from .config import ConfigError
from .errors import APIError

log = logging.getLogger("sd_api_server")


class ModelRegistry:
    """Model id -> loaded model; the first one is the default. ``aliases``: other names for served ids.

    A generation naming a model the server does not serve gets the default model: most clients send a
    name of their own (``dall-e-2``, ``gpt-image-1``, the seed document's ``sd``). ``strict`` answers
    404 instead. Looking a model up by id (``GET /v1/models/{id}``) is always strict. ``lora_dir``: where
    the adapters requests name live (sdcore.lora), None: none are served."""

    def __init__(self, models: dict, aliases: dict | None = None, strict: bool = False, lora_dir: str | None = None):
        if not models:
            raise ValueError("no model")
        self.models = dict(models)
        self.aliases = dict(aliases or {})
        unknown = sorted(set(self.aliases.values()) - set(self.models))
        if unknown:
            raise ConfigError(f"model alias for a model that is not served: {', '.join(unknown)} "
                              f"(served: {', '.join(self.models)})")
        self.strict, self.lora_dir = strict, lora_dir
        self.default_id = next(iter(self.models))
        self.created = int(time.time())

    def lookup(self, model_id: str):
        """The model served under ``model_id`` or one of its aliases, else a 404."""
        model = self.find(model_id)
        if model is None:
            raise APIError(f"The model '{model_id}' does not exist. Available: "
                           f"{', '.join(self.models)}.", status=404, param="model",
                           code="model_not_found")
        return model

    def find(self, model_id: str):
        """The model served under ``model_id`` or one of its aliases, else None."""
        return self.models.get(self.aliases.get(model_id, model_id))

    def resolve(self, model_id: str | None):
        """The model a generation asking for ``model_id`` (None: none named) runs on."""
        if model_id is None:
            return self.models[self.default_id]
        if self.strict or self.aliases.get(model_id, model_id) in self.models:
            return self.lookup(model_id)
        log.debug("model %r is not served: the default model %r draws it", model_id, self.default_id)
        return self.models[self.default_id]

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
    from sdcore.model import attach_taesd
    threads = worker_threads(settings, torch.get_num_threads())
    if threads:
        torch.set_num_threads(threads)
    device = resolve_device(settings.device)
    dtype = resolve_dtype(settings.dtype, device)
    models, sizes = {}, settings.native_sizes()
    for name, path in settings.model_specs():
        if not Path(path).exists():
            hint = " (generate it with: python -m weights.make_default)" if path.endswith(
                "tiny-sd1.safetensors") else ""
            raise FileNotFoundError(f"model {name!r}: {path} does not exist{hint}")
        t0 = time.monotonic()
        models[name] = sdcore.load_model(path, device=device, dtype=dtype, vae=settings.vae, name=name,
                                         control_net=settings.control_net, cache_dir=settings.weights_cache_dir(),
                                         cuda_graphs=settings.cuda_graphs, native_size=sizes.get(name),
                                         vae_tiling=settings.vae_tiling, clip_l=settings.clip_l,
                                         clip_g=settings.clip_g, t5xxl=settings.t5xxl,
                                         quantized_weights=settings.quantized_weights,
                                         text_device="cpu" if settings.clip_on_cpu else None)
        taesd = settings.taesd_for(path)
        if taesd:
            try:
                attach_taesd(models[name], taesd, settings.taesd_decode)
            except sdcore.CheckpointError as e:      # a decoder for another latent space: previews by projection
                log.warning("model %r: no TAESD previews: %s", name, e)
        log.info("loaded model %r from %s on %s (%s) in %.1f s", name, path, device,
                 str(dtype).removeprefix("torch."), time.monotonic() - t0)
        if settings.compile:
            t0 = time.monotonic()
            compile_and_warm_up(models[name])
            log.info("compiled model %r's UNet at %d×%d in %.1f s", name, models[name].native_size,
                     models[name].native_size, time.monotonic() - t0)
    return ModelRegistry(models, settings.aliases(), settings.strict_models, settings.lora_model_dir)
