"""An installed (not editable) sd-api-server serves its embedded default model: the console script, the
package data and the launcher work without the repository."""
import base64
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from bench.harness import ROOT, free_port

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    site = tmp_path_factory.mktemp("installed") / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--target", str(site), str(ROOT)], check=True, capture_output=True, timeout=600)
    return site


def test_the_installed_console_script_serves_the_default_model(installed, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SD_") and k != "API_KEY"}
    env.update(PYTHONPATH=str(installed), PYTHONUNBUFFERED="1")
    where = subprocess.run([sys.executable, "-c", "import api, app, weights; print(api.__file__, app.__file__, "
                            "weights.__file__)"], cwd=tmp_path, env=env, capture_output=True, text=True, check=True)
    assert all(Path(p).is_relative_to(installed) for p in where.stdout.split()), where.stdout     # not the clone
    port = free_port()
    log = open(tmp_path / "server.log", "wb")
    proc = subprocess.Popen([str(installed / "bin" / "sd-api-server"), "--port", str(port), "--device", "cpu",
                             "--data-dir", str(tmp_path / "data"), "--weights-cache", "off", "--threads", "2"],
                            cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            assert proc.poll() is None, (tmp_path / "server.log").read_text()
            try:
                if requests.get(base + "/health", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            time.sleep(0.2)
        models = requests.get(base + "/v1/models", timeout=10).json()
        assert [m["id"] for m in models["data"]] == ["shapes-sd1"]
        r = requests.post(base + "/v1/images/generations", timeout=120,
                          json={"prompt": "a red circle on a blue background", "steps": 2, "response_format": "b64_json"})
        assert r.status_code == 200, r.text
        assert base64.b64decode(r.json()["data"][0]["b64_json"]).startswith(PNG_MAGIC)
        text = (tmp_path / "server.log").read_text()
        assert str(installed / "weights" / "shapes-sd1.safetensors") in text, text[-2000:]
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()
