"""Real servers for the tests and the benchmarks: a gunicorn (``gunicorn -c gunicorn.conf.py wsgi:app``)
with the tiny default model, a real nginx running deploy/nginx.conf in front of it, raw HTTP, and a
battery of slow clients. Fails clearly (never skips) when the pipeline or the default weights are
missing. bench/references.py holds the numerical references (diffusers, transformers, k-diffusion)."""
from __future__ import annotations

import contextlib
import os
import re
import signal
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests

ROOT = Path(__file__).resolve().parent.parent
TESTS = ROOT / "tests"
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
    """``gunicorn -c gunicorn.conf.py <app>`` on a free loopback port.

    ``env`` overrides the environment (SD_* settings; ``API_KEY=""`` runs without a key; None removes
    a setting, leaving the server's default).
    ``app`` is the WSGI entry point (``fault_wsgi:app`` for the fault tests: tests/ is put on
    PYTHONPATH). ``preexec_fn`` runs in the child before exec (resource limits). ``args``: more gunicorn
    command-line options (they win over gunicorn.conf.py).
    ``log_pipe``: the server's output goes through a pipe copied to ``log_path`` by a thread
    (for a server whose own file writes are limited)."""

    def __init__(self, data_dir: Path, log_path: Path, app: str = "wsgi:app", preexec_fn=None,
                 log_pipe: bool = False, args: tuple = (), **env):
        self.port = free_port()
        self.log_path = log_path
        self.base = f"http://127.0.0.1:{self.port}"
        e = {k: v for k, v in os.environ.items() if not k.startswith("SD_") and k != "API_KEY"}
        e.update(SD_MODEL=str(WEIGHTS), SD_HOST="127.0.0.1", SD_PORT=str(self.port), SD_DATA_DIR=str(data_dir),
                 API_KEY=API_KEY, SD_DEVICE="cpu", SD_WORKERS="1", SD_HTTP_THREADS="4",
                 SD_THREADS="2", SD_LOG_LEVEL="info", PYTHONUNBUFFERED="1",
                 SD_DTYPE="float32",          # the reference comparisons are fp32; the default-model test passes auto
                 SD_WEIGHTS_CACHE=str(data_dir.parent / "weights-cache"))     # not the user's ~/.cache
        if app != "wsgi:app":
            e["PYTHONPATH"] = os.pathsep.join([str(TESTS), str(ROOT), e.get("PYTHONPATH", "")])
        e.update(env)
        e = {k: v for k, v in e.items() if v is not None}        # None: leave that setting at its default
        self.log = open(log_path, "wb")
        self._copier = None
        self.proc = subprocess.Popen([str(GUNICORN), "-c", "gunicorn.conf.py", *args, app],
                                     cwd=ROOT, env=e, preexec_fn=preexec_fn,
                                     stdout=subprocess.PIPE if log_pipe else self.log,
                                     stderr=subprocess.STDOUT)
        if log_pipe:
            def copy(src=self.proc.stdout, dst=self.log):
                for line in iter(src.readline, b""):
                    dst.write(line)
                    dst.flush()
            self._copier = threading.Thread(target=copy, daemon=True)
            self._copier.start()

    def log_text(self) -> str:
        if not self.log.closed:
            self.log.flush()
        return self.log_path.read_bytes().decode("utf-8", "replace")

    def log_tail(self, n=4000) -> str:
        return self.log_text()[-n:]

    def wait_log(self, pattern: str, timeout: float = 60, start: int = 0) -> re.Match:
        """Wait until the log (from character ``start``) matches the regular expression."""
        deadline = time.monotonic() + timeout
        while True:
            m = re.compile(pattern).search(self.log_text(), start)
            if m:
                return m
            if time.monotonic() > deadline:
                raise AssertionError(f"{pattern!r} not in the log after {timeout} s:\n"
                                     f"{self.log_tail()}")
            time.sleep(0.05)

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

    def worker_pids(self) -> list[int]:
        """Pids of the master's worker processes (from /proc)."""
        out = []
        for d in Path("/proc").iterdir():
            if not d.name.isdigit():
                continue
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rpartition(")")[2].split()[1])
            if ppid == self.proc.pid:
                out.append(int(d.name))
        return sorted(out)

    def worker_pid(self, timeout: float = 60) -> int:
        deadline = time.monotonic() + timeout
        while True:
            pids = self.worker_pids()
            if len(pids) == 1:
                return pids[0]
            if time.monotonic() > deadline:
                raise AssertionError(f"expected one worker, found {pids}")
            time.sleep(0.1)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if self._copier is not None:
            self._copier.join(10)
        self.log.close()


