"""The image store behind ``response_format=url`` and ``/v1/files``.

Layout: ``<root>/<file id>/<file name>``, one file per id directory. Ids are ``file-`` and 128
random bits in hex (``secrets``: unguessable); ids match ``file-<32 hex>``
and names ``[A-Za-z0-9][A-Za-z0-9._-]*`` (no ``..``); anything else is treated as absent, so a
path built from a request can never leave the root.

Writes are atomic: the bytes go to a hidden temporary file in the id directory, are fsync'ed,
then ``os.replace``d onto the final name (and the directory is fsync'ed), so a reader sees
either nothing or the whole file.

Stored files expire ``ttl`` seconds after they were written (``ttl`` 0 = never). Expired files
are removed by :meth:`ImageStore.cleanup`, which runs on every store and list; it only deletes
entries whose modification time is older than the TTL, so files being written (by this or
another worker process sharing the directory) are never touched. An expired file that has not
been swept yet is already invisible to :meth:`get`.
"""
from __future__ import annotations

import errno
import logging
import os
import re
import shutil
import secrets
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from .errors import APIError

log = logging.getLogger("sd_api_server")
ID_RE = re.compile(r"^file-[0-9a-f]{32}$")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_TMP_PREFIX = ".tmp-"


def valid_id(file_id: str) -> bool:
    return isinstance(file_id, str) and bool(ID_RE.fullmatch(file_id))


def valid_name(name: str) -> bool:
    return isinstance(name, str) and bool(NAME_RE.fullmatch(name)) and ".." not in name


@dataclass(frozen=True)
class StoredFile:
    id: str
    filename: str
    bytes: int
    created_at: int
    expires_at: int | None
    path: Path

    def as_openai(self) -> dict:
        return {"id": self.id, "object": "file", "bytes": self.bytes,
                "created_at": self.created_at, "expires_at": self.expires_at,
                "filename": self.filename, "purpose": "assistants_output", "status": "processed"}


class ImageStore:
    def __init__(self, root, ttl: int = 3600, clock=time.time):
        self.root = Path(root)
        self.ttl = int(ttl)
        self.clock = clock
        self.root.mkdir(parents=True, exist_ok=True)

    # --- helpers ------------------------------------------------------------------------------
    def _expired(self, mtime: float, now: float) -> bool:
        return self.ttl > 0 and now - mtime > self.ttl

    def _dir(self, file_id: str) -> Path | None:
        if not valid_id(file_id):
            return None
        return self.root / file_id

    def _entry(self, file_id: str, now: float) -> StoredFile | None:
        d = self._dir(file_id)
        if d is None:
            return None
        try:
            names = [n for n in os.listdir(d) if valid_name(n)]
        except (FileNotFoundError, NotADirectoryError):
            return None
        if len(names) != 1:
            return None
        path = d / names[0]
        try:
            st = path.lstat()
        except FileNotFoundError:
            return None
        if not path.is_file() or path.is_symlink() or self._expired(st.st_mtime, now):
            return None
        expires = int(st.st_mtime + self.ttl) if self.ttl > 0 else None
        return StoredFile(file_id, names[0], st.st_size, int(st.st_mtime), expires, path)

    # --- API ----------------------------------------------------------------------------------
    def save(self, data: bytes, filename: str = "image.png") -> StoredFile:
        if not valid_name(filename):
            raise ValueError(f"invalid file name {filename!r}")
        self.cleanup()
        file_id = "file-" + secrets.token_hex(16)     # 128 random bits: unguessable
        d = self.root / file_id
        d.mkdir(mode=0o755, parents=True)     # parents: the root may have been removed
        fd, tmp = tempfile.mkstemp(prefix=_TMP_PREFIX, dir=d)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o644)
            os.replace(tmp, d / filename)
        except BaseException:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            shutil.rmtree(d, ignore_errors=True)
            raise
        _fsync_dir(d)
        _fsync_dir(self.root)
        entry = self._entry(file_id, self.clock())
        assert entry is not None
        return entry

    def get(self, file_id: str) -> StoredFile | None:
        return self._entry(file_id, self.clock())

    def open_path(self, file_id: str, filename: str) -> Path | None:
        """The path of a stored file if ``file_id``/``filename`` name a live one, else None."""
        if not (valid_id(file_id) and valid_name(filename)):
            return None
        entry = self.get(file_id)
        if entry is None or entry.filename != filename:
            return None
        root = self.root.resolve()
        path = entry.path.resolve()
        if path.parent.parent != root:
            return None
        return path

    def list(self) -> list[StoredFile]:
        self.cleanup()
        now = self.clock()
        out = []
        for name in os.listdir(self.root):
            e = self._entry(name, now)
            if e is not None:
                out.append(e)
        out.sort(key=lambda e: (e.created_at, e.id), reverse=True)
        return out

    def delete(self, file_id: str) -> bool:
        if self.get(file_id) is None:
            return False
        shutil.rmtree(self.root / file_id, ignore_errors=True)
        return True

    def cleanup(self) -> int:
        """Remove expired entries; returns how many id directories were removed."""
        if self.ttl <= 0:
            return 0
        now = self.clock()
        removed = 0
        try:
            names = os.listdir(self.root)
        except FileNotFoundError:
            return 0
        for name in names:
            if not valid_id(name):
                continue
            d = self.root / name
            try:
                entries = list(os.scandir(d))
                dir_mtime = d.lstat().st_mtime
            except (FileNotFoundError, NotADirectoryError):
                continue
            # the newest thing inside decides: never delete anything younger than the TTL
            newest = max([dir_mtime] + [_mtime(e) for e in entries])
            if self._expired(newest, now):
                shutil.rmtree(d, ignore_errors=True)
                removed += 1
        return removed


def _mtime(entry: os.DirEntry) -> float:
    try:
        return entry.stat(follow_symlinks=False).st_mtime
    except FileNotFoundError:
        return 0.0


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


DISK_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


def store_all(store: ImageStore, files: list[tuple[bytes, str]], request_id: str) -> list[StoredFile]:
    """Store every (data, filename) of one response, or none of them: a failed save removes what this
    response saved before it (no orphans), then raises a 507 (disk full) or 500 APIError."""
    saved: list[StoredFile] = []
    try:
        for data, filename in files:
            saved.append(store.save(data, filename))
    except OSError as e:
        for stored in saved:
            store.delete(stored.id)
        if e.errno in DISK_FULL:
            log.error("request %s: cannot store the image: %s", request_id, errno.errorcode.get(e.errno, e.errno))
            raise APIError("The server cannot store the image: its disk is full. Retry later, "
                           "or ask for response_format=b64_json.", status=507,
                           type="server_error", code="insufficient_storage") from None
        log.exception("request %s: cannot store the image", request_id)
        raise APIError(f"The server could not store the image (request id {request_id}); "
                       "response_format=b64_json does not need storage.", status=500,
                       type="server_error", code="storage_error") from None
    return saved
