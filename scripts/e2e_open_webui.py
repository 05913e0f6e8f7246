#!/usr/bin/env python3
"""End-to-end check against a real client: Open WebUI's backend (PyPI ``open-webui``) generating images
through this server, once with its "openai" engine (/v1/images/generations) and once with its
"automatic1111" engine (/sdapi/v1). Not part of CI: it needs Open WebUI installed in its own venv, which
this script does not do. Make that venv once (Python 3.11; about 5 minutes and 7.5 GB, CUDA torch included):

    python3.11 -m venv /tmp/owui/venv
    nice -n 19 /tmp/owui/venv/bin/pip install open-webui

Then, from the repository root (with the server's own venv):

    .venv/bin/python scripts/e2e_open_webui.py [/tmp/owui/venv] [--workdir /tmp/owui/e2e]

What it does, offline and on loopback only:
1. starts this server (``python -m api.serve``) on --server-port with an API key and ``--api-auth``, a small
   ``--max-pixels`` and an access log, and checks that unauthenticated requests are refused;
2. puts a recording proxy in front of it (--proxy-port), so that the report shows every request Open WebUI
   made, with its auth scheme, the request body and the shape of the reply;
3. per engine, starts ``open-webui serve`` with a fresh DATA_DIR, configured by environment variables
   (ENABLE_PERSISTENT_CONFIG=False, OFFLINE_MODE, no embedding model), signs up the first user (admin)
   through ``POST /api/v1/auths/signup`` and generates through ``POST /api/v1/images/generations``,
   then downloads the returned ``/api/v1/files/<id>/content`` and checks it is a PNG of the size asked;
   - openai: model dall-e-2 (its default: response_format b64_json), gpt-image-1 (no response_format),
     gpt-image-1 with IMAGE_SIZE=auto, a per-request size, and response_format=url set through
     IMAGES_OPENAI_PARAMS (Open WebUI then downloads our URL; ENABLE_LOCAL_WEB_FETCH lets it reach loopback);
   - automatic1111: the model list (/sdapi/v1/sd-models), the admin "verify" button, a default generation,
     and one naming a model, which makes Open WebUI GET and POST back /sdapi/v1/options;
4. checks our access log holds the requests each engine must have made, prints a report, and exits 1 on
   any failure (0 when everything passed).
"""
import argparse
import base64
import http.client
import http.server
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
API_KEY = "e2e-key"
BASIC = "user:pass"
HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade",
              "content-length"}
LOG_LINE = re.compile(r'"(\w+) (\S+) HTTP/[\d.]+" (\d{3})')


# --- small helpers ----------------------------------------------------------------------------------------
def shape(obj, depth=0):
    """A JSON value with long strings replaced by their length, to print a reply's shape."""
    if isinstance(obj, dict):
        return {k: shape(v, depth + 1) for k, v in obj.items()} if depth < 3 else "{...}"
    if isinstance(obj, list):
        return [shape(obj[0], depth + 1), f"...x{len(obj)}"] if len(obj) > 1 else [shape(v, depth + 1) for v in obj]
    if isinstance(obj, str) and len(obj) > 60:
        return f"<str {len(obj)}>"
    return obj


def png_size(data: bytes):
    """(width, height) of a PNG, or None when the bytes are not one."""
    if data[:8] != b"\x89PNG\r\n\x1a\n" or data[12:16] != b"IHDR":
        return None
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def http_json(method, url, body=None, headers=None, timeout=300):
    """(status, parsed JSON or raw bytes) of one request; HTTP errors are returned, not raised."""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers=dict(headers or {}))
    if data is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            status, raw, ctype = r.status, r.read(), r.headers.get("Content-Type", "")
    except urllib.error.HTTPError as e:
        status, raw, ctype = e.code, e.read(), e.headers.get("Content-Type", "")
    if "json" in ctype:
        try:
            return status, json.loads(raw)
        except ValueError:
            pass
    return status, raw


def wait_http(url, proc, timeout, what):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode} before answering {url}")
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                if r.status == 200:
                    return time.monotonic() - t0
        except (OSError, urllib.error.URLError):
            pass
        time.sleep(1)
    raise RuntimeError(f"{what} did not answer {url} within {timeout} s")


def start(cmd, log_path, env, cwd, nice):
    log = open(log_path, "ab")
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=cwd, start_new_session=True,
                            preexec_fn=(lambda: os.nice(nice)) if nice else None)


