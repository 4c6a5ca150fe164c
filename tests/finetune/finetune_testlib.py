"""Shared test helpers and fixtures (re-exported by conftest.py): a word-level digit tokenizer with
the Kiln special ids, two tiny pretraining checkpoints (BERT, GPT) written with
pretrain.checkpoint.save_checkpoint, a tiny model of every translation architecture, and the
digit-reversal task they all learn."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import torch
from kiln_testlib import SPECIALS, word_tokenizer
from tokenizers import Tokenizer
from torch import Tensor, nn

from data_pipeline.configlib import from_preset
from finetune.decode import greedy_decode
from finetune.evaluate import accuracy, predict_labels
from finetune.models import ARCHITECTURES
from finetune.models.seq2seq import Seq2SeqConfig, WarmStartedSeq2Seq
from finetune.module import classification_loss, translation_loss
from pretrain.checkpoint import save_checkpoint
from pretrain.models.bert import BertConfig, BertForPreTraining
from pretrain.models.gpt import GPTConfig, GPTLMHeadModel
from pretrain.optim import OptimConfig, build_optimizer

PAD, UNK, CLS, SEP, MASK, BOS, EOS = range(7)  # SPECIALS' ids
DIGITS = [str(d) for d in range(10)]  # ids 7..16
VOCAB = len(SPECIALS) + len(DIGITS)


def digit_id(d: int) -> int:
    return len(SPECIALS) + d


def make_tokenizer() -> Tokenizer:
    return word_tokenizer(DIGITS)


def bert_config(**overrides: object) -> BertConfig:
    base = dict(vocab_size=VOCAB, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return from_preset(BertConfig, "tiny", **{**base, **overrides})


def gpt_config(**overrides: object) -> GPTConfig:
    base = dict(vocab_size=VOCAB, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return from_preset(GPTConfig, "tiny", **{**base, **overrides})


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


# ---------------------------------------------------------------- classification data
def separable_set(n: int, seed: int) -> dict[str, Tensor]:
    """Class c's texts use only digits {3c, 3c+1, 3c+2} (c = 0, 1, 2): `[CLS] text [SEP]`,
    right-padded."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 3, (n,), generator=gen)
    lengths = torch.randint(2, 8, (n,), generator=gen)
    ids = torch.full((n, 10), PAD)
    mask = torch.zeros(n, 10, dtype=torch.long)
    for i in range(n):
        digits = 3 * labels[i] + torch.randint(0, 3, (int(lengths[i]),), generator=gen)
        row = [CLS] + [digit_id(int(d)) for d in digits] + [SEP]
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "labels": labels,
        "sample_id": torch.arange(n),
    }


class Fitted(NamedTuple):
    """The separable sets a classifier was taught, its test accuracy before, and the steps taken."""

    train: dict[str, Tensor]
    test: dict[str, Tensor]
    accuracy_before: float
    steps: int


