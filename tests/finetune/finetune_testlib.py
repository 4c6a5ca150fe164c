"""Shared test helpers and fixtures (re-exported by conftest.py): a word-level digit tokenizer with the
Kiln special ids, and two tiny pretraining checkpoints (BERT, GPT) written with pretrain.checkpoint.save_checkpoint."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import WhitespaceSplit

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

