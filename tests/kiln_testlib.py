"""Helpers shared by more than one test package: a word-level tokenizer with Kiln's special ids,
the single-thread fixture for tiny models, and a quiet few-step Lightning fit.

Importable as `kiln_testlib` from every test (tests/ holds the root conftest, so pytest puts it on
sys.path); helpers of one package live in its own `<package>_testlib.py`.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence

import lightning as L
import pytest
import torch
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import WhitespaceSplit

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[BOS]", "[EOS]"]  # ids 0..6 (design.md)


def word_tokenizer(words: Sequence[str]) -> Tokenizer:
    """Whitespace-split words: the Kiln specials at ids 0..6, then `words` in order."""
    vocab = {t: i for i, t in enumerate([*SPECIALS, *words])}
    tok = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = WhitespaceSplit()
    tok.add_special_tokens(SPECIALS)
    return tok


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread() -> Iterator[None]:
    """Tiny models gain nothing from intra-op threads, and on a busy 2-core machine OpenMP
    spin-waiting makes them far slower (measured: an overfit fixture took 2 s with 1 thread, 110 s
    with 2 under load). Module-scoped, so that module-scoped fixtures (a trained model, a reference
    run) use the same thread count, and float sums, as the tests. A package's conftest.py turns it
    on for its tests by importing it."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def fit_steps(module: L.LightningModule, batches: list[dict[str, torch.Tensor]]) -> L.Trainer:
    """A CPU Lightning fit, one step per batch (already collated): no logger, checkpoints or
    validation, and the warnings such a tiny fit raises silenced."""
    trainer = L.Trainer(
        max_steps=len(batches),
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*")
        trainer.fit(module, torch.utils.data.DataLoader(batches, batch_size=None))
    return trainer
