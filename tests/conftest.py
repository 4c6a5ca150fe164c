"""Suite-wide pytest hooks."""

from __future__ import annotations

import pytest
import torch


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked `gpu` need CUDA: without it they are skipped, with the reason, not failed."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="gpu: torch.cuda.is_available() is False on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
