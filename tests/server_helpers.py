"""Start a real gunicorn (``gunicorn -c gunicorn.conf.py wsgi:app``) with the tiny default model,
for the integration and nginx tests. Fails clearly (never skips) when the pipeline or the
default weights are missing."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

ROOT = Path(__file__).resolve().parent.parent
WEIGHTS = ROOT / "weights" / "tiny-sd1.safetensors"
GUNICORN = Path(sys.executable).parent / "gunicorn"
API_KEY = "test-key"


def require_pipeline() -> None:
    problems = []
    if not WEIGHTS.exists():
        problems.append(f"{WEIGHTS} is missing (generate it: python -m weights.make_default)")
    try:
        from sdcore.pipeline import generate  # noqa: F401
    except ImportError as e:
        problems.append(f"sdcore.pipeline.generate is not importable ({e})")
    if not GUNICORN.exists():
        problems.append(f"{GUNICORN} is missing (install the project: scripts/setup --test)")
    if problems:
        pytest.fail("integration prerequisites missing: " + "; ".join(problems), pytrace=False)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Gunicorn:
    def __init__(self, data_dir: Path, log_path: Path, **env):
        self.port = free_port()
        self.log_path = log_path
        self.base = f"http://127.0.0.1:{self.port}"
        e = {k: v for k, v in os.environ.items() if not k.startswith("SD_") and k != "API_KEY"}
        e.update(SD_HOST="127.0.0.1", SD_PORT=str(self.port), SD_DATA_DIR=str(data_dir),
                 API_KEY=API_KEY, SD_DEVICE="cpu", SD_WORKERS="1", SD_HTTP_THREADS="4",
                 SD_THREADS="2", SD_LOG_LEVEL="info", PYTHONUNBUFFERED="1")
        e.update(env)
        self.log = open(log_path, "wb")
        self.proc = subprocess.Popen([str(GUNICORN), "-c", "gunicorn.conf.py", "wsgi:app"],
                                     cwd=ROOT, env=e, stdout=self.log, stderr=subprocess.STDOUT)

    def log_tail(self, n=4000) -> str:
        self.log.flush()
        return self.log_path.read_bytes()[-n:].decode("utf-8", "replace")

    def wait_healthy(self, timeout=180) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"gunicorn exited with {self.proc.returncode}:\n{self.log_tail()}",
                            pytrace=False)
            try:
                if requests.get(self.base + "/health", timeout=2).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.3)
        self.stop()
        pytest.fail(f"gunicorn not healthy after {timeout} s:\n{self.log_tail()}", pytrace=False)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.log.close()
