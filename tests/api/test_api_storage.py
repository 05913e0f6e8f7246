"""The image store: atomic writes, TTL expiry and cleanup, id/name validation (no traversal)."""
import os
import time

import pytest

from api import storage
from api.storage import ImageStore, valid_id, valid_name

GOOD_ID = "file-" + "0123456789abcdef" * 2


def test_save_get_list_delete(tmp_path):
    st = ImageStore(tmp_path / "d", ttl=3600)
    a = st.save(b"AAA", "a.png")
    b = st.save(b"BBBB", "b.png")
    assert valid_id(a.id) and a.id != b.id
    assert (tmp_path / "d" / a.id / "a.png").read_bytes() == b"AAA"
    assert st.get(a.id).bytes == 3 and st.get(a.id).filename == "a.png"
    assert {f.id for f in st.list()} == {a.id, b.id}
    assert st.open_path(b.id, "b.png").read_bytes() == b"BBBB"
    assert st.open_path(b.id, "a.png") is None
    assert st.delete(a.id) and not st.delete(a.id)
    assert st.get(a.id) is None and not (tmp_path / "d" / a.id).exists()
    obj = st.get(b.id).as_openai()
    assert obj["object"] == "file" and obj["expires_at"] == obj["created_at"] + 3600


def test_atomic_write_uses_temp_file_fsync_and_replace(tmp_path, monkeypatch):
    st = ImageStore(tmp_path, ttl=3600)
    seen = {"fsync": 0}
    real_replace, real_fsync = os.replace, os.fsync

    def fake_fsync(fd):
        seen["fsync"] += 1
        return real_fsync(fd)

    def fake_replace(src, dst):
        src, dst = str(src), str(dst)
        assert os.path.dirname(src) == os.path.dirname(dst)          # same directory
        assert os.path.basename(src).startswith(".tmp-")
        assert open(src, "rb").read() == b"payload" and not os.path.exists(dst)
        assert seen["fsync"] >= 1                                      # data synced before rename
        assert st.get(os.path.basename(os.path.dirname(dst))) is None  # invisible until renamed
        seen["replaced"] = True
        return real_replace(src, dst)

    monkeypatch.setattr(storage.os, "replace", fake_replace)
    monkeypatch.setattr(storage.os, "fsync", fake_fsync)
    f = st.save(b"payload", "x.png")
    assert seen.get("replaced") and f.path.read_bytes() == b"payload"
    assert [p.name for p in f.path.parent.iterdir()] == ["x.png"]   # no temp file left


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    st = ImageStore(tmp_path, ttl=3600)

    def boom(fd):
        raise OSError("disk full")

    monkeypatch.setattr(storage.os, "fsync", boom)
    with pytest.raises(OSError):
        st.save(b"payload", "x.png")
    assert list(tmp_path.iterdir()) == [] and st.list() == []


def _age(path, seconds):
    t = time.time() - seconds
    os.utime(path, (t, t))


def test_ttl_cleanup_on_save_and_list(tmp_path):
    st = ImageStore(tmp_path, ttl=100)
    old = st.save(b"old", "o.png")
    young = st.save(b"young", "y.png")
    _age(old.path, 200)
    _age(old.path.parent, 200)
    _age(young.path, 50)
    assert st.get(old.id) is None            # expired: invisible even before the sweep
    assert old.path.exists()
    st.save(b"new", "n.png")                 # a store sweeps
    assert not old.path.parent.exists()
    assert st.get(young.id) is not None and young.path.exists()
    _age(young.path, 150)
    _age(young.path.parent, 150)
    assert young.id not in [f.id for f in st.list()]   # a listing sweeps too
    assert not young.path.parent.exists()


def test_cleanup_never_deletes_younger_than_ttl(tmp_path):
    st = ImageStore(tmp_path, ttl=100)
    # an in-progress write by another process: a young temp file in an id directory
    d = tmp_path / GOOD_ID
    d.mkdir()
    (d / ".tmp-abc").write_bytes(b"partial")
    _age(d, 500)                                  # old directory, but a young file inside
    assert st.cleanup() == 0 and (d / ".tmp-abc").exists()
    f = st.save(b"x", "x.png")
    _age(f.path, 500)                             # old file, but its directory was just touched
    assert st.cleanup() == 0 and f.path.exists()
    _age(d / ".tmp-abc", 500)                     # a crashed write, now stale
    assert st.cleanup() == 1 and not d.exists()


def test_cleanup_ignores_foreign_entries(tmp_path):
    st = ImageStore(tmp_path, ttl=1)
    (tmp_path / "README").write_text("keep")
    (tmp_path / "other").mkdir()
    _age(tmp_path / "README", 1000)
    _age(tmp_path / "other", 1000)
    st.cleanup()
    assert (tmp_path / "README").exists() and (tmp_path / "other").exists()
    assert st.list() == []


def test_ttl_zero_keeps_forever(tmp_path):
    st = ImageStore(tmp_path, ttl=0)
    f = st.save(b"x", "x.png")
    _age(f.path, 10 ** 8)
    _age(f.path.parent, 10 ** 8)
    assert st.cleanup() == 0 and st.get(f.id) is not None and st.get(f.id).expires_at is None


def test_injected_clock(tmp_path):
    now = [time.time()]
    st = ImageStore(tmp_path, ttl=10, clock=lambda: now[0])
    f = st.save(b"x", "x.png")
    now[0] += 5
    assert st.get(f.id) is not None
    now[0] += 10
    assert st.get(f.id) is None and st.list() == [] and not f.path.exists()


@pytest.mark.parametrize("bad", ["", "file-", "file-" + "0" * 31, "file-" + "0" * 33, "FILE-" + "0" * 32,
                                 "file-" + "A" * 32, "file-" + "g" * 32, "../" + GOOD_ID, GOOD_ID + "/..",
                                 "..", ".", "/etc/passwd", GOOD_ID + "\n", "file-" + "0" * 31 + "/", None, 5])
def test_invalid_ids(tmp_path, bad):
    st = ImageStore(tmp_path / "d", ttl=10)
    assert not valid_id(bad)
    assert st.get(bad) is None and st.open_path(bad, "x.png") is None and not st.delete(bad)


@pytest.mark.parametrize("bad", ["", "..", ".", "../x.png", "a/b.png", "a\\b.png", ".hidden", "x..png",
                                 "..png", "a b.png", "x.png\0", "-x.png", "é.png", "x" * 200, "/abs.png"])
def test_invalid_names(tmp_path, bad):
    st = ImageStore(tmp_path, ttl=10)
    f = st.save(b"x", "x.png")
    assert not valid_name(bad)
    assert st.open_path(f.id, bad) is None
    with pytest.raises(ValueError):
        st.save(b"y", bad)


def test_symlink_not_served(tmp_path):
    st = ImageStore(tmp_path / "d", ttl=100)
    secret = tmp_path / "secret.txt"
    secret.write_text("secret")
    d = tmp_path / "d" / GOOD_ID
    d.mkdir()
    (d / "x.png").symlink_to(secret)
    assert st.get(GOOD_ID) is None and st.open_path(GOOD_ID, "x.png") is None


def test_files_are_world_readable_for_a_proxy(tmp_path):
    f = ImageStore(tmp_path, ttl=100).save(b"x", "x.png")
    assert f.path.stat().st_mode & 0o444 == 0o444
