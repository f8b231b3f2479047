import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(1, os.path.dirname(os.path.dirname(__file__)))  # benchmarks/ as a package
os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")

from helpers import Pools  # noqa: E402


@pytest.fixture(scope="session")
def pools():
    p = Pools()
    yield p
    p.close()


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    """name -> folder of a saved tiny random model (built lazily, once per session)."""
    import tiny_models

    root = tmp_path_factory.mktemp("tiny")
    cache = {}

    def get(name: str) -> str:
        if name not in cache:
            cache[name] = tiny_models.save(name, root / name)
        return cache[name]

    return get
