"""Load on loopback: 50 concurrent clients x 5 requests on the tiny model (64x64, 1 step) through
a real gunicorn (one worker, 8 threads, SD_MAX_QUEUE=4). Every request gets a 200 or a clean 503
(OpenAI error, Retry-After) that comes at once, /health keeps answering, the worker never dies,
and its RSS after the run is within 10% of its RSS after the warm-up. Prints the figures.

This server runs without an API key (and without CORS settings): it also checks the start-up
warning and that CORS is off by default."""
import random
import threading
import time

import pytest
import requests

from bench.harness import rss_kb, server_fixture

GEN = "/v1/images/generations"
CLIENTS = 50
REQUESTS_EACH = 5
DEADLINE_S = 90


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = server_fixture(tmp_path_factory, "load", API_KEY="", SD_HTTP_THREADS="8",
                         SD_MAX_QUEUE="4", SD_ACCESS_LOG="")
    try:
        yield srv
    finally:
        srv.stop()


def run_clients(base: str, clients: int, each: int, deadline: float) -> list:
    """Each client thread sends ``each`` requests one after the other (after a 503 it waits
    0.2-1 s, less than Retry-After, to keep the pressure up). Returns (status, seconds,
    response) of every request."""
    results, lock = [], threading.Lock()
    barrier = threading.Barrier(clients)

    def client(i):
        rng = random.Random(i)
        with requests.Session() as s:
            barrier.wait(30)
            for k in range(each):
                if time.monotonic() > deadline:
                    return
                body = {"prompt": f"client {i} request {k}", "size": "64x64", "steps": 1,
                        "seed": i * 100 + k,
                        "response_format": "url" if (i + k) % 4 == 0 else "b64_json"}
                t0 = time.monotonic()
                try:
                    r = s.post(base + GEN, json=body, timeout=max(1.0, deadline - t0))
                    out = (r.status_code, time.monotonic() - t0, r)
                except requests.RequestException as e:
                    out = (type(e).__name__, time.monotonic() - t0, None)
                with lock:
                    results.append(out)
                if out[0] == 503:
                    time.sleep(rng.uniform(0.2, 1.0))

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(max(1.0, deadline - time.monotonic() + 30))
    return results


def pct(values, q):
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def test_fifty_clients(server):
    pid = server.worker_pid()
    warm = run_clients(server.base, 10, 2, time.monotonic() + 60)     # warm-up
    assert {r[0] for r in warm} <= {200, 503}
    time.sleep(0.5)
    rss_warm = rss_kb(pid)

    health = []
    stop = threading.Event()

    def watch_health():
        while not stop.is_set():
            t0 = time.monotonic()
            code = requests.get(server.base + "/health", timeout=30).status_code
            health.append((code, time.monotonic() - t0))
            time.sleep(0.2)

    watcher = threading.Thread(target=watch_health, daemon=True)
    watcher.start()
    t0 = time.monotonic()
    results = run_clients(server.base, CLIENTS, REQUESTS_EACH, t0 + DEADLINE_S)
    wall = time.monotonic() - t0
    stop.set()
    watcher.join(30)
    time.sleep(0.5)
    rss_after = rss_kb(pid)

    statuses = {}
    for code, _, _ in results:
        statuses[code] = statuses.get(code, 0) + 1
    ok = [sec for code, sec, _ in results if code == 200]
    busy = [sec for code, sec, _ in results if code == 503]
    growth = (rss_after - rss_warm) / rss_warm
    print(f"\nload: {CLIENTS} clients x {REQUESTS_EACH} requests = {len(results)} in {wall:.1f} s;"
          f" statuses {statuses}\n  200: p50 {pct(ok, .5):.2f} s, p95 {pct(ok, .95):.2f} s, "
          f"max {max(ok, default=0):.2f} s\n  503: p50 {pct(busy, .5) * 1000:.0f} ms, p95 "
          f"{pct(busy, .95) * 1000:.0f} ms, max {max(busy, default=0) * 1000:.0f} ms\n"
          f"  /health during the run: {len(health)} checks, max "
          f"{max((s for _, s in health), default=0) * 1000:.0f} ms\n  worker {pid} RSS: "
          f"{rss_warm / 1024:.1f} MiB after warm-up, {rss_after / 1024:.1f} MiB after the run "
          f"({growth * 100:+.1f}%)")

    assert len(results) == CLIENTS * REQUESTS_EACH, "some clients did not finish in time"
    assert set(statuses) <= {200, 503}, statuses
    assert statuses.get(200, 0) >= CLIENTS // 5, statuses           # real work got done
    for code, _, r in results:
        if code == 200:
            body = r.json()
            assert len(body["data"]) == 1 and ("url" in body["data"][0]
                                               or "b64_json" in body["data"][0])
        else:
            err = r.json()["error"]
            assert (err["type"], err["code"]) == ("server_error", "server_busy")
            assert int(r.headers["Retry-After"]) >= 1
    assert pct(busy, .95) < 2.0, "503s must come at once, not after waiting"
    assert all(code == 200 for code, _ in health) and health
    assert server.worker_pids() == [pid], "the worker died or was replaced"
    assert server.proc.poll() is None
    assert "WORKER TIMEOUT" not in server.log_text() and "Traceback" not in server.log_text()
    assert abs(growth) <= 0.10, (rss_warm, rss_after)


def test_without_key_warns_and_cors_is_off(server):
    log = server.log_text()
    assert "no API key configured" in log
    r = requests.get(server.base + "/v1/models", headers={"Origin": "https://evil.example"},
                     timeout=30)
    assert r.status_code == 200 and "Access-Control-Allow-Origin" not in r.headers
    pre = requests.options(server.base + GEN, timeout=30, headers={
        "Origin": "https://evil.example", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type"})
    assert not any(h.lower().startswith("access-control-allow") for h in pre.headers)
