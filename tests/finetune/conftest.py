"""Fixtures for tests/finetune live in finetune_testlib.py (a uniquely named module, importable from the tests)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from finetune_testlib import pretrained, pretrained_narrow_decoder, tokenizer  # noqa: F401


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread() -> Iterator[None]:
    """Tiny models gain nothing from intra-op threads, and on a busy 2-core machine OpenMP spin-waiting makes
    them far slower (measured: the overfit fixture took 2 s with 1 thread, 110 s with 2 under load)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
