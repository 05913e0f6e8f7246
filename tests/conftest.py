"""The suite in three folders: core/ (the numerical core against its references: samplers, networks,
formats, pipeline), api/ (the HTTP side in-process, with stub or tiny models) and server/ (a real
gunicorn, nginx, an installed package). Every test under server/ carries the ``server`` marker:
``pytest tests/core`` runs just the numerics, ``pytest -m "not server and not slow"`` the quick part."""
import os
import shutil
import sys

import pytest
import torch

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)
sys.path[:0] = [ROOT, TESTS]                  # the project, and the tests' helper modules (api_helpers, ...)
CACHE = os.path.join(ROOT, ".cache")          # ignored by git: big generated checkpoints live here
KEEP_CACHE = os.environ.get("SD_TEST_KEEP_CACHE") == "1"
BIG = 64 << 20                                # bytes: what counts as a generated checkpoint under CACHE
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def cache_dir():
    os.makedirs(CACHE, exist_ok=True)
    return CACHE


def _size(path: str) -> int:
    if not os.path.isdir(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


@pytest.fixture(scope="module", autouse=True)
def _drop_what_the_module_cached():
    """The full-size checks build random checkpoints of several GB under .cache/, each used by one module. Kept
    for the whole run they add up to more disk than a CI machine may have, so what a module added there (entries
    over BIG) is removed when the module ends. SD_TEST_KEEP_CACHE=1 keeps them, for reruns that skip the build;
    what was there before the module is never touched."""
    before = set(os.listdir(CACHE)) if os.path.isdir(CACHE) else set()
    yield
    if KEEP_CACHE or not os.path.isdir(CACHE):
        return
    for name in set(os.listdir(CACHE)) - before:
        path = os.path.join(CACHE, name)
        if _size(path) > BIG:
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)


@pytest.fixture(scope="session")
def default_model_path():
    from weights.make_default import DEFAULT_PATH, main
    if not os.path.exists(DEFAULT_PATH):
        main([])
    return DEFAULT_PATH


def pytest_collection_modifyitems(items):
    server = os.path.join(TESTS, "server") + os.sep
    for item in items:
        if str(item.path).startswith(server):
            item.add_marker(pytest.mark.server)
