"""Property-based fuzzing of the running server with schemathesis, driven by the server's own
``/openapi.json``: a real gunicorn with the tiny model and small limits (n <= 2, steps <= 2,
at most 128x64 pixels), so that every generated request that is valid is also fast.

The schemathesis CLI runs its coverage phase (boundary values of every field, wrong types,
missing fields, unsupported methods), its fuzzing phase (random valid and invalid requests) and
its stateful phase (generate -> read/download/delete the file it produced), with a fixed seed
and a bounded number of cases per operation. The run must show zero 5xx responses and zero
responses that break the schema (status code, content type, headers and body as documented);
CHECKS also has schema-invalid requests refused, undocumented methods answered 405, the key
enforced, deleted files gone. The HAR report gives the figures, printed at the end.

``positive_data_acceptance`` is not among the checks: some rules cannot be written in JSON
Schema (width*height <= max_pixels, an uploaded file must be a real image of at least 8x8
pixels, seed + n - 1 within 64 bits), so schema-valid requests can rightly get a 400."""
import collections
import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.harness import API_KEY, server_fixture

SCHEMATHESIS = Path(sys.executable).parent / "schemathesis"
MAX_EXAMPLES = 10          # per operation and phase (fuzzing, stateful); with coverage ~700 cases
SEED = 7
CHECKS = ["not_a_server_error", "status_code_conformance", "content_type_conformance",
          "response_headers_conformance", "response_schema_conformance",
          "negative_data_rejection", "missing_required_header", "unsupported_method",
          "ignored_auth", "use_after_free", "ensure_resource_availability"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    if not SCHEMATHESIS.exists():
        pytest.fail(f"{SCHEMATHESIS} is missing: pip install schemathesis (test extra)",
                    pytrace=False)
    srv = server_fixture(tmp_path_factory, "fuzz", SD_MAX_N="2", SD_MAX_STEPS="1",
                         SD_MAX_PIXELS="4096", SD_MAX_INPUT_PIXELS="65536",
                         SD_MAX_UPLOAD_BYTES="1048576", SD_ACCESS_LOG="")
    try:
        yield srv
    finally:
        srv.stop()


def test_schemathesis(server, tmp_path):
    har = tmp_path / "schemathesis.har"
    cmd = [str(SCHEMATHESIS), "--no-color", "run", f"{server.base}/openapi.json",
           "-H", f"Authorization: Bearer {API_KEY}", "--checks", ",".join(CHECKS),
           "--max-examples", str(MAX_EXAMPLES), "--seed", str(SEED), "--workers", "1",
           "--request-timeout", "60", "--max-failures", "25", "--generation-database", "none",
           "--report", "har", "--report-har-path", str(har), "--report-dir", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=400)
    out = proc.stdout + proc.stderr
    entries = json.loads(har.read_text())["log"]["entries"] if har.exists() else []
    statuses = collections.Counter(e["response"]["status"] for e in entries)
    generations = sum(1 for e in entries if e["request"]["url"].endswith("/generations")
                      and e["response"]["status"] == 200)
    summary = [line.strip() for line in out.splitlines()
               if "generated" in line or line.strip().startswith(("✅", "❌", "⏭"))]
    print(f"\nschemathesis: {len(entries)} requests ({generations} successful generations); "
          f"statuses {dict(sorted(statuses.items()))}\n  " + "\n  ".join(summary))
    assert proc.returncode == 0, out[-12000:]
    assert not [s for s in statuses if s >= 500], statuses
    assert len(entries) >= 300, f"too few cases ran: {len(entries)}\n{out[-3000:]}"
    assert statuses[200] >= 50, statuses          # real generations and downloads happened
    assert server.proc.poll() is None and len(server.worker_pids()) == 1
    assert "Traceback" not in server.log_text()
