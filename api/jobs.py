"""The running generations of every worker process, in files all of them read: what A1111's progress poll,
its interrupt and skip, and /health see, whichever gunicorn worker answers them.

``<data_dir>/.jobs/`` holds, per running generation, ``<pid>-<number>.json`` (rewritten, atomically,
after every sampler step), and while asked for, ``.png`` (its latest preview), ``.interrupt`` or ``.skip``
(a stop its worker obeys at the next step). A file whose process has died is stale: ignored and removed.
A preview is made only while someone has polled for one in the last ``WATCH_S`` seconds (``watch``):
nobody pays for pictures nobody looks at.
"""
from __future__ import annotations

import itertools
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("sd_api_server")
WATCH_S = 10.0
STOPS = ("interrupt", "skip")
_numbers = itertools.count(1)          # of this process's generations


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:          # someone else's process: alive
        return True
    return True


def _write(path: Path, data: bytes) -> None:
    """Best effort: a full or read-only disk costs the progress report, never the generation."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        log.warning("cannot write %s: %s", path.name, e.strerror or e)


class JobBoard:
    def __init__(self, data_dir):
        self.dir = Path(data_dir) / ".jobs"
        self.dir.mkdir(parents=True, exist_ok=True)
        self._watch = self.dir / "watch"

    def start(self, request_id: str, params) -> "Job":
        return Job(self, f"{os.getpid()}-{next(_numbers)}", request_id, params)

    def running(self) -> list[dict]:
        """The running generations, oldest first (stale files of dead workers removed)."""
        out = []
        for path in self.dir.glob("*.json"):
            try:
                job = json.loads(path.read_text())
            except (OSError, ValueError):       # removed or being replaced right now
                continue
            if not _alive(job.get("pid", 0)):
                for stale in self.dir.glob(path.stem + ".*"):
                    stale.unlink(missing_ok=True)
                continue
            out.append(job)
        return sorted(out, key=lambda j: j["started"])

    def stop(self, kind: str) -> int:
        """Ask every running generation to ``kind`` ("interrupt" or "skip") at its next step; how many."""
        assert kind in STOPS
        jobs = self.running()
        for job in jobs:
            (self.dir / f"{job['name']}.{kind}").touch()
        return len(jobs)

    def preview(self, job: dict) -> bytes | None:
        try:
            return (self.dir / f"{job['name']}.png").read_bytes()
        except OSError:
            return None

    def watch(self) -> None:
        """Someone wants previews: the running generations make them for the next ``WATCH_S`` seconds."""
        self._watch.touch()

    def watched(self) -> bool:
        try:
            return time.time() - self._watch.stat().st_mtime < WATCH_S
        except OSError:
            return False


@dataclass
class Job:
    board: JobBoard
    name: str
    request_id: str
    params: object

    def __post_init__(self):
        self.path = self.board.dir / f"{self.name}.json"
        self.started = time.time()
        self.update(None)

    def update(self, step) -> None:
        p = self.params
        state = {"name": self.name, "pid": os.getpid(), "request_id": self.request_id,
                 "started": self.started, "updated": time.time(), "image": 0, "images": p.n,
                 "step": 0, "steps": p.steps, "width": p.width, "height": p.height}
        if step is not None:
            state.update(image=step.image, step=step.index + 1, steps=step.total)
        _write(self.path, json.dumps(state).encode())

    def stop_asked(self) -> str | None:
        """"interrupt", "skip" (each asked once: the marker is taken away) or None."""
        for kind in STOPS:
            marker = self.board.dir / f"{self.name}.{kind}"
            if marker.exists():
                marker.unlink(missing_ok=True)
                return kind
        return None

    def set_preview(self, png: bytes) -> None:
        _write(self.board.dir / f"{self.name}.png", png)

    def finish(self) -> None:
        for path in self.board.dir.glob(self.name + ".*"):
            path.unlink(missing_ok=True)