def rss_kb(pid: int) -> int:
    """Resident set size of a process, in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


def kill(pid: int) -> None:
    os.kill(pid, signal.SIGKILL)


def auth_headers(key: str = API_KEY) -> dict:
    return {"Authorization": f"Bearer {key}"}


def server_fixture(tmp_path_factory, name: str, **kw):
    """Start a Gunicorn for a module-scoped fixture; the caller stops it."""
    require_pipeline()
    tmp = tmp_path_factory.mktemp(name)
    srv = Gunicorn(tmp / "data", tmp / "gunicorn.log", **kw)
    srv.tmp = tmp
    srv.wait_healthy()
    return srv


def raw_http(port: int, data: bytes, timeout: float = 30, shut_write: bool = False
             ) -> tuple[int, dict, bytes]:
    """Send raw bytes (requests/urllib3 normalise ``..`` in paths) and read one response:
    (status, headers with lower-case names, body)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        if shut_write:
            s.shutdown(socket.SHUT_WR)
        return read_response(s)


def read_response(s: socket.socket) -> tuple[int, dict, bytes]:
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = s.recv(65536)
        if not chunk:
            raise AssertionError(f"connection closed before a response: {buf[:200]!r}")
        buf += chunk
    head, _, body = buf.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        headers[k.strip().lower()] = v.strip()
    length = int(headers.get("content-length", "0"))
    while len(body) < length:
        chunk = s.recv(65536)
        if not chunk:
            break
        body += chunk
    return status, headers, body[:length]


NGINX = shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx")
                                       if os.path.exists(p)), None)


def render_site(gunicorn_ports: list[int], nginx_port: int, directives: dict | None = None) -> str:
    """deploy/nginx.conf with the gunicorn upstream(s), the listen port and ``directives`` (name -> value,
    each set once in the site's server block) substituted."""
    site = (ROOT / "deploy" / "nginx.conf").read_text()
    for name, value in (directives or {}).items():
        site, n = re.subn(rf"(?m)^(    {name}) [^;]+;", lambda m: f"{m.group(1)} {value};", site)
        assert n == 1, f"deploy/nginx.conf sets {name} {n} times"
    servers = "\n    ".join(f"server 127.0.0.1:{port};" for port in gunicorn_ports)
    site, n_up = re.subn(r"(?m)^    server 127\.0\.0\.1:8080;", servers, site)
    site, n_v4 = re.subn(r"listen 80;", f"listen 127.0.0.1:{nginx_port};", site)
    site, n_v6 = re.subn(r"listen \[::\]:80;\n", "", site)
    assert (n_up, n_v4, n_v6) == (1, 1, 1), "deploy/nginx.conf changed: update render_site()"
    return site


def nginx_conf(prefix, site_path, worker_connections: int = 64) -> str:
    user = "user root root;\n" if os.geteuid() == 0 else ""
    return (f"{user}daemon off;\nworker_processes 1;\npid {prefix}/nginx.pid;\n"
            f"error_log {prefix}/error.log info;\nevents {{ worker_connections {worker_connections}; }}\n"
            f"http {{\n  access_log {prefix}/access.log;\n"
            f"  client_body_temp_path {prefix}/body;\n  proxy_temp_path {prefix}/proxy;\n"
            f"  fastcgi_temp_path {prefix}/fcgi;\n  uwsgi_temp_path {prefix}/uwsgi;\n"
            f"  scgi_temp_path {prefix}/scgi;\n  include {site_path};\n}}\n")