def stop(proc):
    """End a process this script started (its own session), politely first."""
    if proc is None or proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    except ProcessLookupError:
        pass


def tail(path, n=25):
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


# --- the recording proxy ----------------------------------------------------------------------------------
class Recorder:
    """Forwards everything to the server and remembers each exchange under the current phase's name."""

    def __init__(self, port, upstream_port):
        self.records, self.phase, self.lock = [], "", threading.Lock()
        recorder = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def handle_one(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
                conn = http.client.HTTPConnection("127.0.0.1", upstream_port, timeout=600)
                try:
                    conn.request(self.command, self.path, body=body or None, headers=headers)
                    resp = conn.getresponse()
                    status, rheaders, rbody = resp.status, resp.getheaders(), resp.read()
                finally:
                    conn.close()
                self.send_response(status)
                for k, v in rheaders:
                    if k.lower() not in HOP_BY_HOP and k.lower() not in ("server", "date"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(rbody)))
                self.send_header("Connection", "close")
                self.end_headers()
                self.wfile.write(rbody)
                self.close_connection = True
                recorder.add(self.command, self.path, self.headers, body, status, dict(rheaders), rbody)

            do_GET = do_POST = do_PUT = do_DELETE = do_OPTIONS = do_HEAD = handle_one

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def add(self, method, path, headers, body, status, rheaders, rbody):
        auth = headers.get("Authorization")
        if auth is None:
            auth_s = "none"
        elif auth.startswith("Basic "):
            try:
                auth_s = f"Basic({base64.b64decode(auth[6:]).decode().split(':')[0] or 'empty'})"
            except ValueError:
                auth_s = "Basic(?)"
        else:
            auth_s = auth.split(" ")[0]
        req = None
        if body:
            try:
                req = json.loads(body)
            except ValueError:
                req = f"<{len(body)} bytes {headers.get('Content-Type', '')}>"
        ctype = rheaders.get("Content-Type", rheaders.get("content-type", ""))
        try:
            resp = json.loads(rbody) if "json" in ctype else f"<{len(rbody)} bytes {ctype}>"
        except ValueError:
            resp = f"<{len(rbody)} bytes {ctype}>"
        with self.lock:
            self.records.append({"phase": self.phase, "method": method, "path": path, "auth": auth_s, "req": req,
                                 "status": status, "resp": resp})

    def of(self, phase):
        with self.lock:
            return [r for r in self.records if r["phase"] == phase]

    def close(self):
        self.server.shutdown()
        self.server.server_close()


