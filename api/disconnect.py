"""Telling whether the client of a request has gone away, so that its generation is dropped."""
from __future__ import annotations

import select
import socket
import ssl


class ClientGone(Exception):
    """The client closed its connection: the queued or running generation was dropped."""


def client_gone_probe(environ):
    """A function telling whether the client of this request has closed its connection, or
    None where that cannot be known (TLS in the WSGI server, a test client).

    gunicorn (gthread) puts the connection's socket in ``environ["gunicorn.socket"]`` (Werkzeug's
    server in ``werkzeug.socket``). Once the request body has been read, a poll() that reports
    the socket readable and a MSG_PEEK recv() that returns b"" mean the peer sent FIN (or the
    socket shows an error): nobody is waiting for the answer. Bytes waiting there (a pipelined
    request) mean the client is still there; the peek consumes nothing. Behind nginx this works
    because nginx closes its upstream connection when its client goes away
    (proxy_ignore_client_abort off, the default)."""
    sock = environ.get("gunicorn.socket") or environ.get("werkzeug.socket")
    if sock is None or isinstance(sock, ssl.SSLSocket) or not hasattr(sock, "fileno"):
        return None

    def gone() -> bool:
        try:
            fd = sock.fileno()
            if fd < 0:
                return True
            poller = select.poll()
            poller.register(fd, select.POLLIN | getattr(select, "POLLRDHUP", 0))
            events = poller.poll(0)
            if not events:
                return False
            ev = events[0][1]
            if ev & (select.POLLERR | select.POLLHUP | select.POLLNVAL):
                return True
            return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
        except (BlockingIOError, InterruptedError):
            return False
        except OSError:           # reset, closed: gone
            return True

    return gone
