"""The warm-started model learns a real (tiny) task: reversing digit strings, 50 pairs, plain torch loop.

Trained once per module; then greedy, beam search and the text-level translate/evaluate path are checked on it.
"""

from __future__ import annotations

import random

import pytest
import torch
from finetune_testlib import BOS, EOS, PAD, Pretrained, digit_id, make_tokenizer

from finetune.decode import beam_search, greedy_decode
from finetune.models.seq2seq import WarmStartedSeq2Seq
from finetune.module import translation_loss
from finetune.translate import evaluate_translation, translate_texts
from pretrain.optim import OptimConfig, build_optimizer

N_PAIRS = 50
MAX_STEPS = 200  # it gets there in ~100 on this data; the bound keeps the test under ~10 s of compute


def digit_strings(n: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(10) for _ in range(rng.randint(3, 6))] for _ in range(n)]


def make_batch(strings: list[list[int]]) -> dict[str, torch.Tensor]:
    """Rows as the data pipeline builds them: src `x [EOS]`, tgt_in `[BOS] y`, tgt_out `y [EOS]` (-100 at pad)."""
    shape = (len(strings), max(len(s) for s in strings) + 1)
    b = {"src_ids": torch.full(shape, PAD), "src_mask": torch.zeros(shape, dtype=torch.long),
         "tgt_in": torch.full(shape, PAD), "tgt_out": torch.full(shape, -100)}
    for i, digits in enumerate(strings):
        x = [digit_id(d) for d in digits]
        y = x[::-1]
        b["src_ids"][i, : len(x) + 1] = torch.tensor(x + [EOS])
        b["src_mask"][i, : len(x) + 1] = 1
        b["tgt_in"][i, : len(y) + 1] = torch.tensor([BOS] + y)
        b["tgt_out"][i, : len(y) + 1] = torch.tensor(y + [EOS])
    return b


def exact_match(model: WarmStartedSeq2Seq, strings: list[list[int]], b: dict[str, torch.Tensor]) -> float:
    hyps = greedy_decode(model.eval(), b["src_ids"], b["src_mask"], BOS, EOS, max_len=8)
    return sum(h == [digit_id(d) for d in s[::-1]] for h, s in zip(hyps, strings, strict=True)) / len(strings)


@pytest.fixture(scope="module")
def trained(pretrained: Pretrained) -> tuple[WarmStartedSeq2Seq, list[list[int]], list[tuple[int, float]]]:
    torch.manual_seed(0)
    model, _ = WarmStartedSeq2Seq.from_pretrained(pretrained.bert_dir, pretrained.gpt_dir)
    strings = digit_strings(N_PAIRS, seed=0)
    b = make_batch(strings)
    cfg = OptimConfig(lr=3e-3, warmup_steps=20, schedule="constant", weight_decay=0.0)
    optimizer, scheduler = build_optimizer(model, cfg, MAX_STEPS)
    history: list[tuple[int, float]] = [(0, exact_match(model, strings, b))]
    for step in range(1, MAX_STEPS + 1):
        model.train()
        loss = translation_loss(model(b["src_ids"], b["src_mask"], b["tgt_in"]), b["tgt_out"], 0.1)["loss"]
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        if step % 25 == 0:
            history.append((step, exact_match(model, strings, b)))
            if history[-1][1] == 1.0:
                break
    return model.eval(), strings, history


def test_overfits_to_perfect_greedy_accuracy(trained: tuple) -> None:
    _, _, history = trained
    assert history[0][1] < 0.1  # it really had to learn
    assert history[-1][1] >= 0.98, history


def test_beam_search_agrees_on_the_trained_model(trained: tuple) -> None:
    model, strings, _ = trained
    b = make_batch(strings)
    hyps = beam_search(model, b["src_ids"], b["src_mask"], BOS, EOS, max_len=8, beam_size=4, length_penalty="gnmt",
                       alpha=0.6, n_best=2)
    correct = sum(h[0].tokens == [digit_id(d) for d in s[::-1]] for h, s in zip(hyps, strings, strict=True))
    assert correct >= 0.98 * len(strings)
    assert all(h[0].score >= h[1].score for h in hyps)


def test_translate_texts_round_trips_through_the_tokenizer(trained: tuple) -> None:
    model, strings, _ = trained
    texts = [" ".join(map(str, s)) for s in strings]
    refs = [" ".join(map(str, s[::-1])) for s in strings]
    tokenizer = make_tokenizer()
    hyps = translate_texts(model, tokenizer, texts, beam_size=3, length_penalty="gnmt", alpha=1.0, max_len=8,
                           batch_size=7)
    assert sum(h == r for h, r in zip(hyps, refs, strict=True)) >= 0.98 * len(refs)
    scores, _ = evaluate_translation(model, tokenizer, texts, refs, beam_size=2, max_len=8, batch_size=16)
    assert scores["bleu"] > 90.0
    assert scores["copy_source_bleu"] < 50.0  # copying a reversed string gets unigrams, little else
    assert not model.training  # translate_texts restores the mode it found
