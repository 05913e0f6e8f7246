"""A directory of textual-inversion embeddings (``--embd-dir``): a prompt that names one (its file name
without extension, as a whole word, in any case) gets its learned vectors in place of the name's tokens.

The directory is listed again when it changes, and each file is read when a prompt first names it (again
when it changes), so embeddings can be added while the server runs. File formats: sdcore.formats.embeddings.
"""
from __future__ import annotations

import hashlib
import os
import re
import threading

import torch

from .formats.embeddings import EXTENSIONS, read_embedding
from .formats.files import CheckpointError


class EmbeddingError(CheckpointError):
    """An embedding a prompt names that this model cannot use; the message names it."""


class EmbeddingDir:
    def __init__(self, directory: str):
        self.directory = os.path.realpath(directory)
        self._lock = threading.Lock()
        self._listed, self._files, self._pattern = None, {}, None      # directory mtime, name -> path, regex
        self._read: dict[str, tuple] = {}                              # path -> (mtime, vectors, short hash)

    def _list(self) -> None:
        try:
            mtime = os.stat(self.directory).st_mtime_ns
        except OSError:
            mtime = None
        if mtime == self._listed:
            return
        files = {}
        for f in sorted(os.listdir(self.directory)) if mtime is not None else []:
            path = os.path.realpath(os.path.join(self.directory, f))
            if f.endswith(EXTENSIONS) and os.path.dirname(path) == self.directory and os.path.isfile(path):
                files.setdefault(os.path.splitext(f)[0].lower(), path)
        names = sorted(files, key=len, reverse=True)                   # the longest name wins an overlap
        self._files, self._listed = files, mtime
        self._pattern = (re.compile(r"(?<!\w)(" + "|".join(map(re.escape, names)) + r")(?!\w)", re.IGNORECASE)
                         if names else None)

    def names(self) -> list[str]:
        with self._lock:
            self._list()
            return sorted(self._files)

    def split(self, text: str) -> list[str | tuple[str]]:
        """``text`` cut around the embeddings it names: plain strings, and (name,) for each embedding."""
        with self._lock:
            self._list()
            pattern = self._pattern
        if pattern is None:
            return [text]
        out, pos = [], 0
        for m in pattern.finditer(text):
            out += [text[pos:m.start()], (m.group(1).lower(),)]
            pos = m.end()
        return out + [text[pos:]]

    def _entry(self, name: str) -> tuple:
        path = self._files[name]
        mtime = os.stat(path).st_mtime_ns
        with self._lock:
            cached = self._read.get(path)
            if cached is None or cached[0] != mtime:
                vectors = read_embedding(path)
                with open(path, "rb") as f:
                    digest = hashlib.sha256(f.read()).hexdigest()[:12]
                cached = self._read[path] = (mtime, vectors, digest)
        return cached

    def vectors(self, name: str, width: int) -> torch.Tensor:
        """The embedding's vectors [n, width] for a text encoder ``width`` wide."""
        by_width = self._entry(name)[1]
        if width not in by_width:
            raise EmbeddingError(f"embedding {name!r} has vectors {sorted(by_width)} wide, not the {width} of this "
                                 "model's text encoder: it was made for another model family")
        return by_width[width]

    def used(self, *texts: str) -> list[tuple[str, str]]:
        """(name, A1111 short hash: sha256 of the file) of the embeddings ``texts`` name, in order of first use."""
        names = dict.fromkeys(part[0] for text in texts for part in self.split(text) if isinstance(part, tuple))
        return [(name, self._entry(name)[2]) for name in names]
