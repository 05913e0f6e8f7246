"""Converted weights, cached: a network's tensors already renamed and cast to the load dtype, in a
safetensors file that later loads memory-map instead of converting again.

Why: most downloads are fp16 or fp32 and the CPU default is bf16, so every load converts each of
SD1.5's 1.07 G values, which takes longer than reading the file (docs/BENCHMARKS.md). A memory-mapped file
of the converted weights loads in the time of its page faults, and its pages are the page cache's:
every gunicorn worker that maps the same file shares one copy of the weights instead of its own.

One file per (source, network, dtype): ``<dir>/<source key>-<content key>.safetensors``. The content
key covers the source files' sizes and modification times, the network's configuration and sdcore's
own code, so any change to them writes a new file (and removes the old one of that source); the files
of a source that no longer exists are removed at the next load that uses the cache. A file is
written under a temporary name and renamed into place, holding an exclusive lock, and never changed
afterwards: workers starting together convert once, and a mapped file is never rewritten under a
reader. A write that cannot happen (no space, no permission, a dtype safetensors cannot store) logs a
warning and the load converts in memory as without a cache.
"""
import contextlib
import fcntl
import functools
import hashlib
import json
import logging
import os
import shutil
import struct
import time

import torch
from safetensors import safe_open

log = logging.getLogger("sdcore.weights_cache")

SAFETENSORS_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                      torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
                      torch.uint8: "U8", torch.bool: "BOOL"}
HEADROOM = 1 << 30      # bytes left free on the cache's disk after a write: generated images may share it
PAGE = 4096


