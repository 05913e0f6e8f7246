"""The gunicorn worker: a connection costs a thread only once its whole request has arrived.

gunicorn's gthread worker hands a connection to one of its threads as soon as a byte arrives, and that
thread then reads the rest of the request with blocking calls and no time limit: a handful of clients
that trickle their headers, or announce a body and never send it, hold every thread and the server
stops answering. Here one loop (the worker's main thread, a ``selectors`` poll) reads every request,
line, headers and body, into a buffer, and only a complete request goes to the thread pool, where
gunicorn's own HTTP parser and WSGI glue (``gunicorn.http``, as its sync worker uses them) run the app.
A slow or silent client costs a buffer and a socket, never a thread, and is cut off after:

* ``header_timeout``: the request line and headers, counted from their first byte (a new connection's
  silence counts as well);
* ``body_timeout``: the longest pause while a body arrives (a slow upload that keeps moving goes on);
* ``keepalive``: idle time between two requests on a kept-alive connection.

Closed connections are logged once per sweep, with their count per reason. Responses (and so streamed
ones, and long generations) are not bound by these limits: only a send that stalls for ``body_timeout``,
a client that stopped reading, ends one.

A body larger than the app's ``MAX_CONTENT_LENGTH`` is not buffered: the request goes to a thread at once
and the app answers 413 from its headers (or after reading up to the limit, for a chunked body).

With several workers (``--workers``), a worker does not accept a new connection while another one
has fewer requests unanswered (one whose app has returned, and whose response is being sent, counts as
answered: its client may send the next request before the last bytes leave), and it looks again when a
connection waits, so a request does not queue behind a generation while another worker idles
(as nginx's ``least_conn``, inside one gunicorn); keep-alive is then off (``api.serve``), or a request on
an open connection would go to whichever worker holds it. The loads live in a shared table allocated by
``setup()``, gunicorn's hook that runs in the master before it forks the workers.

It rests on gunicorn's documented extension points: ``gunicorn.workers.base.Worker`` (``init_process``,
``run``, ``notify``, ``handle_error``, ``alive``), ``Config`` settings and the ``gunicorn.http`` parser.
"""
from __future__ import annotations

import errno
import itertools
import json
import multiprocessing
import os
import queue
import selectors
import socket
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime

from gunicorn import http, util
from gunicorn.http import wsgi
from gunicorn.workers.base import Worker

HEAD_END = b"\r\n\r\n"
RECV_BYTES = 65536
SWEEP_S = 0.25                    # how often deadlines are checked
LOAD_SLOTS = 64                   # workers the load table can hold


class Conn:
    """A client connection while the loop owns it (reading a request, or idle between requests)."""

    def __init__(self, sock, addr, listener, deadline):
        self.sock, self.addr, self.listener = sock, addr, listener
        self.buf = bytearray()
        self.head_end = -1            # index after the blank line ending the headers, once seen
        self.body = None              # ("length", n) | ("chunked", scan position)
        self.reason = "idle"          # what its deadline cuts off (for the log)
        self.deadline = deadline
        self.expects_continue = False  # "Expect: 100-continue": answered once its headers are in
        self.continue_sent = False
        self.answered = False         # the app has returned its response, which is being sent


def _header_fields(head: bytes) -> dict[bytes, list[bytes]]:
    fields: dict[bytes, list[bytes]] = {}
    for line in head.split(b"\r\n")[1:]:
        name, sep, value = line.partition(b":")
        if sep:
            fields.setdefault(name.strip().lower(), []).append(value.strip())
    return fields


def body_framing(f: dict[bytes, list[bytes]]):
    """("length", n), ("chunked", 0) (0: where the scan of chunks resumes), ("bad", why) where the body's
    length is ambiguous (two lengths, or a length and a transfer coding: how a request is smuggled past
    a proxy), or None where the parser is to refuse the headers with a 400 of gunicorn's. ``f``: the
    header fields (``_header_fields``)."""
    te, cl = f.get(b"transfer-encoding"), f.get(b"content-length")
    if te and cl:
        return ("bad", "both Content-Length and Transfer-Encoding")
    if te:
        return ("chunked", 0) if te[-1].lower().endswith(b"chunked") else None
    if cl is None:
        return ("length", 0)
    if len(set(cl)) != 1:
        return ("bad", "more than one Content-Length")
    return ("length", int(cl[0])) if cl[0].isdigit() else None


