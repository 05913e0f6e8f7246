"""Per-worker state: the loaded models, and the generation runner (one generation at a time per
worker process, a bounded first-come-first-served wait queue, requests of disconnected clients
dropped, per-step progress logging, pipeline errors -> 400, other failures -> 500 without
details and with their memory freed)."""
from __future__ import annotations

import base64
import gc
import logging
import math
import select
import socket
import ssl
import sys
import threading
import time
import traceback
from collections import deque
from pathlib import Path

from sdcore.pipeline import PipelineError

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


CPUINFO = "/proc/cpuinfo"


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX: where bf16 matmuls run at about twice the fp32 rate (elsewhere they are
    emulated and slower than fp32)."""
    from sdcore.cpu_attention import cpu_flags
    return not cpu_flags(CPUINFO).isdisjoint({"avx512_bf16", "amx_bf16"})


def resolve_dtype(dtype: str, device: str):
    """``auto`` picks the fastest dtype whose images stay faithful (measured in docs/BENCHMARKS.md):
    bfloat16 on a CPU with native bf16 and on CUDA cards that support it (no fp16 overflow in the
    VAE), float16 on older CUDA cards, float32 elsewhere."""
    import torch
    if dtype != "auto":
        return getattr(torch, dtype)
    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device == "cpu" and cpu_has_native_bf16():
        return torch.bfloat16
    return torch.float32


def compile_and_warm_up(model):
    """Compile now, at the native size with CFG, rather than inside the first request's time limit."""
    from sdcore.pipeline import GenerationParams, generate
    model.compile()
    generate(model, GenerationParams(prompt="warm-up", width=model.native_size, height=model.native_size,
                                     steps=1, sample_method="euler"))


