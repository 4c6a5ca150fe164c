"""Shared test helpers and fixtures (re-exported by conftest.py): a word-level digit tokenizer with the
Kiln special ids, and two tiny pretraining checkpoints (BERT, GPT) written with pretrain.checkpoint.save_checkpoint."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import WhitespaceSplit
from torch import Tensor

from finetune.decode import greedy_decode
from finetune.module import translation_loss
from pretrain.checkpoint import save_checkpoint
from pretrain.models.bert import BertConfig, BertForPreTraining
from pretrain.models.gpt import GPTConfig, GPTLMHeadModel

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[BOS]", "[EOS]"]  # ids 0..6 (docs/design.md)
PAD, UNK, CLS, SEP, MASK, BOS, EOS = range(7)
DIGITS = [str(d) for d in range(10)]  # ids 7..16
VOCAB = len(SPECIALS) + len(DIGITS)


def digit_id(d: int) -> int:
    return len(SPECIALS) + d


def make_tokenizer() -> Tokenizer:
    vocab = {tok: i for i, tok in enumerate(SPECIALS + DIGITS)}
    tok = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = WhitespaceSplit()
    tok.add_special_tokens(SPECIALS)
    return tok


def bert_config(**overrides: object) -> BertConfig:
    base = dict(vocab_size=VOCAB, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertConfig.from_preset("tiny", **{**base, **overrides})


def gpt_config(**overrides: object) -> GPTConfig:
    base = dict(vocab_size=VOCAB, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPTConfig.from_preset("tiny", **{**base, **overrides})


@dataclass
class Pretrained:
    bert_dir: Path
    gpt_dir: Path
    bert: BertForPreTraining
    gpt: GPTLMHeadModel
    tokenizer_file: Path


def save_pretrained(root: Path, gpt_width: int) -> Pretrained:
    root.mkdir(parents=True, exist_ok=True)
    tokenizer_file = root / "tokenizer.json"
    make_tokenizer().save(str(tokenizer_file))
    torch.manual_seed(0)
    bert_cfg, gpt_cfg = bert_config(), gpt_config(n_embd=gpt_width)
    bert, gpt = BertForPreTraining(bert_cfg), GPTLMHeadModel(gpt_cfg)
    bert_dir = save_checkpoint(root / "bert", bert, bert_cfg, tokenizer_file)
    gpt_dir = save_checkpoint(root / "gpt", gpt, gpt_cfg, tokenizer_file)
    return Pretrained(bert_dir, gpt_dir, bert, gpt, tokenizer_file)


@pytest.fixture(scope="session")
def pretrained(tmp_path_factory: pytest.TempPathFactory) -> Pretrained:
    """Encoder and decoder of the same width (no projection)."""
    return save_pretrained(tmp_path_factory.mktemp("same_width"), gpt_width=64)


@pytest.fixture(scope="session")
def pretrained_narrow_decoder(tmp_path_factory: pytest.TempPathFactory) -> Pretrained:
    """A 64-wide encoder and a 32-wide decoder (needs the projection)."""
    return save_pretrained(tmp_path_factory.mktemp("narrow"), gpt_width=32)


@pytest.fixture()
def tokenizer() -> Tokenizer:
    return make_tokenizer()


# ---------------------------------------------------------------- shared by the from-scratch model tests
class NoCache:
    """The decoding protocol without incremental state: every step re-runs the full forward on the whole prefix.
    The 'memory' is the source ids themselves and the 'cache' the prefix, so the search can still reorder rows."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model

    def encode(self, src_ids: Tensor, src_mask: Tensor) -> Tensor:
        return src_ids

    def decode_step(self, tgt_ids: Tensor, memory: Tensor, src_mask: Tensor, cache: Tensor | None
                    ) -> tuple[Tensor, Tensor]:
        prefix = tgt_ids if cache is None else torch.cat([cache, tgt_ids], dim=1)
        return self.model(memory, src_mask, prefix)[:, -1], prefix

    def reorder_cache(self, cache: Tensor, index: Tensor) -> Tensor:
        return cache.index_select(0, index)


N_PAIRS = 50
MAX_STEPS = 400  # it gets there in ~50 steps (~2 s); the bound keeps a regression from hanging the suite


def reversal_batch(n: int, seed: int) -> tuple[dict[str, Tensor], list[list[int]]]:
    """n digit strings of 3-6 digits as the pipeline builds rows: src `x [EOS]`, tgt_in `[BOS] y`, tgt_out
    `y [EOS]` (-100 at padding), with y = x reversed; also the expected outputs."""
    rng = random.Random(seed)
    xs = [[digit_id(rng.randrange(10)) for _ in range(rng.randint(3, 6))] for _ in range(n)]
    shape = (n, 7)
    b = {"src_ids": torch.full(shape, PAD), "src_mask": torch.zeros(shape, dtype=torch.long),
         "tgt_in": torch.full(shape, PAD), "tgt_out": torch.full(shape, -100)}
    for i, x in enumerate(xs):
        y = x[::-1]
        b["src_ids"][i, : len(x) + 1] = torch.tensor(x + [EOS])
        b["src_mask"][i, : len(x) + 1] = 1
        b["tgt_in"][i, : len(y) + 1] = torch.tensor([BOS] + y)
        b["tgt_out"][i, : len(y) + 1] = torch.tensor(y + [EOS])
    return b, [x[::-1] for x in xs]


def exact_match(model: Any, b: dict[str, Tensor], expected: list[list[int]]) -> float:
    hyps = greedy_decode(model, b["src_ids"], b["src_mask"], BOS, EOS, max_len=8)
    return sum(h == y for h, y in zip(hyps, expected, strict=True)) / len(expected)


def train_reversal(model: torch.nn.Module) -> tuple[torch.nn.Module, dict[str, Tensor], list[list[int]], list[float]]:
    """Teacher-force `model` on the 50 reversal pairs until greedy decoding gets them all (or MAX_STEPS); returns
    (model in eval mode, the batch, the expected outputs, exact match every 25 steps)."""
    b, expected = reversal_batch(N_PAIRS, seed=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    history = [exact_match(model.eval(), b, expected)]
    for step in range(1, MAX_STEPS + 1):
        model.train()
        loss = translation_loss(model(b["src_ids"], b["src_mask"], b["tgt_in"]), b["tgt_out"], 0.1)["loss"]
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if step % 25 == 0:
            history.append(exact_match(model.eval(), b, expected))
            if history[-1] == 1.0:
                break
    return model.eval(), b, expected, history
