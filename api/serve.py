"""Starting the server: gunicorn's settings from ours, and the ``sd-api-server`` console script.

``gunicorn_settings(settings)`` is the one translation of :class:`api.config.Settings` into gunicorn's
settings; ``gunicorn.conf.py`` (for ``gunicorn -c gunicorn.conf.py wsgi:app``) and ``main()`` both
apply it, so the two ways to start the server run alike.

Why these settings:
* ``preload_app`` stays False: the app loads its models when it is created. Loading them in the master
  before the fork would start torch's OpenMP thread pools (and possibly a CUDA context) in the parent;
  neither survives a fork, so every worker loads its own copy after it (the weights cache lets them share
  the memory).
* The worker (``api.worker``) buffers each request in one loop and runs the app in ``http_threads``
  threads: slow clients cost no thread. With several workers keep-alive is off, so that each new request
  goes to the least loaded worker.
* ``timeout`` is the worker's heartbeat, not a per-request limit (a generation may take minutes); it
  also bounds the model load at worker boot. ``graceful_timeout`` lets a running generation finish.
* The access log format has no headers, so the Authorization token is never logged.
"""
from __future__ import annotations

import sys

from .config import Settings, parse_args
from .worker import worker_class

ACCESS_LOG_FORMAT = '%(h)s "%(r)s" %(s)s %(b)s %(L)ss "%({x-request-id}o)s"'


def gunicorn_settings(settings: Settings) -> dict:
    """gunicorn's settings (its names) for ``settings``."""
    return {
        "bind": [f"{settings.host}:{settings.port}"],
        "workers": settings.workers,
        "threads": settings.http_threads,
        "worker_class": worker_class(settings),
        "worker_connections": settings.max_connections,
        "keepalive": settings.keepalive if settings.workers == 1 else 0,
        "timeout": settings.timeout,
        "graceful_timeout": settings.timeout,
        "preload_app": False,
        "forwarded_allow_ips": settings.forwarded_allow_ips,
        "accesslog": settings.access_log or None,
        "errorlog": "-",
        "loglevel": settings.log_level,
        "access_log_format": ACCESS_LOG_FORMAT,
        # gunicorn >= 25.1 opens a control socket at one fixed per-user path, which clashes when several
        # servers run on a host: off unless a path is given
        "control_socket": settings.control_socket,
        "control_socket_disable": settings.control_socket is None,
    }


def main(argv=None) -> int:
    """``sd-api-server [options]``: gunicorn with our worker (``--dev``: Flask's development server)."""
    from gunicorn.app.base import BaseApplication

    from app import create_app

    settings, ns = parse_args(argv)
    if ns.dev:
        create_app(settings).run(host=settings.host, port=settings.port, threaded=True, use_reloader=False)
        return 0

    class Server(BaseApplication):
        def load_config(self):
            for name, value in gunicorn_settings(settings).items():
                if name in self.cfg.settings and value is not None:
                    self.cfg.set(name, value)

        def load(self):              # runs in each worker after the fork (preload_app is False)
            return create_app(settings)

    Server().run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