def worker_threads(settings, default: int) -> int | None:
    """Torch threads for one worker: --threads, else the cores split among the workers (None: leave
    torch's default). Every worker taking all cores oversubscribes them: two 256² generations at once on
    2 cores took 24-28 s each with 2 threads per process, 13-14 s with 1 (alone: 7.4 s)."""
    if settings.threads:
        return settings.threads
    return max(1, default // settings.workers) if settings.workers > 1 else None


def load_models(settings) -> ModelRegistry:
    """Load every configured model (all at start; the first is the default)."""
    import torch
    import sdcore
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


class ClientGone(Exception):
    """The client closed its connection: the queued or running generation was dropped."""


def client_gone_probe(environ):
    """A function telling whether the client of this request has closed its connection, or
    None where that cannot be known (TLS in the WSGI server, a test client).

    gunicorn (gthread) puts the connection's socket in ``environ["gunicorn.socket"]`` (Werkzeug's
    server in ``werkzeug.socket``). Once the request body has been read, a poll() that reports
    the socket readable and a MSG_PEEK recv() that returns b"" mean the peer sent FIN (or the
    socket shows an error): nobody is waiting for the answer. Bytes waiting there (a pipelined
    request) mean the client is still there; the peek consumes nothing. Behind nginx this works
    because nginx closes its upstream connection when its client goes away
    (proxy_ignore_client_abort off, the default)."""
    sock = environ.get("gunicorn.socket") or environ.get("werkzeug.socket")
    if sock is None or isinstance(sock, ssl.SSLSocket) or not hasattr(sock, "fileno"):
        return None

    def gone() -> bool:
        try:
            fd = sock.fileno()
            if fd < 0:
                return True
            poller = select.poll()
            poller.register(fd, select.POLLIN | getattr(select, "POLLRDHUP", 0))
            events = poller.poll(0)
            if not events:
                return False
            ev = events[0][1]
            if ev & (select.POLLERR | select.POLLHUP | select.POLLNVAL):
                return True
            return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
        except (BlockingIOError, InterruptedError):
            return False
        except OSError:           # reset, closed: gone
            return True

    return gone


def _is_out_of_memory(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError):
        return True
    if type(exc).__name__ == "OutOfMemoryError":        # torch.OutOfMemoryError (CUDA, MPS)
        return True
    text = str(exc).lower()                             # torch's CPU allocator: RuntimeError
    return isinstance(exc, RuntimeError) and ("out of memory" in text
                                              or "can't allocate memory" in text)


def free_memory() -> None:
    """Collect garbage (exception tracebacks form reference cycles that hold tensors) and hand
    cached accelerator memory back, after a failed generation."""
    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None:
        try:
            if torch.cuda.is_available() and torch.cuda.is_initialized():
                torch.cuda.empty_cache()
        except Exception:  # pragma: no cover - best effort
            pass


class Generator:
    """Serialises generations in this worker, first come first served.

    At most ``max_queue`` requests wait behind the running one; more get 503 at once with
    Retry-After, so that gunicorn threads stay free for health checks, downloads and listings.
    ``run(..., client_gone=f)``: ``f()`` says whether the client has disconnected. It is asked
    while the request waits (every ``poll_s`` seconds), right before the generation starts and
    after every sampler step; a gone client frees its place and costs no (further) generation.
    """

    def __init__(self, generate, max_queue: int = 4, poll_s: float = 0.25):
        self._generate = generate
        self._cond = threading.Condition()
        self._queue: deque = deque()      # tickets of waiting requests, oldest first
        self._running = False
        self.max_queue = max_queue
        self.poll_s = poll_s
        self.last_duration = None

    def _retry_after(self) -> str:
        return str(max(1, math.ceil(self.last_duration or 10)))

    @property
    def waiting(self) -> int:
        return len(self._queue)

    def _acquire(self, rid: str, client_gone) -> None:
        ticket = object()
        with self._cond:
            if int(self._running) + len(self._queue) >= 1 + self.max_queue:
                raise APIError("The server is busy with other generations; retry later.",
                               status=503, type="server_error", code="server_busy",
                               headers={"Retry-After": self._retry_after()})
            self._queue.append(ticket)
            if self._running or len(self._queue) > 1:
                log.info("request %s: queued (%d ahead)", rid,
                         int(self._running) + len(self._queue) - 1)
            try:
                while self._running or self._queue[0] is not ticket:
                    self._cond.wait(self.poll_s)
                    if client_gone is not None and client_gone():
                        log.info("request %s: client disconnected while queued; dropped", rid)
                        raise ClientGone()
                self._running = True
            finally:
                self._queue.remove(ticket)
                self._cond.notify_all()

    def _release(self) -> None:
        with self._cond:
            self._running = False
            self._cond.notify_all()

    def run(self, model, params, client_gone=None) -> list:
        rid = getattr(params, "request_id", "")
        self._acquire(rid, client_gone)
        failure = None
        try:
            if client_gone is not None and client_gone():
                log.info("request %s: client disconnected before its generation; dropped", rid)
                raise ClientGone()
            log.info("request %s: generating n=%d %dx%d steps=%d %s/%s seed=%d", rid,
                     params.n, params.width, params.height, params.steps,
                     params.sample_method, params.scheduler or "default", params.seed)

            def progress(step_index, total_steps, seconds_per_step):
                # step_index is 0-based; total_steps is the number of sampler steps actually
                # run (fewer than `steps` for img2img with strength < 1)
                log.info("request %s: step %d/%d, %.3f s/step", rid, step_index + 1,
                         total_steps, seconds_per_step or 0.0)
                if client_gone is not None and client_gone():
                    log.info("request %s: client disconnected during the generation; "
                             "stopped", rid)
                    raise ClientGone()

            t0 = time.monotonic()
            try:
                images = list(self._generate(model, params, progress=progress))
            except (ClientGone, APIError):
                raise
            except PipelineError as e:
                raise APIError(getattr(e, "message", None) or str(e), status=400,
                               param=getattr(e, "param", None)) from None
            except Exception as e:   # a genuine fault: logged with its traceback, never sent
                oom = _is_out_of_memory(e)
                # the traceback goes to the log as text: a handler that keeps records (or
                # exc_info) would otherwise keep the failed generation's frames and tensors
                log.error("request %s: generation failed%s\n%s", rid,
                          " (out of memory)" if oom else "",
                          "".join(traceback.format_exception(e)).rstrip())
                failure = oom
                e.__traceback__ = None      # drop the frames (and their tensors) now
            if failure is None:
                self.last_duration = time.monotonic() - t0
                log.info("request %s: done in %.2f s", rid, self.last_duration)
            else:
                free_memory()    # before the next generation starts
        finally:
            self._release()
        if failure is not None:   # raised outside the except block: no reference to the frames
            if failure:
                raise APIError("The generation ran out of memory; try a smaller size or n "
                               f"(request id {rid}).", status=500, type="server_error",
                               code="out_of_memory")
            raise APIError(f"The server had an error while generating (request id {rid}).",
                           status=500, type="server_error", code="generation_failed")
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
