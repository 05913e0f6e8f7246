"""Disk full against a real gunicorn: url images get a clear 507 (insufficient_storage), nothing
half-written or orphaned is left, b64_json keeps working, and url works again once there is room.

The data directory is a 256 KiB tmpfs filled up (needs root and mount; ENOSPC, as on a real full
disk). Where mounting is not allowed, the worker gets a file-size limit instead (RLIMIT_FSIZE
below the size of one PNG, with SIGXFSZ ignored so that writes fail with EFBIG), lifted with
prlimit to "free" space. SD_TEST_DISK_FULL=rlimit forces the second way."""
import errno
import os
import resource
import shutil
import signal
import subprocess
import time

import pytest
import requests

from bench.harness import Gunicorn, auth_headers, require_pipeline

GEN = "/v1/images/generations"
FSIZE_LIMIT = 8192          # bytes; a 64x64 PNG of the tiny model is about 10 KiB


def _mount_tmpfs(path) -> bool:
    if os.environ.get("SD_TEST_DISK_FULL") == "rlimit" or os.geteuid() != 0 \
            or not shutil.which("mount"):
        return False
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k,mode=0755", "tmpfs", str(path)],
                       capture_output=True)
    return r.returncode == 0


def _limit_file_size():          # runs in the gunicorn master before exec; workers inherit it
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (FSIZE_LIMIT, resource.RLIM_INFINITY))


class Disk:
    """The data directory and how to fill and free it."""

    def __init__(self, data, mechanism, server=None):
        self.data, self.mechanism, self.server = data, mechanism, server

    def fill(self, leave: int = 0) -> None:
        if self.mechanism == "rlimit":
            resource.prlimit(self.server.worker_pid(), resource.RLIMIT_FSIZE,
                             (FSIZE_LIMIT, resource.RLIM_INFINITY))
            return
        filler = self.data / "filler"            # not an image id: the store ignores it
        fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            while True:
                os.write(fd, b"\0" * 4096)
        except OSError as e:
            assert e.errno == errno.ENOSPC
        finally:
            os.close(fd)
        if leave:
            os.truncate(filler, max(0, filler.stat().st_size - 4096 - leave))

    def free(self) -> None:
        if self.mechanism == "rlimit":
            resource.prlimit(self.server.worker_pid(), resource.RLIMIT_FSIZE,
                             (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
        else:
            (self.data / "filler").unlink(missing_ok=True)

    def entries(self) -> set:
        return {p.relative_to(self.data).as_posix() for p in self.data.rglob("*")
                if p.name != "filler"}


@pytest.fixture(scope="module")
def disk(tmp_path_factory):
    require_pipeline()
    tmp = tmp_path_factory.mktemp("disk")
    data = tmp / "data"
    data.mkdir()
    mounted = _mount_tmpfs(data)
    kw = {} if mounted else dict(preexec_fn=_limit_file_size, log_pipe=True,
                                 PYTHONDONTWRITEBYTECODE="1")
    srv = Gunicorn(data, tmp / "gunicorn.log", **kw)
    try:
        srv.wait_healthy()
        d = Disk(data, "tmpfs" if mounted else "rlimit", srv)
        if not mounted:
            d.free()                  # the limit applies from fill() on
        yield d
    finally:
        srv.stop()
        if mounted:
            subprocess.run(["umount", str(data)], check=False)


def post(server, **body):
    return requests.post(server.base + GEN, headers=auth_headers(), timeout=120,
                         json={"prompt": "a full disk", "size": "64x64", "steps": 1, **body})


def test_disk_full(disk):
    srv = disk.server
    ok = post(srv, response_format="url")
    assert ok.status_code == 200
    before = disk.entries()

    disk.fill()
    t0 = time.monotonic()
    r = post(srv, response_format="url", n=2)
    assert r.status_code == 507, r.text
    err = r.json()["error"]
    assert (err["type"], err["code"]) == ("server_error", "insufficient_storage")
    assert "disk is full" in err["message"] and "b64_json" in err["message"]
    assert "Traceback" not in r.text
    assert disk.entries() == before                       # nothing half-written, no orphans
    b64 = post(srv, response_format="b64_json", n=2)      # the server keeps serving
    assert b64.status_code == 200 and len(b64.json()["data"]) == 2
    assert requests.get(srv.base + "/health", timeout=10).status_code == 200
    files = requests.get(srv.base + "/v1/files", headers=auth_headers(), timeout=30)
    assert files.status_code == 200 and len(files.json()["data"]) == 1
    assert requests.get(ok.json()["data"][0]["url"], headers=auth_headers(),
                        timeout=30).status_code == 200   # what was stored is still served

    if disk.mechanism == "tmpfs":
        # room for one image but not two: the first of n=2 is removed again (all or nothing)
        disk.free()
        disk.fill(leave=12 * 1024)
        r = post(srv, response_format="url", n=2, seed=99)
        assert r.status_code == 507 and disk.entries() == before
        one = post(srv, response_format="url", n=1, seed=99)   # one did fit: it was undone
        assert one.status_code == 200
        file_id = one.json()["data"][0]["url"].split("/")[-2]
        assert requests.delete(f"{srv.base}/v1/files/{file_id}", headers=auth_headers(),
                               timeout=30).status_code == 200

    disk.free()
    again = post(srv, response_format="url", n=2)
    assert again.status_code == 200
    for item in again.json()["data"]:
        assert requests.get(item["url"], headers=auth_headers(), timeout=30).status_code == 200
    assert "cannot store the image: E" in srv.log_text()   # ENOSPC / EFBIG named in the log
    print(f"\ndisk full ({disk.mechanism}): url -> 507 in {time.monotonic() - t0:.2f} s, "
          f"b64_json -> 200, nothing partial left; url -> 200 once space was freed")
