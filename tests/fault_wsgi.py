"""gunicorn entry point for the fault tests (``gunicorn -c gunicorn.conf.py fault_wsgi:app`` with
``tests/`` on PYTHONPATH): the real application and the real model, with the generation function
wrapped through ``create_app(generate=...)``, the ordinary injection point. Nothing here is part
of the server; prompts that start with a marker make the wrapper misbehave:

* ``FAULT:slow <prompt>``: the real generation, 0.4 s slower per sampler step (the progress
  callback sleeps before reporting), so a test can act while a generation is running;
* ``FAULT:oom <prompt>``: takes ~256 MiB (a tensor it touches), then asks torch for a tensor
  that cannot be allocated: a genuine ``RuntimeError`` from torch's CPU allocator;
* ``FAULT:slowsave <prompt>``: the real generation, then the next fsync of the image store
  (after the image bytes reach the temporary file, before the rename) waits 60 s, so a test
  can kill the worker in the middle of writing an image.
"""
import os
import time

import torch

from api import storage
from app import create_app
from sdcore.pipeline import generate as real_generate

SLOW_STEP_S = 0.4
HOG_BYTES = 256 * 1024 * 1024
_hold_next_fsync = [False]


class _SlowFsyncOS:
    """``os`` for api.storage, except that fsync can be held once."""

    def __getattr__(self, name):
        return getattr(os, name)

    @staticmethod
    def fsync(fd):
        if _hold_next_fsync[0]:
            _hold_next_fsync[0] = False
            print(f"fault_wsgi: holding a write ({os.getpid()})", flush=True)
            time.sleep(60)
        return os.fsync(fd)


storage.os = _SlowFsyncOS()


def generate(model, params, progress=None):
    prompt = params.prompt
    if prompt.startswith("FAULT:oom"):
        hog = torch.ones(HOG_BYTES // 4)                     # touched: resident
        print(f"fault_wsgi: holding {hog.numel() * 4 >> 20} MiB", flush=True)
        torch.empty(2 ** 42, dtype=torch.float32)            # 16 TiB: the allocator refuses
        raise AssertionError("unreachable")
    if prompt.startswith("FAULT:slowsave"):
        _hold_next_fsync[0] = True
    if prompt.startswith("FAULT:slow "):
        inner = progress

        def progress(step):
            time.sleep(SLOW_STEP_S)
            if inner is not None:
                inner(step)
    return real_generate(model, params, progress=progress)


app = create_app(generate=generate)