def chunked_end(buf, pos: int) -> tuple[int | None, int]:
    """Scan chunks from ``pos``: (index after the last chunk's trailers or None, where to resume).
    Raises ValueError on a malformed size line."""
    while True:
        eol = buf.find(b"\r\n", pos)
        if eol < 0:
            return None, pos
        size = int(bytes(buf[pos:eol]).split(b";")[0].strip() or b"x", 16)
        if size == 0:
            if buf[eol + 2:eol + 4] == b"\r\n":
                return eol + 4, pos
            end = buf.find(HEAD_END, eol)          # trailer fields, then a blank line
            return (end + 4 if end >= 0 else None), pos
        nxt = eol + 2 + size + 2
        if nxt > len(buf):
            return None, pos
        pos = nxt


def _drop_expect(head: bytes) -> bytes:
    """The headers without ``Expect``: this loop has answered it, gunicorn must not answer it again."""
    lines = head.split(b"\r\n")
    return b"\r\n".join(line for line in lines if not line.lower().startswith(b"expect:"))


class RequestBufferingWorker(Worker):
    header_timeout = body_timeout = None    # seconds, from the settings: see worker_class()
    load_table = None                 # shared [pid, active connections] per slot, several workers only
    slot_lock = None                  # workers start together: two must not claim the same free slot

    @classmethod
    def setup(cls):
        if cls.load_table is None:
            cls.load_table = multiprocessing.RawArray("i", 2 * LOAD_SLOTS)
            cls.slot_lock = multiprocessing.Lock()

    # --- the loop ---------------------------------------------------------------------------------
    def run(self):
        for s in self.sockets:
            s.setblocking(False)
        self.sel = selectors.DefaultSelector()
        self.sel.register(self.PIPE[0], selectors.EVENT_READ, None)       # signals and threads wake us
        self.conns: dict[int, Conn] = {}
        self.active = 0                   # connections reading or running a request
        self.answered = 0                 # of those, requests whose response the app has returned
        self.active_lock = threading.Lock()
        self.back: queue.SimpleQueue = queue.SimpleQueue()               # connections threads give back
        self.pool = ThreadPoolExecutor(self.cfg.threads, thread_name_prefix="request")
        self.accepting = False
        self.body_cap = self._body_cap()
        self.slot = self._claim_slot() if self.cfg.workers > 1 else None
        if self.slot is not None:
            self.log.info("Balancing load in slot %d", self.slot)
        self.closed: Counter = Counter()
        next_sweep = 0.0
        try:
            while self.alive:
                self.notify()
                if self.ppid != os.getppid():
                    self.log.info("Parent changed, shutting down: %s", self)
                    break
                self._set_accepting(len(self.conns) + self.in_threads < self.cfg.worker_connections
                                    and not self._should_pass())
                for key, _ in self.sel.select(max(0.0, next_sweep - time.monotonic()) + 0.001):
                    if key.data is None:
                        self._drain_pipe()
                    elif key.data == "listener":
                        self._accept(key.fileobj)
                    else:
                        self._readable(key.data)
                self._take_back()
                now = time.monotonic()
                if now >= next_sweep:
                    self._sweep(now)
                    next_sweep = now + SWEEP_S
        finally:
            self._stop()

    @property
    def in_threads(self) -> int:
        return self.active - sum(1 for c in self.conns.values() if c.reason != "idle")

    def _drain_pipe(self):
        try:
            while os.read(self.PIPE[0], 4096):
                pass
        except (BlockingIOError, InterruptedError):
            pass

    def _set_accepting(self, on: bool):
        if on == self.accepting:
            return
        for s in self.sockets:
            if on:
                self.sel.register(s, selectors.EVENT_READ, "listener")
            else:
                self.sel.unregister(s)
        self.accepting = on

    def _accept(self, listener):
        if self._should_pass():           # the loads changed while this loop waited
            self._set_accepting(False)
            return
        try:
            sock, addr = listener.accept()
        except OSError as e:
            if e.errno in (errno.EAGAIN, errno.ECONNABORTED, errno.EWOULDBLOCK):
                return
            raise
        sock.setblocking(False)
        util.close_on_exec(sock)
        now = time.monotonic()
        conn = Conn(sock, addr, listener, now + self.header_timeout)
        conn.reason = "headers"
        self.conns[sock.fileno()] = conn
        self.sel.register(sock, selectors.EVENT_READ, conn)
        self._add_active(1)
        self._set_accepting(False)        # one at a time: the next accept looks at the loads again

    def _readable(self, conn: Conn):
        try:
            data = conn.sock.recv(RECV_BYTES)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._close(conn)
            return
        now = time.monotonic()
        if conn.reason == "idle":             # the first byte of a next request
            conn.reason, conn.deadline = "headers", now + self.header_timeout
            self._add_active(1)
        conn.buf += data
        if conn.reason == "body":
            conn.deadline = now + self.body_timeout
        self._advance(conn, scan_from=max(0, len(conn.buf) - len(data) - 3))

    def _advance(self, conn: Conn, scan_from: int = 0):
        """Dispatch the request once it is whole (or once it is the parser's or the app's to refuse)."""
        buf = conn.buf
        if conn.head_end < 0:
            i = buf.find(HEAD_END, scan_from)
            if i < 0:
                if len(buf) > self._head_cap():
                    self._dispatch(conn, len(buf), complete=False)     # gunicorn answers 431
                return
            conn.head_end = i + 4
            fields = _header_fields(bytes(buf[:conn.head_end]))
            conn.body = body_framing(fields)
            if conn.body is None:
                self._dispatch(conn, len(buf), complete=False)         # gunicorn answers 400
                return
            if conn.body[0] == "bad":
                self._refuse(conn, 400, "Bad Request", f"The request has {conn.body[1]}.", "invalid_framing")
                self._close(conn)
                return
            conn.expects_continue = b"100-continue" in b",".join(fields.get(b"expect", [])).lower()
            conn.reason, conn.deadline = "body", time.monotonic() + self.body_timeout
        kind, value = conn.body
        if kind == "length":
            end = conn.head_end + value if conn.head_end + value <= len(buf) else None
            oversize = self.body_cap is not None and value > self.body_cap
        else:
            try:
                end, scan = chunked_end(buf, value or conn.head_end)
            except ValueError:
                self._refuse(conn, 400, "Bad Request", "The request's chunked body is malformed.", "invalid_framing")
                self._close(conn)
                return
            conn.body = ("chunked", scan)
            oversize = self.body_cap is not None and len(buf) - conn.head_end > self.body_cap
        if end is not None:
            self._dispatch(conn, end, complete=True)
        elif oversize:
            self._dispatch(conn, len(buf), complete=False)             # the app answers 413
        elif conn.expects_continue and not conn.continue_sent:
            conn.continue_sent = True
            try:
                conn.sock.send(b"HTTP/1.1 100 Continue\r\n\r\n")
            except OSError:
                pass

    def _dispatch(self, conn: Conn, end: int, complete: bool):
        self.sel.unregister(conn.sock)
        del self.conns[conn.sock.fileno()]
        data, rest = bytes(conn.buf[:end]), bytes(conn.buf[end:])
        if conn.continue_sent:
            head = conn.head_end
            data = _drop_expect(data[:head - 4]) + data[head - 4:]
        self.pool.submit(self._serve, conn, data, rest, complete)

    def _take_back(self):
        """Connections whose response is sent and that stay open: idle until their next request."""
        while True:
            try:
                conn, rest = self.back.get_nowait()
            except queue.Empty:
                return
            self._add_active(-1, answered=-conn.answered)
            if not self.alive:
                util.close(conn.sock)
                continue
            now = time.monotonic()
            conn.sock.setblocking(False)
            conn.buf, conn.head_end, conn.body = bytearray(rest), -1, None
            conn.expects_continue = conn.continue_sent = conn.answered = False
            conn.reason, conn.deadline = "idle", now + self.cfg.keepalive
            self.conns[conn.sock.fileno()] = conn
            self.sel.register(conn.sock, selectors.EVENT_READ, conn)
            if rest:                            # a pipelined request came with the last one
                conn.reason, conn.deadline = "headers", now + self.header_timeout
                self._add_active(1)
                self._advance(conn)

    def _sweep(self, now: float):
        for conn in [c for c in self.conns.values() if c.deadline <= now]:
            self.closed[conn.reason] += 1
            if conn.reason != "idle" and conn.buf:
                self._send_timeout(conn)
            self._close(conn)
        cut = {r: n for r, n in self.closed.items() if r != "idle"}
        if cut:
            limits = {"headers": f"headers not complete in {self.header_timeout:g} s",
                      "body": f"body stalled for {self.body_timeout:g} s"}
            self.log.info("closed %d slow connection(s): %s", sum(cut.values()),
                          ", ".join(f"{n} {limits[r]}" for r, n in cut.items()))
        if self.closed.get("idle"):
            self.log.debug("closed %d idle keep-alive connection(s)", self.closed["idle"])
        self.closed.clear()

    def _send_timeout(self, conn: Conn):
        what = "headers" if conn.reason == "headers" else "body"
        self._refuse(conn, 408, "Request Timeout", f"The request {what} did not arrive in time.", "request_timeout")

    @staticmethod
    def _refuse(conn: Conn, status: int, reason: str, message: str, code: str):
        """An error in the API's shape, sent without waiting (the connection is closed next)."""
        body = json.dumps({"error": {"message": message, "type": "invalid_request_error", "param": None,
                                     "code": code}}).encode()
        try:
            conn.sock.send(b"HTTP/1.1 %d %s\r\nConnection: close\r\nContent-Type: application/json\r\n"
                           b"Content-Length: %d\r\n\r\n%s" % (status, reason.encode(), len(body), body))
        except OSError:
            pass

    def _close(self, conn: Conn):
        self.sel.unregister(conn.sock)
        del self.conns[conn.sock.fileno()]
        if conn.reason != "idle":
            self._add_active(-1)
        util.close(conn.sock)

    def _stop(self):
        """Stop reading; let running requests finish within graceful_timeout."""
        self._set_accepting(False)
        for conn in list(self.conns.values()):
            self._close(conn)
        deadline = time.monotonic() + self.cfg.graceful_timeout
        while self.active > 0 and time.monotonic() < deadline:
            self.notify()
            self.sel.select(0.5)
            self._drain_pipe()
            self._take_back()
        self.pool.shutdown(wait=False)
        if self.slot is not None:
            self.load_table[2 * self.slot] = 0

    # --- a request, in a pool thread --------------------------------------------------------------
    def _serve(self, conn: Conn, data: bytes, rest: bytes, complete: bool):
        keep = False
        req = None
        sock = conn.sock
        try:
            sock.settimeout(self.body_timeout)      # a stalled send (or the rest of an oversize body)
            source = [data] if complete else itertools.chain([data], _recv_all(sock))
            req = next(http.get_parser(self.cfg, source, conn.addr))
            keep = self._handle(conn, req) and complete
        except http.errors.NoMoreData as e:
            self.log.debug("Ignored premature client disconnection. %s", e)
        except StopIteration as e:
            self.log.debug("Closing connection. %s", e)
        except (socket.timeout, ConnectionError) as e:
            self.log.debug("Client connection ended: %s", e)
        except OSError as e:
            if e.errno not in (errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN):
                self.log.exception("Socket error processing request.")
        except Exception as e:
            self.handle_error(req, sock, conn.addr, e)
        finally:
            if keep:
                self.back.put((conn, rest))
                try:
                    os.write(self.PIPE[1], b".")
                except OSError:
                    pass
            else:
                util.close(sock)
                self._add_active(-1, answered=-conn.answered)

    def _handle(self, conn: Conn, req) -> bool:
        """Run the app for one parsed request; whether the connection may serve another."""
        environ, resp = {}, None
        try:
            self.cfg.pre_request(self, req)
            start = datetime.now()
            resp, environ = wsgi.create(req, conn.sock, conn.addr, conn.listener.getsockname(), self.cfg)
            self.nr += 1
            if self.nr >= self.max_requests:
                self.log.info("Autorestarting worker after current request.")
                self.alive = False
            if not self.alive or self.cfg.keepalive <= 0:
                resp.force_close()
            body = self.wsgi(environ, resp.start_response)
            conn.answered = True
            self._add_active(0, answered=1)     # before the client can read it: its next request may come here
            try:
                if isinstance(body, environ["wsgi.file_wrapper"]):
                    resp.write_file(body)
                else:
                    for item in body:
                        resp.write(item)
                resp.close()
            finally:
                self.log.access(resp, req, environ, datetime.now() - start)
                if hasattr(body, "close"):
                    body.close()
            return not resp.should_close()
        except OSError:                 # the client went away: the caller's to judge, not a fault
            raise
        except (Exception, SystemExit):
            if resp is not None and resp.headers_sent:        # too late for an error response
                self.log.exception("Error handling request")
                raise StopIteration() from None
            raise
        finally:
            try:
                self.cfg.post_request(self, req, environ, resp)
            except Exception:
                self.log.exception("Exception in post_request hook")

    # --- limits and loads -------------------------------------------------------------------------
    def _body_cap(self) -> int | None:
        """The app's own body limit (Flask's MAX_CONTENT_LENGTH), if it has one."""
        return getattr(self.wsgi, "config", {}).get("MAX_CONTENT_LENGTH")

    def _head_cap(self) -> int:
        c = self.cfg
        if not (c.limit_request_line and c.limit_request_fields and c.limit_request_field_size):
            return 1 << 20
        return c.limit_request_line + c.limit_request_fields * (c.limit_request_field_size + 2) + 4

    @property
    def load(self) -> int:
        """What the other workers compare: requests not yet answered (a response being sent does not count)."""
        return self.active - self.answered

    def _add_active(self, n: int, answered: int = 0):
        with self.active_lock:            # the loop and the request threads both count
            self.active += n
            self.answered += answered
            if self.slot is not None:
                self.load_table[2 * self.slot + 1] = self.load

    def _claim_slot(self) -> int:
        me, t = os.getpid(), self.load_table
        with self.slot_lock:
            for slot in range(LOAD_SLOTS):
                if t[2 * slot] in (0, me) or not _alive(t[2 * slot]):
                    t[2 * slot], t[2 * slot + 1] = me, 0
                    return slot
        self.log.warning("more than %d workers: this one does not take part in load balancing", LOAD_SLOTS)
        return None

    def _should_pass(self) -> bool:
        """Another live worker handles fewer requests than this one."""
        if self.slot is None:
            return False
        me, t = os.getpid(), self.load_table
        return any(t[2 * s] not in (0, me) and t[2 * s + 1] < self.load and _alive(t[2 * s])
                   for s in range(LOAD_SLOTS))


def _recv_all(sock):
    """The rest of a request's bytes, read from the socket (for a request dispatched before its end)."""
    while True:
        data = sock.recv(RECV_BYTES)
        if not data:
            return
        yield data


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError as e:
        return e.errno == errno.EPERM
    return True


def worker_class(settings) -> type:
    """The worker class with ``settings``' read limits (gunicorn takes a class as its worker_class)."""
    return type("RequestBufferingWorker", (RequestBufferingWorker,),
                {"header_timeout": float(settings.header_timeout), "body_timeout": float(settings.body_timeout),
                 "__module__": __name__, "__qualname__": "RequestBufferingWorker"})
