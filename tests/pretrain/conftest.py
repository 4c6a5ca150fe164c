from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True)
def one_torch_thread() -> Iterator[None]:
    """The tiny test models gain nothing from intra-op threads, and on a shared 2-core machine two threads
    per process oversubscribe the cores (measured: 5x slower steps under load). Restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
