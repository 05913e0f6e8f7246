"""The suite in three folders: core/ (the numerical core against its references: samplers, networks,
formats, pipeline), api/ (the HTTP side in-process, with stub or tiny models) and server/ (a real
gunicorn, nginx, an installed package). Every test under server/ carries the ``server`` marker:
``pytest tests/core`` runs just the numerics, ``pytest -m "not server and not slow"`` the quick part."""
import os
import sys

import pytest
import torch

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)
sys.path[:0] = [ROOT, TESTS]                  # the project, and the tests' helper modules (api_helpers, ...)
CACHE = os.path.join(ROOT, ".cache")          # ignored by git: big generated checkpoints live here
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def cache_dir():
    os.makedirs(CACHE, exist_ok=True)
    return CACHE


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
