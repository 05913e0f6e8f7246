import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
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
