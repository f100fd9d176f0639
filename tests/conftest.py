"""Shared test fixtures.

The real data in ../shared/data is read in place. Where it is absent a test skips with a message, except
under CI=true: there a missing directory is a failure, so a green CI means those tests really ran.
"""

import os
from pathlib import Path

import pytest

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs one worker per core. Each worker, and each run it starts, takes one intra-op
    # thread unless told otherwise: two threads per worker would put twice as many threads as cores in
    # OpenMP's spinning barriers. (Set before anything imports torch, which reads it once.)
    os.environ.setdefault("OMP_NUM_THREADS", "1")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def _shared(relative: str) -> Path:
    path = SHARED_DATA / relative
    if not path.exists():
        message = f"{path} is missing (the shared test data lives beside the repository in ../shared/data)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return path


@pytest.fixture
def shared():
    """shared('text/tinystories/tinystories_sample.txt') -> the path, or skip/fail if absent."""
    return _shared


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    # Tests never reach the network: a hub lookup must fail fast, not wait on a timeout.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
