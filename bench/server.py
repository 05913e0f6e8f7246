"""A real gunicorn (``gunicorn -c gunicorn.conf.py wsgi:app``), started as the integration tests start
it (bench/harness.py) but in the server's default dtype and threads, for the HTTP overhead and
the workers' memory."""
import re
import tempfile
import time
import uuid
from pathlib import Path

import requests

from bench.util import CACHE
from bench.harness import API_KEY, WEIGHTS, Gunicorn


class Server(Gunicorn):
    def __init__(self, model=WEIGHTS, threads: int = 0, args: tuple = (), **env):
        tmp = Path(tempfile.mkdtemp(prefix="bench-http-"))
        settings = dict(SD_MODEL=str(model), SD_THREADS=str(threads) if threads else None, SD_DTYPE=None,
                        SD_ACCESS_LOG="", SD_WEIGHTS_CACHE=str(CACHE / "weights-cache"))
        super().__init__(tmp / "data", tmp / "gunicorn.log", args=args, **{**settings, **env})
        self.wait_healthy(timeout=300)
        self.session = requests.Session()

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
        out["pipeline"] = float(self.wait_log(rf"request {rid}: done in ([0-9.]+) s", timeout=10).group(1))
        return out

    def wait_workers(self, workers: int, timeout: float = 300) -> None:
        """Until ``workers`` workers have logged that they are ready."""
        deadline = time.monotonic() + timeout
        while self.log_text().count("sd-api-server ready") < workers:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{workers} workers not ready after {timeout} s:\n{self.log_tail(3000)}")
            time.sleep(0.2)

    def worker_pss(self, workers: int) -> list[float]:
        """Once ``workers`` workers are ready: each one's proportional set size (MiB; pages shared between
        processes count a share each, /proc/PID/smaps_rollup)."""
        self.wait_workers(workers)
        return [int(re.search(r"^Pss:\s+(\d+)", (Path("/proc") / str(p) / "smaps_rollup").read_text(), re.M)[1]) / 1024
                for p in self.worker_pids()]
