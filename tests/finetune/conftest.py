"""Fixtures for tests/finetune live in finetune_testlib.py (a uniquely named module, importable from the tests)."""

from finetune_testlib import pretrained, pretrained_narrow_decoder, tokenizer  # noqa: F401