@contextlib.contextmanager
def nginx_in_front(srv: "Gunicorn | list[Gunicorn]", tmp: Path, directives: dict | None = None,
                   worker_connections: int = 64):
    """A real nginx running deploy/nginx.conf in front of ``srv`` (one instance or several) on a free
    loopback port; yields (base URL, port)."""
    port = free_port()
    ports = [s.port for s in (srv if isinstance(srv, list) else [srv])]
    (tmp / "site.conf").write_text(render_site(ports, port, directives))
    (tmp / "nginx.conf").write_text(nginx_conf(tmp, tmp / "site.conf", worker_connections))
    args = [NGINX, "-p", str(tmp), "-c", str(tmp / "nginx.conf"), "-e", str(tmp / "error.log")]
    subprocess.run(args + ["-t"], check=True, capture_output=True)
    nginx = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        base = f"http://127.0.0.1:{port}"
        for _ in range(100):
            try:
                if requests.get(base + "/health", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                time.sleep(0.1)
        else:
            pytest.fail("nginx did not come up: " + (tmp / "error.log").read_text()[-3000:], pytrace=False)
        yield base, port
    finally:
        nginx.terminate()
        nginx.wait(20)


# --- slow clients ---------------------------------------------------------------------------------
SLOW_KINDS = ("idle", "silent", "trickle", "no-body")      # idle first: it needs an answer to open


def open_slow(port: int, kind: str) -> socket.socket:
    """A connection that holds on: trickles its headers (the caller sends more), announces a body it
    never sends, stays silent, or sits idle after a keep-alive request."""
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    if kind == "trickle":
        s.sendall(b"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\n")
    elif kind == "no-body":
        s.sendall(b"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 1000\r\n\r\n{\"prompt\": ")
    elif kind == "idle":
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        status, _, _ = read_response(s)
        assert status == 200, status
    return s


class SlowClients:
    """``per_kind`` connections of each of SLOW_KINDS; the trickling ones send a header byte a second."""

    def __init__(self, port: int, per_kind: int):
        self.socks = {kind: [open_slow(port, kind) for _ in range(per_kind)] for kind in SLOW_KINDS}
        self.stop = threading.Event()
        self.trickler = threading.Thread(target=self._trickle, daemon=True)
        self.trickler.start()

    def _trickle(self):
        while not self.stop.wait(1.0):
            for s in self.socks["trickle"]:
                try:
                    s.send(b"X")
                except OSError:
                    pass

    def still_open(self) -> dict:
        """Per kind, how many connections the server has not closed (nothing to read, no EOF)."""
        out = {}
        for kind, socks in self.socks.items():
            n = 0
            for s in socks:
                s.setblocking(False)
                try:
                    s.recv(1, socket.MSG_PEEK)          # b"" (closed) or bytes (an answer): not waiting
                except BlockingIOError:
                    n += 1
                except OSError:
                    pass
            out[kind] = n
        return out

    def wait_closed(self, timeout: float) -> dict:
        """Per kind: (connections the server closed, of which with a 408 answer first)."""
        out = {}
        for kind, socks in self.socks.items():
            closed = answered = 0
            for s in socks:
                s.settimeout(timeout)
                got = b""
                try:
                    while chunk := s.recv(65536):
                        got += chunk
                    closed += 1
                except ConnectionResetError:
                    closed += 1
                except OSError:
                    pass
                answered += got.startswith(b"HTTP/1.1 408")
            out[kind] = (closed, answered)
        return out

    def close(self):
        self.stop.set()
        self.trickler.join(5)
        for socks in self.socks.values():
            for s in socks:
                s.close()
