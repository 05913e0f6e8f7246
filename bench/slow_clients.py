"""/health and generation latency with 0 and 200 slow connections open, for the project's worker
(api/worker.py) and for gunicorn's stock gthread worker (what the server ran before), measured in the
same run:

    python -m bench.slow_clients [--health 50] [--gens 5] [--size 128] [--steps 10] [--out FILE]

The slow connections are those of tests/server/test_slow_clients.py: 50 each that trickle their headers, announce
a body and never send it, stay silent, or sit idle after a keep-alive request. A request that gets no
answer within ``--give-up`` seconds is reported as such (gthread with slow clients open). The read limits
are raised above the measurement's length, so that no slow connection is cut while it runs."""
import argparse
import statistics
import time
from datetime import datetime
from pathlib import Path

import requests

from bench.harness import API_KEY, SlowClients
from bench.server import Server

WORKERS = {"ours": (), "gthread": ("-k", "gthread")}


def _timed(fn, n: int, give_up: float) -> list[float] | str:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        try:
            r = fn(give_up)
        except requests.RequestException:
            return f"no answer in {give_up:g} s"
        if r.status_code != 200:
            return f"HTTP {r.status_code}"
        times.append(time.perf_counter() - t0)
    return times


def measure(worker: str, slow: int, args) -> dict:
    srv = Server(args=WORKERS[worker], SD_HEADER_TIMEOUT="600", SD_BODY_TIMEOUT="600", SD_KEEPALIVE="600")
    battery = None
    try:
        if slow:
            battery = SlowClients(srv.port, per_kind=slow // 4)
        health = _timed(lambda t: requests.get(srv.base + "/health", timeout=t), args.health, args.give_up)
        body = {"prompt": "a red circle", "size": f"{args.size}x{args.size}", "steps": args.steps,
                "response_format": "b64_json"}
        gens = _timed(lambda t: requests.post(srv.base + "/v1/images/generations", json=body, timeout=t,
                                              headers={"Authorization": f"Bearer {API_KEY}"}),
                      args.gens, args.give_up)
        return {"health": health, "gens": gens}
    finally:
        if battery is not None:
            battery.close()
        srv.stop()


def _cell(v) -> str:
    if isinstance(v, str):
        return v
    return f"{statistics.median(v) * 1e3:.1f} ms (max {max(v) * 1e3:.1f})"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--health", type=int, default=50, help="/health requests per case")
    p.add_argument("--gens", type=int, default=5, help="generations per case")
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--slow", type=int, default=200, help="slow connections (a multiple of 4)")
    p.add_argument("--give-up", type=float, default=10.0)
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "slow-clients.md"))
    args = p.parse_args(argv)
    rows = []
    for worker in WORKERS:
        for slow in (0, args.slow):
            r = measure(worker, slow, args)
            rows.append(f"| {worker} | {slow} | {_cell(r['health'])} | {_cell(r['gens'])} |")
            print(rows[-1], flush=True)
    text = (f"\n## {datetime.now():%Y-%m-%d %H:%M} slow clients (`python -m bench.slow_clients`)\n\n"
            f"/health: median of {args.health}, each on a new connection; generation: {args.size}² "
            f"{args.steps} steps, median of {args.gens}.\n\n"
            "| worker | slow connections | /health | generation |\n|---|---|---|---|\n" + "\n".join(rows) + "\n")
    with open(args.out, "a") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
