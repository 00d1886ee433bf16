"""Shared test set-up: a private dataset root and cache per test session, slow-test opt-in."""

import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true", help="also run tests marked slow")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: slow test, run with --run-slow (make test-slow)")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--run-slow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --run-slow (make test-slow)")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def _isolated_caches(tmp_path_factory):
    """Text-embedding cache in a temporary folder, so tests never read a user's cache."""
    cache = tmp_path_factory.mktemp("c2s_cache")
    old = os.environ.get("C2S_CACHE")
    os.environ["C2S_CACHE"] = str(cache)
    yield cache
    if old is None:
        os.environ.pop("C2S_CACHE", None)
    else:
        os.environ["C2S_CACHE"] = old
