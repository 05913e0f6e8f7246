"""gunicorn's gthread worker, made to leave a new connection to a less loaded worker (SD_WORKERS > 1).

A gthread worker's main thread keeps accepting connections while one of its threads generates, so
with several workers two requests can queue on one worker while another idles (two concurrent 256²
requests to 2 workers, SD1.5-shaped, bf16, 2 cores: 12.3 s and 24.7 s, the second waiting for the
first; with this worker 12.6–13.1 s each). Here each worker publishes how many connections it is
handling (a generation holds its connection open while it runs and while it waits in the queue), and
does not accept a new one while another worker handles fewer: the kernel then hands the connection
to that worker, which is listening. Like nginx's least_conn, inside one gunicorn. When all are
equally loaded they all accept, and requests wait in a worker's queue (or get 503 past --max-queue)
as with a single worker.

The counts live in one table of (pid, connections) slots, allocated here in the master before it forks
the workers. A worker takes a slot once its app is loaded and it starts serving; a slot whose process
is gone counts as free. Keep-alive would bypass the choice (a request on an open connection goes to
the worker that holds it), so ``gunicorn_settings`` turns it off. A worker that stopped accepting
looks again whenever its own count drops and at least once a second (gthread's loop).

Built on gunicorn 27's ThreadWorker (``set_accept_enabled``, ``accept``, ``finish_request``,
``murder_*``, ``nr_conns``); ``supported()`` says whether the installed gunicorn has them (else plain
gthread is used); setup.cfg keeps gunicorn below 28 for that reason.
"""
import errno
import multiprocessing
import os

from gunicorn.workers.gthread import ThreadWorker

SLOTS = 64
_table = multiprocessing.RawArray("i", 2 * SLOTS)    # [pid, connections] per slot; pid 0: free
_claim_lock = multiprocessing.Lock()


def supported() -> bool:
    hooks = ("set_accept_enabled", "accept", "finish_request", "murder_keepalived", "murder_pending", "run")
    return (all(callable(getattr(ThreadWorker, name, None)) for name in hooks)
            and "nr_conns" in ThreadWorker.__init__.__code__.co_names)


def gunicorn_settings(workers: int) -> dict:
    """The gunicorn settings for ``workers`` workers: this worker class, without keep-alive, when there
    are several (and the installed gunicorn has what it builds on); else nothing to change."""
    if workers > 1 and supported():
        return {"worker_class": "api.gworker.BalancedThreadWorker", "keepalive": 0}
    return {}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError as e:
        return e.errno == errno.EPERM
    return True


def _claim(pid: int) -> int:
    # a worker killed while holding the lock must not stop the others from starting: wait 2 s at most
    locked = _claim_lock.acquire(timeout=2)
    try:
        for slot in range(SLOTS):
            other = _table[2 * slot]
            if other == 0 or other == pid or not _alive(other):
                _table[2 * slot], _table[2 * slot + 1] = pid, 0
                return slot
    finally:
        if locked:
            _claim_lock.release()
    raise RuntimeError(f"more than {SLOTS} workers")


class BalancedThreadWorker(ThreadWorker):
    slot = None

    def run(self):
        self.slot = _claim(os.getpid())
        try:
            super().run()
        finally:
            _table[2 * self.slot] = 0

    def _publish(self) -> None:
        if self.slot is not None:
            _table[2 * self.slot + 1] = self.nr_conns

    def _should_pass(self) -> bool:
        """Another live worker handles fewer connections than this one."""
        if self.slot is None:
            return False
        me = os.getpid()
        return any(_table[2 * s] not in (0, me) and _table[2 * s + 1] < self.nr_conns and _alive(_table[2 * s])
                   for s in range(SLOTS))

    def set_accept_enabled(self, enabled):
        super().set_accept_enabled(enabled and not self._should_pass())

    def accept(self, listener):
        if self._should_pass():             # woken for a connection that a less loaded worker should take
            super().set_accept_enabled(False)
            return
        super().accept(listener)
        self._publish()

    def finish_request(self, conn, fs):
        super().finish_request(conn, fs)
        self._publish()
        self.set_accept_enabled(self.nr_conns < self.worker_connections)

    def murder_keepalived(self, force=False):
        super().murder_keepalived(force)
        self._publish()

    def murder_pending(self):
        super().murder_pending()
        self._publish()