def fit_separable_set(model: nn.Module, optim: OptimConfig, max_steps: int) -> Fitted:
    """Teach `model` the 96-row separable set in batches of 32 until it gets every training row
    (checked every 10 steps) or max_steps; the 60-row test set is held out."""
    train, test = separable_set(96, seed=0), separable_set(60, seed=1)
    optimizer, scheduler = build_optimizer(model, optim, max_steps)
    before = accuracy(*predict_labels(model, [test]))
    for step in range(1, max_steps + 1):
        model.train()
        rows = torch.arange(step * 32, step * 32 + 32) % 96
        logits = model(train["input_ids"][rows], train["attention_mask"][rows])
        loss = classification_loss(logits, train["labels"][rows])["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
        if step % 10 == 0 and accuracy(*predict_labels(model, [train])) == 1.0:
            break
    return Fitted(train, test, before, step)


# ---------------------------------------------------------------- translation models
def tiny_seq2seq(arch: str, *, seed: int = 0, **overrides: Any) -> nn.Module:
    """A tiny model of translation architecture `arch` over the digit vocabulary, seeded, in eval
    mode. `overrides` are config keys.

    seq2seq_warm has no preset of its own (it joins two pretrained halves): its overrides go to the
    GPT decoder, and `encoder` takes a dict of BERT keys. Every other architecture is built from
    its registry entry's "tiny" preset, so a new one needs no code here."""
    torch.manual_seed(seed)
    if arch == "seq2seq_warm":
        encoder = bert_config(**overrides.pop("encoder", {}))
        decoder = gpt_config(**{"add_cross_attention": True, **overrides})
        return WarmStartedSeq2Seq(Seq2SeqConfig(encoder=encoder, decoder=decoder)).eval()
    config_cls, model_cls = ARCHITECTURES[arch].config, ARCHITECTURES[arch].model
    config = from_preset(config_cls, "tiny", **{"arch": arch, "vocab_size": VOCAB, **overrides})
    return model_cls(config).eval()


def config_class(arch: str) -> type:
    """The config dataclass of architecture `arch`, from the registry."""
    return ARCHITECTURES[arch].config


def seq2seq_batch(seed: int = 1) -> tuple[Tensor, Tensor, Tensor]:
    """Three random sources of 9 tokens (row 1 padded from position 5) and targets of 6 tokens
    starting with [BOS]."""
    gen = torch.Generator().manual_seed(seed)
    src = torch.randint(7, VOCAB, (3, 9), generator=gen)
    mask = torch.ones_like(src)
    mask[1, 5:] = 0  # a padded source
    src[1, 5:] = PAD
    tgt = torch.randint(7, VOCAB, (3, 6), generator=gen)
    tgt[:, 0] = BOS
    return src, mask, tgt


class NoCache:
    """The decoding protocol without incremental state: every step re-runs the full forward on the
    whole prefix. The 'memory' is the source ids themselves and the 'cache' the prefix, so the
    search can still reorder rows."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model

    def encode(self, src_ids: Tensor, src_mask: Tensor) -> Tensor:
        return src_ids

    def decode_step(
        self, tgt_ids: Tensor, memory: Tensor, *, src_mask: Tensor, cache: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        prefix = tgt_ids if cache is None else torch.cat([cache, tgt_ids], dim=1)
        return self.model(memory, src_mask, prefix)[:, -1], prefix

    def reorder_cache(self, cache: Tensor, index: Tensor) -> Tensor:
        return cache.index_select(0, index)


# ---------------------------------------------------------------- learning a real (tiny) task
N_PAIRS = 50


def reversal_batch(n: int, seed: int) -> tuple[dict[str, Tensor], list[list[int]]]:
    """n digit strings of 3-6 digits as the pipeline builds rows: src `x [EOS]`, tgt_in `[BOS] y`,
    tgt_out `y [EOS]` (-100 at padding), with y = x reversed; also the expected outputs."""
    rng = random.Random(seed)
    xs = [[digit_id(rng.randrange(10)) for _ in range(rng.randint(3, 6))] for _ in range(n)]
    shape = (n, 7)
    b = {
        "src_ids": torch.full(shape, PAD),
        "src_mask": torch.zeros(shape, dtype=torch.long),
        "tgt_in": torch.full(shape, PAD),
        "tgt_out": torch.full(shape, -100),
    }
    for i, x in enumerate(xs):
        y = x[::-1]
        b["src_ids"][i, : len(x) + 1] = torch.tensor(x + [EOS])
        b["src_mask"][i, : len(x) + 1] = 1
        b["tgt_in"][i, : len(y) + 1] = torch.tensor([BOS] + y)
        b["tgt_out"][i, : len(y) + 1] = torch.tensor(y + [EOS])
    return b, [x[::-1] for x in xs]


def digit_text(ids: list[int]) -> str:
    """Digit ids as the text the tokenizer reads: [8, 9] -> "1 2"."""
    return " ".join(str(i - digit_id(0)) for i in ids)


def exact_match(model: Any, b: dict[str, Tensor], expected: list[list[int]]) -> float:
    hyps = greedy_decode(model, b["src_ids"], b["src_mask"], BOS, EOS, max_len=8)
    return sum(h == y for h, y in zip(hyps, expected, strict=True)) / len(expected)


@dataclass(frozen=True)
class Recipe:
    """How an architecture is taught the reversal set: AdamW, constant lr after a linear warmup.
    They get there in 50-300 steps; max_steps keeps a regression from hanging the suite."""

    lr: float
    label_smoothing: float
    max_steps: int = 400
    warmup_steps: int = 0


class Trained(NamedTuple):
    """A model taught the reversal set (in eval mode), the batch, the expected outputs and
    (step, exact match) every 25 steps."""

    model: nn.Module
    batch: dict[str, Tensor]
    expected: list[list[int]]
    history: list[tuple[int, float]]


def train_reversal(model: nn.Module, recipe: Recipe) -> Trained:
    """Teacher-force `model` on the 50 reversal pairs until greedy decoding gets them all (or
    max_steps)."""
    b, expected = reversal_batch(N_PAIRS, seed=0)
    optim = OptimConfig(
        lr=recipe.lr, weight_decay=0.0, warmup_steps=recipe.warmup_steps, schedule="constant"
    )
    optimizer, scheduler = build_optimizer(model, optim, recipe.max_steps)
    history = [(0, exact_match(model.eval(), b, expected))]
    for step in range(1, recipe.max_steps + 1):
        model.train()
        logits = model(b["src_ids"], b["src_mask"], b["tgt_in"])
        loss = translation_loss(logits, b["tgt_out"], recipe.label_smoothing)["loss"]
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        if step % 25 == 0:
            history.append((step, exact_match(model.eval(), b, expected)))
            if history[-1][1] == 1.0:
                break
    return Trained(model.eval(), b, expected, history)


_SCRATCH = Recipe(lr=3e-3, label_smoothing=0.1)
_LSTM = Recipe(lr=1e-2, label_smoothing=0.0)
# case -> (arch, config overrides, recipe); every translation architecture has at least one case.
# seq2seq_warm starts from the `pretrained` checkpoints, as it is used.
REVERSAL_CASES: dict[str, tuple[str, dict[str, Any], Recipe]] = {
    "seq2seq_warm": ("seq2seq_warm", {}, Recipe(3e-3, 0.1, max_steps=200, warmup_steps=20)),
    "transformer": ("transformer", dict(dropout=0.0), _SCRATCH),
    "lstm": ("lstm", dict(dropout=0.0), _LSTM),
    **{
        f"lstm_attention-{att}": ("lstm_attention", dict(dropout=0.0, attention=att), _LSTM)
        for att in ("bahdanau", "luong_dot", "luong_general")
    },
    "convs2s": ("convs2s", dict(dropout=0.0), _SCRATCH),
}


@pytest.fixture(scope="session")
def reversal_model(pretrained: Pretrained) -> Callable[[str], Trained]:
    """The model of a REVERSAL_CASES case trained on the reversal set; each is trained once per
    session, for whichever test asks first (the contract suite, an arch-specific test)."""
    trained: dict[str, Trained] = {}

    def get(case: str) -> Trained:
        if case not in trained:
            arch, overrides, recipe = REVERSAL_CASES[case]
            if arch == "seq2seq_warm":
                torch.manual_seed(0)
                model, _ = WarmStartedSeq2Seq.from_pretrained(
                    pretrained.bert_dir, pretrained.gpt_dir
                )
            else:
                model = tiny_seq2seq(arch, **overrides)
            trained[case] = train_reversal(model, recipe)
        return trained[case]

    return get