# --- the run ----------------------------------------------------------------------------------------------
class Run:
    def __init__(self, args):
        self.args, self.failures, self.lines = args, [], []
        self.wd = Path(args.workdir)
        self.proxy_base = f"http://127.0.0.1:{args.proxy_port}"
        self.owui = f"http://127.0.0.1:{args.owui_port}"

    def check(self, ok, what):
        self.lines.append(f"    [{'ok' if ok else 'FAIL'}] {what}")
        if not ok:
            self.failures.append(what)
        return ok

    def say(self, text):
        self.lines.append(text)
        print(text, flush=True)

    # our server
    def start_server(self):
        a = self.args
        cmd = [a.server_python, "-m", "api.serve", "--host", "127.0.0.1", "--port", str(a.server_port),
               "--max-pixels", str(a.max_pixels), "--data-dir", str(self.wd / "sd-data"),
               "--access-log", str(self.wd / "sd-access.log"), "--threads", str(a.threads), "--workers", "1"]
        if a.model:
            cmd += ["--model", a.model]
        env = {**os.environ, "API_KEY": API_KEY, "SD_API_AUTH": BASIC}
        self.server = start(cmd, self.wd / "sd-server.log", env, REPO, a.nice)
        took = wait_http(f"http://127.0.0.1:{a.server_port}/health", self.server, a.start_timeout, "sd-api-server")
        self.say(f"server: {' '.join(cmd[1:])}  (ready in {took:.1f} s)")
        base = f"http://127.0.0.1:{a.server_port}"
        s, _ = http_json("GET", f"{base}/sdapi/v1/options")
        self.check(s == 401, f"GET /sdapi/v1/options without credentials -> {s} (want 401)")
        s, _ = http_json("POST", f"{base}/v1/images/generations", {"prompt": "x"})
        self.check(s == 401, f"POST /v1/images/generations without a key -> {s} (want 401)")
        s, opts = http_json("GET", f"{base}/sdapi/v1/options",
                            headers={"Authorization": "Basic " + base64.b64encode(BASIC.encode()).decode()})
        self.check(s == 200, f"GET /sdapi/v1/options with Basic {BASIC.split(':')[0]} -> {s}")

    # Open WebUI
    def start_owui(self, name, extra_env):
        a = self.args
        data = self.wd / f"owui-{name}"
        if data.exists():
            subprocess.run(["rm", "-rf", str(data)], check=True)
        data.mkdir(parents=True)
        env = {k: os.environ[k] for k in ("PATH", "LANG", "LC_ALL", "TZ", "TMPDIR") if k in os.environ}
        env.update({
            "HOME": str(data), "DATA_DIR": str(data / "data"), "HF_HOME": str(data / "hf"),
            "WEBUI_SECRET_KEY": "e2e-open-webui-secret-0123456789abcdef", "WEBUI_AUTH": "True",
            "ENABLE_PERSISTENT_CONFIG": "False", "OFFLINE_MODE": "true", "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1", "ENABLE_VERSION_UPDATE_CHECK": "false",
            # no local embedding model (it would be downloaded from Hugging Face), no LLM back-ends
            "RAG_EMBEDDING_ENGINE": "openai", "ENABLE_OLLAMA_API": "false", "ENABLE_OPENAI_API": "false",
            "ANONYMIZED_TELEMETRY": "false", "SCARF_NO_ANALYTICS": "true", "DO_NOT_TRACK": "true",
            "ENABLE_IMAGE_GENERATION": "true", "IMAGE_SIZE": a.size, "IMAGE_STEPS": str(a.steps),
            "GLOBAL_LOG_LEVEL": "INFO",
        })
        env.update(extra_env)
        exe = str(Path(a.venv) / "bin" / "open-webui")
        cmd = [exe, "serve", "--host", "127.0.0.1", "--port", str(a.owui_port)]
        self.owui_log = data / "open-webui.log"
        self.owui_proc = start(cmd, self.owui_log, env, data, a.nice)
        took = wait_http(f"{self.owui}/health", self.owui_proc, a.start_timeout, "open-webui")
        shown = " ".join(f"{k}={v}" for k, v in extra_env.items())
        self.say(f"  open-webui serve --port {a.owui_port} with {shown} (ready in {took:.1f} s)")
        s, res = http_json("POST", f"{self.owui}/api/v1/auths/signup",
                           {"name": "E2E Admin", "email": "admin@example.com", "password": "E2e-passw0rd!"})
        if not self.check(s == 200 and isinstance(res, dict) and res.get("token"), f"signup -> {s}"):
            raise RuntimeError(f"signup failed: {s} {res!r:.300}")
        self.check(res.get("role") == "admin", f"first user's role is {res.get('role')!r}")
        self.auth = {"Authorization": f"Bearer {res['token']}"}

    def owui_call(self, method, path, body=None):
        return http_json(method, f"{self.owui}{path}", body, self.auth, timeout=self.args.gen_timeout)

    def configure(self, **changes):
        s, cfg = self.owui_call("GET", "/api/v1/images/config")
        if not self.check(s == 200, f"GET /api/v1/images/config -> {s}"):
            return False
        cfg.update(changes)
        s, res = self.owui_call("POST", "/api/v1/images/config/update", cfg)
        return self.check(s == 200, f"POST /api/v1/images/config/update {changes} -> {s}"
                          + ("" if s == 200 else f" {res!r:.300}"))

    def generate(self, label, body, want_size):
        """One generation through Open WebUI; want_size None accepts any size within --max-pixels."""
        t0 = time.monotonic()
        s, res = self.owui_call("POST", "/api/v1/images/generations", body)
        took = time.monotonic() - t0
        ok = s == 200 and isinstance(res, list) and len(res) == 1 and isinstance(res[0], dict) \
            and str(res[0].get("url", "")).startswith("/api/v1/files/")
        if not self.check(ok, f"{label}: POST /api/v1/images/generations {json.dumps(body)} -> {s} in {took:.1f} s, "
                              f"{json.dumps(shape(res)) if ok else repr(res)[:400]}"):
            return
        s, img = http_json("GET", f"{self.owui}{res[0]['url']}", headers=self.auth)
        size = png_size(img) if isinstance(img, bytes) else None
        if want_size is None:
            good = size is not None and size[0] * size[1] <= self.args.max_pixels
        else:
            good = size == want_size
        want = f"{want_size[0]}x{want_size[1]}" if want_size else f"<= {self.args.max_pixels} px"
        got = f"PNG {size[0]}x{size[1]}, {len(img)} bytes" if size else f"not a PNG: {img!r:.80}"
        self.check(s == 200 and good, f"{label}: GET {res[0]['url']} -> {s}, {got} (want {want})")

    def report_requests(self, phase, required):
        recs = self.recorder.of(phase)
        self.lines.append(f"    requests Open WebUI made to the server ({len(recs)}):")
        for r in recs:
            req = "" if r["req"] is None else " " + json.dumps(shape(r["req"]))[:400]
            self.lines.append(f"      {r['method']} {r['path']} auth={r['auth']}{req}")
            resp = json.dumps(shape(r["resp"]))
            if len(resp) > 400 and isinstance(r["resp"], dict):
                resp = f"{resp[:300]}... (keys {', '.join(r['resp'])})"
            self.lines.append(f"        -> {r['status']} {resp}")
        seen = [(m, re.sub(r"\?.*", "", p), s) for m, p, s in self.access_log()[self.log_mark:]]
        self.log_mark += len(seen)
        for method, path in required:
            n = sum(1 for m, p, s in seen if m == method and (p == path or p.startswith(path + "/")) and s == 200)
            self.check(n > 0, f"access log: {method} {path} answered 200 x{n}")
        bad = [f"{m} {p} {s}" for m, p, s in seen if s >= 400]
        self.check(not bad, "access log: no 4xx/5xx answers" + (f" (got {bad})" if bad else ""))

    def access_log(self):
        text = (self.wd / "sd-access.log").read_text(errors="replace")
        return [(m, p, int(s)) for m, p, s in LOG_LINE.findall(text)]

    def phase(self, name, extra_env, body, required):
        self.recorder.phase = name
        self.log_mark = len(self.access_log())
        self.say(f"\n== engine {name}")
        t0 = time.monotonic()
        try:
            self.start_owui(name, extra_env)
            body()
        except Exception as e:  # noqa: BLE001 (any error is a failed phase; the report goes on)
            self.check(False, f"{name}: {type(e).__name__}: {e}")
            self.lines.append("    open-webui log tail:\n" + tail(getattr(self, "owui_log", ""), 30))
        finally:
            stop(getattr(self, "owui_proc", None))
            self.owui_proc = None
        self.report_requests(name, required)
        self.lines.append(f"    phase time {time.monotonic() - t0:.1f} s")

    def openai_cases(self):
        w, h = map(int, self.args.size.split("x"))
        big = int((self.args.max_pixels) ** 0.5) // 8 * 8
        prompt = "a red circle on a blue background"
        self.generate("dall-e-2 (default model)", {"prompt": prompt}, (w, h))
        self.generate("dall-e-2, per-request size", {"prompt": prompt, "size": f"{big}x{big}"}, (big, big))
        if self.configure(IMAGE_GENERATION_MODEL="gpt-image-1"):
            self.generate("gpt-image-1 (no response_format)", {"prompt": prompt}, (w, h))
        if self.configure(IMAGE_GENERATION_MODEL="gpt-image-1", IMAGE_SIZE="auto"):
            self.generate("gpt-image-1, IMAGE_SIZE=auto", {"prompt": prompt}, None)
        if self.configure(IMAGE_GENERATION_MODEL="", IMAGE_SIZE=self.args.size,
                          IMAGES_OPENAI_API_PARAMS={"response_format": "url", "seed": -1}):
            # without a seed every request uses the server's default seed (42): -1 asks for a random one
            self.generate("dall-e-2, IMAGES_OPENAI_PARAMS response_format=url seed=-1", {"prompt": prompt}, (w, h))

    def a1111_cases(self):
        w, h = map(int, self.args.size.split("x"))
        prompt = "a green square on a white background"
        s, models = self.owui_call("GET", "/api/v1/images/models")
        ok = s == 200 and isinstance(models, list) and models and all("id" in m and "name" in m for m in models)
        self.check(ok, f"GET /api/v1/images/models -> {s} {json.dumps(models)[:300]}")
        s, res = self.owui_call("POST", "/api/v1/images/verify",
                                {"engine": "automatic1111", "url": self.proxy_base, "key": BASIC})
        self.check(s == 200 and res is True, f"POST /api/v1/images/verify (admin 'verify' button) -> {s} {res!r:.200}")
        self.generate("automatic1111, default checkpoint", {"prompt": prompt}, (w, h))
        if ok:
            # a name other than the title sd_model_checkpoint holds: Open WebUI POSTs the options back
            name = models[0]["name"]
            big = int((self.args.max_pixels) ** 0.5) // 8 * 8
            self.generate(f"automatic1111, model {name!r} and size {big}x{big}",
                          {"prompt": prompt, "model": name, "size": f"{big}x{big}", "negative_prompt": "blurry"},
                          (big, big))

    def main(self):
        a = self.args
        t0 = time.monotonic()
        self.wd.mkdir(parents=True, exist_ok=True)
        for f in ("sd-access.log", "sd-server.log"):
            (self.wd / f).unlink(missing_ok=True)
        subprocess.run(["rm", "-rf", str(self.wd / "sd-data")], check=True)   # options stored by a past run
        version = subprocess.run([str(Path(a.venv) / "bin" / "python"), "-c",
                                  "import importlib.metadata as m; print(m.version('open-webui'))"],
                                 capture_output=True, text=True)
        if version.returncode != 0:
            print(f"no open-webui in {a.venv}: {version.stderr.strip()[-300:]}", file=sys.stderr)
            return 2
        self.say(f"open-webui {version.stdout.strip()} from {a.venv}; work dir {self.wd}")
        self.server = self.owui_proc = self.recorder = None
        try:
            self.start_server()
            self.recorder = Recorder(a.proxy_port, a.server_port)
            self.say(f"recording proxy {self.proxy_base} -> 127.0.0.1:{a.server_port}")
            self.phase("openai", {
                "IMAGE_GENERATION_ENGINE": "openai", "IMAGES_OPENAI_API_BASE_URL": f"{self.proxy_base}/v1",
                "IMAGES_OPENAI_API_KEY": API_KEY, "ENABLE_LOCAL_WEB_FETCH": "true",
            }, self.openai_cases, [("POST", "/v1/images/generations"), ("GET", "/v1/files")])
            self.phase("automatic1111", {
                "IMAGE_GENERATION_ENGINE": "automatic1111", "AUTOMATIC1111_BASE_URL": self.proxy_base,
                "AUTOMATIC1111_API_AUTH": BASIC,
            }, self.a1111_cases, [("GET", "/sdapi/v1/options"), ("POST", "/sdapi/v1/options"),
                                  ("GET", "/sdapi/v1/sd-models"), ("POST", "/sdapi/v1/txt2img")])
        except Exception as e:  # noqa: BLE001
            self.check(False, f"{type(e).__name__}: {e}")
            self.lines.append("    server log tail:\n" + tail(self.wd / "sd-server.log"))
        finally:
            stop(self.owui_proc)
            if self.recorder:
                self.recorder.close()
            stop(self.server)
        print("\n".join(["", "== report"] + self.lines))
        verdict = "PASS" if not self.failures else f"FAIL ({len(self.failures)} checks)"
        print(f"\n{verdict} in {time.monotonic() - t0:.1f} s; logs in {self.wd}")
        return 0 if not self.failures else 1


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("venv", nargs="?", default="/tmp/owui/venv", help="Open WebUI's venv (default: %(default)s)")
    p.add_argument("--workdir", default="/tmp/owui/e2e", help="logs and data (default: %(default)s)")
    p.add_argument("--server-python", default=sys.executable, help="python running api.serve (default: this one)")
    p.add_argument("--model", default="", help="--model for the server (default: its default model)")
    p.add_argument("--server-port", type=int, default=18080)
    p.add_argument("--proxy-port", type=int, default=18082)
    p.add_argument("--owui-port", type=int, default=18081)
    p.add_argument("--size", default="64x64", help="Open WebUI's IMAGE_SIZE (default: %(default)s)")
    p.add_argument("--steps", type=int, default=4, help="Open WebUI's IMAGE_STEPS (default: %(default)s)")
    p.add_argument("--max-pixels", type=int, default=16384, help="the server's --max-pixels (default: %(default)s)")
    p.add_argument("--threads", type=int, default=1, help="the server's --threads (default: %(default)s)")
    p.add_argument("--nice", type=int, default=10, help="niceness of both servers (default: %(default)s)")
    p.add_argument("--start-timeout", type=float, default=300, help="seconds each server may take to start")
    p.add_argument("--gen-timeout", type=float, default=300, help="seconds one generation may take")
    args = p.parse_args(argv)
    if not re.fullmatch(r"\d+x\d+", args.size):
        p.error("--size must be WxH")
    return Run(args).main()


if __name__ == "__main__":
    sys.exit(main())
