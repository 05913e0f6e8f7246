"""The generation queue of a worker process: one generation at a time, a bounded
first-come-first-served wait, requests of disconnected clients dropped, per-step progress logging and
reporting (api.jobs: progress, previews, interrupt and skip, seen by every worker), pipeline errors -> 400,
other failures -> 500 without details and with their memory freed."""
from __future__ import annotations

import gc
import io
import logging
import math
import sys
import threading
import time
import traceback
from collections import deque

from sdcore.pipeline import Interrupt, PipelineError, to_jpeg_or_webp

from .disconnect import ClientGone
from .errors import APIError
from .params import http_param

log = logging.getLogger("sd_api_server")


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


class GenerationQueue:
    """Serialises generations in this worker, first come first served.

    At most ``max_queue`` requests wait behind the running one; more get 503 at once with
    Retry-After, so that gunicorn threads stay free for health checks, downloads and listings.
    ``run(..., client_gone=f)``: ``f()`` says whether the client has disconnected. It is asked
    while the request waits (every ``poll_s`` seconds), right before the generation starts and
    after every sampler step; a gone client frees its place and costs no (further) generation.
    ``jobs``: the api.jobs.JobBoard the running generation reports to (None: it reports nowhere);
    ``preview(model, latent, size)``: the picture of a latent (sdcore.previews.preview).
    """

    def __init__(self, generate, max_queue: int = 4, poll_s: float = 0.25, jobs=None, preview=None):
        self._generate = generate
        self.jobs = jobs
        self._preview = preview
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

    @property
    def busy(self) -> bool:
        return self._running

    def enter(self, rid: str) -> object:
        """A place in the queue (a ticket for ``run``), or 503 when the queue is full."""
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
        return ticket

    def _acquire(self, rid: str, client_gone, ticket) -> None:
        with self._cond:
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

    def run(self, model, params, request_id: str = "", client_gone=None, on_step=None, ticket=None) -> list:
        """The images of ``params`` on ``model``, generated when this request's turn comes;
        ``request_id`` names the request in the log and in error messages. ``on_step(step)``: called
        with every sampler step (sdcore.pipeline.Step). ``ticket``: the place ``enter`` gave, else
        one is taken now. Fewer than n images come back when the generation was interrupted."""
        rid = request_id
        self._acquire(rid, client_gone, ticket if ticket is not None else self.enter(rid))
        job = None
        try:
            if client_gone is not None and client_gone():
                log.info("request %s: client disconnected before its generation; dropped", rid)
                raise ClientGone()
            job = self.jobs.start(rid, params) if self.jobs is not None else None
            progress = self._progress(model, params, rid, client_gone, job, on_step)
            images, failure = self._generate_logged(model, params, rid, progress)
            if failure is not None:
                free_memory()    # before the next generation starts
        finally:
            if job is not None:
                job.finish()
            self._release()
        if failure is not None:
            raise _failure_error(failure, rid)
        if not (len(images) == params.n or (progress.stopped and 1 <= len(images) < params.n)):
            raise RuntimeError(f"pipeline returned {len(images)} images for n={params.n}")
        return images

    def preview(self, model, step, size, fmt: str = "png", quality: int = 100) -> bytes | None:
        """A step's preview at ``size`` (width, height), encoded as ``fmt`` (png, jpeg, webp); None where it could
        not be made."""
        try:
            img = self._preview(model, step.denoised, size)
            if fmt != "png":
                return to_jpeg_or_webp(img, "", fmt, quality)
            buf = io.BytesIO()
            img.save(buf, format="PNG")
            return buf.getvalue()
        except Exception:      # a preview is never worth a generation
            log.exception("preview failed")
            return None

    def _progress(self, model, params, rid: str, client_gone, job, on_step):
        """The pipeline's per-step callback: logs the step, reports it (jobs, ``on_step``), stops a
        generation nobody waits for, and one asked to stop (api.jobs)."""
        def progress(step):
            # step.index is 0-based; step.total is the number of sampler steps actually run
            # (fewer than `steps` for img2img with strength < 1)
            log.info("request %s: step %d/%d, %.3f s/step", rid, step.index + 1, step.total,
                     step.seconds or 0.0)
            if client_gone is not None and client_gone():
                log.info("request %s: client disconnected during the generation; stopped", rid)
                raise ClientGone()
            if job is not None:
                job.update(step)
                if self.jobs.watched():
                    png = self.preview(model, step, (params.width, params.height))
                    if png is not None:
                        job.set_preview(png)
                stop = job.stop_asked()
                if stop is not None:
                    log.info("request %s: %s asked; the image is finished from step %d", rid, stop,
                             step.index + 1)
                    progress.stopped = stop
                    raise Interrupt(skip=stop == "skip")
            if on_step is not None:
                on_step(step)
        progress.stopped = None          # the stop obeyed, if any
        return progress

    def _generate_logged(self, model, params, rid: str, progress):
        """(images, None), or (None, out_of_memory) after a fault. The fault is logged and
        dropped in here, so that none of its frames (and their tensors) outlives this call."""
        log.info("request %s: generating n=%d %dx%d steps=%d %s/%s seed=%d", rid,
                 params.n, params.width, params.height, params.steps,
                 params.sample_method, params.scheduler or "default", params.seed)
        t0 = time.monotonic()
        try:
            images = list(self._generate(model, params, progress=progress))
        except (ClientGone, APIError):
            raise
        except PipelineError as e:
            raise APIError(e.message, status=400, param=http_param(e.field)) from None
        except Exception as e:   # a genuine fault: logged with its traceback, never sent
            oom = _is_out_of_memory(e)
            # the traceback goes to the log as text: a handler that keeps records (or
            # exc_info) would otherwise keep the failed generation's frames and tensors
            log.error("request %s: generation failed%s\n%s", rid,
                      " (out of memory)" if oom else "",
                      "".join(traceback.format_exception(e)).rstrip())
            e.__traceback__ = None      # drop the frames (and their tensors) now
            return None, oom
        self.last_duration = time.monotonic() - t0
        log.info("request %s: done in %.2f s", rid, self.last_duration)
        return images, None


def _failure_error(out_of_memory: bool, rid: str) -> APIError:
    if out_of_memory:
        return APIError("The generation ran out of memory; try a smaller size or n "
                        f"(request id {rid}).", status=500, type="server_error",
                        code="out_of_memory")
    return APIError(f"The server had an error while generating (request id {rid}).",
                    status=500, type="server_error", code="generation_failed")
