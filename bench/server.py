"""A real gunicorn (``gunicorn -c gunicorn.conf.py wsgi:app``) on the tiny default model, as the
integration tests start it (tests/server_helpers.py), for the HTTP overhead measurement."""
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import requests

from bench.util import CACHE, ROOT

API_KEY = "bench-key"
TINY = ROOT / "weights" / "tiny-sd1.safetensors"


class Server:
    def __init__(self, model=TINY, threads: int = 0, **env):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.base = f"http://127.0.0.1:{self.port}"
        self.tmp = Path(tempfile.mkdtemp(prefix="bench-http-"))
        self.log_path = self.tmp / "gunicorn.log"
        e = {k: v for k, v in os.environ.items() if not k.startswith("SD_") and k != "API_KEY"}
        e.update(SD_HOST="127.0.0.1", SD_PORT=str(self.port), SD_DATA_DIR=str(self.tmp / "data"), SD_MODEL=str(model),
                 API_KEY=API_KEY, SD_DEVICE="cpu", SD_WORKERS="1", SD_HTTP_THREADS="4", SD_LOG_LEVEL="info",
                 SD_ACCESS_LOG="", PYTHONUNBUFFERED="1", SD_WEIGHTS_CACHE=str(CACHE / "weights-cache"))
        if threads:
            e["SD_THREADS"] = str(threads)
        e.update(env)
        self.log = open(self.log_path, "wb")
        gunicorn = Path(sys.executable).parent / "gunicorn"
        self.proc = subprocess.Popen([str(gunicorn), "-c", "gunicorn.conf.py", "wsgi:app"], cwd=ROOT, env=e,
                                     stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 300
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gunicorn exited with {self.proc.returncode}:\n{self.log_text()[-3000:]}")
            try:
                if requests.get(self.base + "/health", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"gunicorn not healthy after 300 s:\n{self.log_text()[-3000:]}")
            time.sleep(0.2)
        self.session = requests.Session()

    def log_text(self) -> str:
        self.log.flush()
        return self.log_path.read_text("utf-8", "replace")

    def generate(self, size: int, steps: int, response_format: str, download: bool = False) -> dict:
        """One request; returns end-to-end seconds, the server's logged pipeline seconds, and for
        url the seconds to GET the PNG."""
        rid = "bench" + uuid.uuid4().hex[:12]
        body = {"prompt": "a red fox in the snow", "size": f"{size}x{size}", "steps": steps, "seed": 1,
                "response_format": response_format}
        headers = {"Authorization": f"Bearer {API_KEY}", "X-Request-Id": rid}
        t0 = time.perf_counter()
        r = self.session.post(self.base + "/v1/images/generations", json=body, headers=headers, timeout=600)
        e2e = time.perf_counter() - t0
        r.raise_for_status()
        item = r.json()["data"][0]
        out = {"e2e": e2e, "bytes": len(r.content)}
        if download:
            t0 = time.perf_counter()
            png = self.session.get(item["url"], headers=headers, timeout=60)
            png.raise_for_status()
            out["download"] = time.perf_counter() - t0
        deadline = time.monotonic() + 10
        while True:
            m = re.search(rf"request {rid}: done in ([0-9.]+) s", self.log_text())
            if m:
                out["pipeline"] = float(m.group(1))
                return out
            if time.monotonic() > deadline:
                raise RuntimeError(f"no 'done in' line for {rid}:\n{self.log_text()[-2000:]}")
            time.sleep(0.02)

    def worker_pss(self, workers: int, timeout: float = 300) -> list[float]:
        """Once ``workers`` workers have logged their model load: each one's proportional set size (MiB;
        pages shared between processes count a share each, /proc/PID/smaps_rollup)."""
        deadline = time.monotonic() + timeout
        while self.log_text().count("loaded model") < workers:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{workers} workers not loaded after {timeout} s:\n{self.log_text()[-3000:]}")
            time.sleep(0.2)
        pids = [int(d.name) for d in Path("/proc").iterdir() if d.name.isdigit() and _ppid(d) == self.proc.pid]
        return [int(re.search(r"^Pss:\s+(\d+)", (Path("/proc") / str(p) / "smaps_rollup").read_text(), re.M)[1]) / 1024
                for p in pids]

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.log.close()


def _ppid(proc_dir: Path) -> int:
    try:
        return int((proc_dir / "stat").read_text().rpartition(")")[2].split()[1])
    except (OSError, IndexError, ValueError):
        return -1