def default_dir() -> str:
    """``$XDG_CACHE_HOME/sd-api-server/weights``, else ``~/.cache/sd-api-server/weights``."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "sd-api-server", "weights")


def load(cache_dir, source, what, cfg, dtype, wanted: dict, convert) -> dict | None:
    """The ``wanted`` tensors (our key -> meta tensor) as ``dtype``, memory-mapped from the cache;
    written there first, ``convert(key)`` giving each tensor, if the cache lacks them. None when the
    cache cannot be used (the caller converts in memory)."""
    fingerprint = _fingerprint(source, what, cfg, dtype)
    stem = _digest([fingerprint["source"], what, str(dtype)])
    path = os.path.join(cache_dir, f"{stem}-{_digest(fingerprint)}.safetensors")
    try:
        os.makedirs(cache_dir, exist_ok=True)
        with open(os.path.join(cache_dir, stem + ".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)          # released when the file closes, also if we die
            tensors = _mapped(path, wanted, dtype)
            if tensors is None:
                t0 = time.perf_counter()
                size = _write(path, wanted, dtype, convert, fingerprint)
                log.info("converted %s weights of %s to %s in %.1f s, cached as %s (%.2f GiB)", what, source,
                         str(dtype).removeprefix("torch."), time.perf_counter() - t0, path, size / 2**30)
                tensors = _mapped(path, wanted, dtype)
            else:
                log.info("%s weights of %s in %s: mapped from %s", what, source, str(dtype).removeprefix("torch."), path)
            for name in os.listdir(cache_dir):       # older conversions of this source, killed writers' files
                if name.startswith(stem + "-") and os.path.join(cache_dir, name) != path:
                    os.remove(os.path.join(cache_dir, name))
        _remove_orphans(cache_dir)
        if tensors is None:
            raise OSError(f"{path} does not read back as written")
    except Exception as e:      # a cache must never fail a load: a bad source fails the same way in memory
        log.warning("converted-weights cache not used for the %s of %s (%s: %s): converting in memory", what, source,
                    type(e).__name__, e)
        return None
    for t in tensors.values():      # fault the pages in now, not in the first generation (cold cache: reads the file)
        t.reshape(-1)[::max(1, PAGE // t.element_size())].sum()
    return tensors


def _remove_orphans(cache_dir) -> None:
    """Remove the entries whose source no longer exists (a deleted or moved checkpoint: 2 GiB each for
    SD1.5 in bf16), each under its source's lock, skipped while another process holds that. A source
    that is only missing for now (an unmounted disk) costs one conversion when it is back."""
    for name in os.listdir(cache_dir):
        path = os.path.join(cache_dir, name)
        if not name.endswith(".safetensors"):
            continue
        try:
            with safe_open(path, framework="pt") as f:
                source = json.loads(f.metadata()["sdcore.weights_cache"])["source"]
        except Exception:       # not an entry of ours, or being replaced right now: left alone
            continue
        if os.path.exists(source):
            continue
        with open(os.path.join(cache_dir, name.split("-")[0] + ".lock"), "a") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
                log.info("removed %s from the converted-weights cache: its source %s no longer exists", path, source)


def _stored_dtype(meta: torch.Tensor, dtype):
    return dtype if meta.is_floating_point() else meta.dtype


def _mapped(path, wanted, dtype) -> dict | None:
    """The file's tensors if it holds exactly ``wanted`` in the right dtype, else None (missing, from
    an interrupted write, or damaged: it will be written again)."""
    if not os.path.exists(path):
        return None
    try:
        f = safe_open(path, framework="pt")
        if set(f.keys()) != set(wanted):
            return None
        tensors = {k: f.get_tensor(k) for k in wanted}
    except Exception:           # safetensors raises its own error type for a truncated or malformed file
        return None
    if any(t.shape != wanted[k].shape or t.dtype != _stored_dtype(wanted[k], dtype) for k, t in tensors.items()):
        return None
    return tensors


def _write(path, wanted, dtype, convert, fingerprint) -> int:
    """Stream the converted tensors into a safetensors file, one at a time (no second copy of the
    weights in memory); -> its size. Widest dtypes first, so every tensor starts aligned to its own size."""
    order = sorted(wanted, key=lambda k: (-_stored_dtype(wanted[k], dtype).itemsize, k))
    header, offset = {}, 0
    for k in order:
        dt = _stored_dtype(wanted[k], dtype)
        n = wanted[k].numel() * dt.itemsize
        header[k] = {"dtype": SAFETENSORS_DTYPES[dt], "shape": list(wanted[k].shape), "data_offsets": [offset, offset + n]}
        offset += n
    header["__metadata__"] = {"sdcore.weights_cache": json.dumps(fingerprint)}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    size = 8 + len(blob) + offset
    free = shutil.disk_usage(os.path.dirname(path)).free
    if free < size + HEADROOM:
        raise OSError(f"{size / 2**30:.2f} GiB to write, {free / 2**30:.2f} GiB free on its disk "
                      f"(keeping {HEADROOM / 2**30:.0f} GiB free)")
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(blob)) + blob)
            for k in order:
                t = convert(k).to(_stored_dtype(wanted[k], dtype))
                f.write(t.contiguous().reshape(-1).view(torch.uint8).numpy().data)
            f.flush()
            os.fsync(f.fileno())        # a crash must not leave a complete-looking file of zeros
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    return size


def _fingerprint(source, what, cfg, dtype) -> dict:
    source = os.path.realpath(source)
    if os.path.isdir(source):
        files = sorted(os.path.join(d, n) for d, _, names in os.walk(source) for n in names)
    else:
        files = [source]
    stats = [(os.path.relpath(p, source) if p != source else "", st.st_size, st.st_mtime_ns)
             for p, st in ((p, os.stat(p)) for p in files)]
    return {"source": source, "files": stats, "what": what, "config": repr(cfg), "dtype": str(dtype),
            "code": _code_digest()}


@functools.cache
def _code_digest() -> str:
    """sdcore's own sources, sdcore.formats included: a change to the formats or a network invalidates
    the cache."""
    here, h = os.path.dirname(os.path.abspath(__file__)), hashlib.sha256()
    sources = sorted(os.path.relpath(os.path.join(d, n), here) for d, _, names in os.walk(here)
                     for n in names if n.endswith(".py"))
    for name in sources:
        h.update(name.encode())
        with open(os.path.join(here, name), "rb") as f:
            h.update(f.read())
    return h.hexdigest()[:16]


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj).encode()).hexdigest()[:16]
