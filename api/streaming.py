"""OpenAI's streamed image responses: server-sent events carrying previews while the image is sampled, then
the image, from a generation that runs in a thread of its own while the request's thread writes the events.

    event: image_generation.partial_image        (image_edit.partial_image for edits)
    data: {"type": ..., "b64_json": preview, "partial_image_index": 0, "size", "output_format", ...}

    event: image_generation.completed            (image_edit.completed)
    data: {"type": ..., "b64_json": image, "usage": {...}, ...}

A failure after the stream has started (the 200 and its headers are gone) arrives as ``event: error`` with
``data: {"error": {message, type, param, code}}``, which OpenAI's client raises as APIError. A comment line
every ``KEEPALIVE_S`` seconds keeps proxies from timing the stream out while a step runs, and shows a client
that went away: its generation then stops at the next step, as a non-streamed one does.
"""
from __future__ import annotations

import base64
import json
import logging
import queue
import threading
import time

from .disconnect import ClientGone
from .errors import APIError

log = logging.getLogger("sd_api_server")
KEEPALIVE_S = 10.0
HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}   # the latter: nginx passes events at once


def partial_steps(partial_images: int, total: int) -> set[int]:
    """The (0-based) steps after which a preview is sent: ``partial_images`` of them, evenly spaced over the
    ``total`` steps and before the last (fewer when there are fewer steps than previews)."""
    return {round((j + 1) * total / (partial_images + 1)) - 1 for j in range(partial_images)} - {-1}


def sse(event: str, data: dict) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


def usage(model, prompt: str, width: int, height: int, input_images: int) -> dict:
    """OpenAI's token counts, read for this server's work: the prompt's CLIP tokens; an input image, and the
    output, as their latent cells (one per 8×8 pixels)."""
    tokenizer = getattr(model, "tokenizer", None)
    text = len(tokenizer.encode(prompt)) if tokenizer is not None else len(prompt.split())
    cells = (width // 8) * (height // 8)
    image = cells * input_images
    return {"input_tokens": text + image, "input_tokens_details": {"image_tokens": image, "text_tokens": text},
            "output_tokens": cells, "total_tokens": text + image + cells}


def stream(run, kind: str, fields: dict, encode_preview, finish, gone_probe=None):
    """The events of one streamed generation, as an iterator of bytes.

    ``run(client_gone, on_step)``: the generation (the queue's ``run``), returning the
    images; ``kind``: "image_generation" or "image_edit"; ``fields``: what every event carries (size,
    output_format, quality, background); ``encode_preview(step)``: a step's preview as bytes of the output
    format (None: none); ``finish(images)``: the completed event's own fields (b64_json, usage)."""
    events: queue.Queue = queue.Queue()
    closed = threading.Event()
    wanted: list = []                  # the steps that get a preview, once the total is known

    def client_gone() -> bool:
        return closed.is_set() or (gone_probe is not None and gone_probe())

    def on_step(step):
        if not wanted:
            wanted.append(partial_steps(fields["partial_images"], step.total))
        if step.image == 0 and step.index in wanted[0]:
            data = encode_preview(step)
            if data is not None:
                events.put(("partial", data))

    def work():
        try:
            events.put(("completed", finish(run(client_gone, on_step))))
        except ClientGone:
            events.put(("gone", None))
        except APIError as e:
            events.put(("error", e))
        except Exception:         # logged here; the client gets the generic 500 body
            log.exception("streamed generation failed")
            events.put(("error", APIError("The server had an error while generating.", status=500,
                                          type="server_error", code="generation_failed")))

    threading.Thread(target=work, name="stream-generation", daemon=True).start()
    common = {k: fields[k] for k in ("size", "output_format", "quality", "background")}

    def body():
        index = 0
        try:
            while True:
                try:
                    what, value = events.get(timeout=KEEPALIVE_S)
                except queue.Empty:
                    yield b": keep-alive\n\n"
                    continue
                now = int(time.time())
                if what == "partial":
                    yield sse(f"{kind}.partial_image", {
                        "type": f"{kind}.partial_image", "created_at": now, **common, "partial_image_index": index,
                        "b64_json": base64.b64encode(value).decode("ascii")})
                    index += 1
                elif what == "completed":
                    yield sse(f"{kind}.completed", {"type": f"{kind}.completed", "created_at": now, **common,
                                                    **value})
                    return
                elif what == "error":
                    yield sse("error", {"error": value.body()["error"]})
                    return
                else:                   # the client is gone: nobody reads this
                    return
        finally:
            closed.set()                # a client that went away stops its generation at the next step
    return body()
