"""gunicorn settings for sd-api-server: ``gunicorn -c gunicorn.conf.py wsgi:app``.

Image generation is long (seconds to minutes) and CPU/GPU bound, so:
* one worker process per model copy (SD_WORKERS, default 1; without SD_THREADS they split the
  cores, and through the converted-weights cache they share the weights' memory); each worker runs
  one generation at a time and lets at most SD_MAX_QUEUE more wait, first come first served (503
  with Retry-After beyond that, at once). With several workers, a worker leaves a new connection to
  one that handles fewer (api/gworker.py; keep-alive off). A waiting request whose client
  disconnects leaves the queue (the app polls the connection's socket, ``gunicorn.socket`` in the
  WSGI environ of the gthread worker);
* the gthread worker with a few threads (SD_HTTP_THREADS, default 8), so /health, /v1/models,
  /v1/files and downloads are answered while a generation runs; keep it above SD_MAX_QUEUE + 1;
* a worker timeout far longer than a generation or a model load (SD_TIMEOUT, default 600 s).
  With gthread the timeout is the worker's heartbeat, not a per-request limit; it also bounds
  the model load at worker boot. graceful_timeout lets a running generation finish on restart.

The same environment variables configure the application itself (see api/config.py).
"""
import os


def _int(name, default):
    raw = os.environ.get(name, "").strip()
    return int(raw) if raw else default


bind = [f"{os.environ.get('SD_HOST', '').strip() or '127.0.0.1'}:{_int('SD_PORT', 8080)}"]
workers = _int("SD_WORKERS", 1)
threads = _int("SD_HTTP_THREADS", 8)
timeout = _int("SD_TIMEOUT", 600)
graceful_timeout = timeout
keepalive = 5
worker_class = "gthread"
# Several workers: a worker leaves a new connection to one that handles fewer (api/gworker.py). A
# request on a kept-alive connection would go to whichever worker holds it, so keep-alive is off then.
from api.gworker import gunicorn_settings  # noqa: E402
globals().update(gunicorn_settings(workers))

# preload_app must stay False: the app loads the model when it is created. Loading it in the
# master before fork would start torch's OpenMP/MKL thread pools (and possibly a CUDA context)
# in the parent; thread pools do not survive fork (children can deadlock in the first parallel
# op) and CUDA cannot be used in a forked child at all. So every worker imports wsgi.py and
# loads its own model after the fork.
preload_app = False

# Requests come from nginx on the same host; trust its X-Forwarded-* headers (the app also
# applies werkzeug's ProxyFix for SD_PROXY_HOPS hops).
forwarded_allow_ips = os.environ.get("SD_FORWARDED_ALLOW_IPS", "127.0.0.1,::1")

accesslog = os.environ.get("SD_ACCESS_LOG", "-") or None
errorlog = "-"
loglevel = os.environ.get("SD_LOG_LEVEL", "info")
# the access log format does not include headers, so the Authorization token is never logged
access_log_format = '%(h)s "%(r)s" %(s)s %(b)s %(L)ss "%({x-request-id}o)s"'

# gunicorn >= 25.1 opens a control socket at one fixed per-user path, which clashes when several
# servers run on a host; off unless SD_CONTROL_SOCKET names a path (older gunicorns ignore these).
control_socket = os.environ.get("SD_CONTROL_SOCKET", "").strip() or None
control_socket_disable = control_socket is None
if control_socket is None:
    del control_socket
