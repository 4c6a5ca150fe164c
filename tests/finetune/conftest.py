"""Fixtures for tests/finetune live in finetune_testlib.py (a uniquely named module, importable
from the tests); importing them here makes them fixtures of every test below, one_torch_thread
(autouse) included."""

from finetune_testlib import (  # noqa: F401
    pretrained,
    pretrained_narrow_decoder,
    reversal_model,
    tokenizer,
)
from kiln_testlib import one_torch_thread  # noqa: F401
