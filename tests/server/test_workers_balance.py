"""SD_WORKERS > 1: a worker leaves a new connection to a less loaded worker (api/worker.py), instead
of queueing the request behind its own generation."""
import re
import time
from concurrent.futures import ThreadPoolExecutor

import requests

from bench.harness import API_KEY, Gunicorn, require_pipeline

GENERATING = r"\[(\d+)\] INFO [\w.]+: request \S+: generating"


def test_a_busy_worker_passes_new_requests_to_an_idle_one(tmp_path):
    require_pipeline()
    srv = Gunicorn(tmp_path / "data", tmp_path / "gunicorn.log", SD_WORKERS="2", SD_THREADS="1", SD_DTYPE="float32")
    h = {"Authorization": f"Bearer {API_KEY}"}

    def post(size, steps, seed):
        return requests.post(srv.base + "/v1/images/generations", headers=h, timeout=300,
                             json={"prompt": "a lighthouse", "size": f"{size}x{size}", "steps": steps, "seed": seed,
                                   "response_format": "b64_json"})

    try:
        srv.wait_healthy()
        deadline = time.monotonic() + 180
        while srv.log_text().count("Balancing load in slot") < 2:       # both workers loaded and in their loops
            assert time.monotonic() < deadline, srv.log_tail()
            time.sleep(0.1)
        assert "Using worker: RequestBufferingWorker" in srv.log_text()
        with ThreadPoolExecutor(1) as pool:
            long = pool.submit(post, 256, 80, 1)
            busy = srv.wait_log(GENERATING, timeout=60).group(1)
            short = [post(64, 2, seed) for seed in (2, 3)]
            long_ended = long.done()
            assert [r.status_code for r in short] == [200, 200], [r.text for r in short]
            assert long.result().status_code == 200
        pids = re.findall(GENERATING, srv.log_text())
        assert len(pids) == 3 and pids[0] == busy
        assert busy not in pids[1:], (f"a short request went to the busy worker {busy} (the long request had "
                                      f"{'' if long_ended else 'not '}ended when the short ones returned): {pids}")
        # two requests sent at the same moment: one each (a worker counts a connection from its accept)
        with ThreadPoolExecutor(2) as pool:
            pair = list(pool.map(lambda seed: post(128, 20, seed), (4, 5)))
        assert [r.status_code for r in pair] == [200, 200]
        pids = re.findall(GENERATING, srv.log_text())[3:]
        assert len(pids) == 2 and pids[0] != pids[1], pids
    finally:
        srv.stop()


def test_workers_starting_together_claim_distinct_slots():
    """Every worker needs a load slot of its own: two that claimed the same one would read each other's count
    as the other's load and stop passing requests on. Forked workers start at once, so claim at once."""
    import multiprocessing
    import types

    from api.worker import LOAD_SLOTS, RequestBufferingWorker

    cls = type("W", (RequestBufferingWorker,), {})
    cls.setup()
    ctx, n = multiprocessing.get_context("fork"), 6
    start, done, got = ctx.Barrier(n), ctx.Barrier(n), ctx.Queue()

    def claim():
        me = types.SimpleNamespace(load_table=cls.load_table, slot_lock=cls.slot_lock, log=None)
        start.wait()
        got.put(RequestBufferingWorker._claim_slot(me))
        done.wait()                                 # stay alive while the others claim: a dead pid's slot is free

    for _ in range(2):
        procs = [ctx.Process(target=claim) for _ in range(n)]
        for p in procs:
            p.start()
        slots = [got.get(timeout=30) for _ in procs]
        for p in procs:
            p.join()
        assert sorted(slots) == sorted(set(slots)) and all(0 <= s < LOAD_SLOTS for s in slots), slots
        cls.load_table[:] = [0] * (2 * LOAD_SLOTS)
