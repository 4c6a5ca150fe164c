from __future__ import annotations

import random

import torch

from data_pipeline.collators import (
    IGNORE_INDEX,
    ClassificationCollator,
    ClmCollator,
    MlmNspCollator,
    TranslationCollator,
)

PAD, UNK, CLS, SEP, MASK, BOS, EOS = range(7)
VOCAB = 1000


def mlm_rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        a, b = rng.randint(1, 30), rng.randint(1, 30)
        seg_a, seg_b = ([rng.randrange(7, VOCAB) for _ in range(n)] for n in (a, b))
        ids = [CLS, *seg_a, SEP, *seg_b, SEP]
        rows.append(
            {
                "sample_id": i,
                "input_ids": ids,
                "token_type_ids": [0] * (a + 2) + [1] * (b + 1),
                "next_sentence_label": i % 2,
            }
        )
    return rows


def collator() -> MlmNspCollator:
    return MlmNspCollator(pad_id=PAD, mask_id=MASK, vocab_size=VOCAB, special_ids=range(7))


def test_mlm_masking_statistics_and_special_tokens() -> None:
    rows = mlm_rows(4000)
    batch = collator()(rows, torch.Generator().manual_seed(0))
    original = torch.full_like(batch["input_ids"], PAD)
    for i, r in enumerate(rows):
        original[i, : len(r["input_ids"])] = torch.tensor(r["input_ids"])
    special = original < 7
    masked = batch["mlm_labels"] != IGNORE_INDEX
    assert not (masked & special).any()  # [CLS], [SEP], [PAD] are never prediction targets
    assert torch.equal(batch["input_ids"][special], original[special])  # nor are they replaced
    assert torch.equal(batch["mlm_labels"][masked], original[masked])
    rate = masked.sum().item() / (~special).sum().item()
    assert abs(rate - 0.15) < 0.01
    out = batch["input_ids"][masked]
    as_mask = (out == MASK).float().mean().item()
    kept = (out == original[masked]).float().mean().item()
    randomised = 1 - as_mask - kept
    assert abs(as_mask - 0.8) < 0.02 and abs(kept - 0.1) < 0.015 and abs(randomised - 0.1) < 0.015
    assert (out[out != MASK] >= 7).all()  # random replacements are ordinary tokens
    assert (masked.sum(dim=1) >= 1).all()  # every row has at least one target


def test_mlm_batch_layout_and_seeded_masks() -> None:
    rows = mlm_rows(8)
    batch = collator()(rows, torch.Generator().manual_seed(5))
    longest = max(len(r["input_ids"]) for r in rows)
    assert {k: tuple(v.shape) for k, v in batch.items()} == {
        "input_ids": (8, longest),
        "token_type_ids": (8, longest),
        "attention_mask": (8, longest),
        "mlm_labels": (8, longest),
        "next_sentence_label": (8,),
        "sample_id": (8,),
    }
    assert all(v.dtype == torch.long for v in batch.values())
    assert batch["attention_mask"].sum(dim=1).tolist() == [len(r["input_ids"]) for r in rows]
    assert batch["next_sentence_label"].tolist() == [i % 2 for i in range(8)]
    again = collator()(rows, torch.Generator().manual_seed(5))
    other = collator()(rows, torch.Generator().manual_seed(6))
    assert all(torch.equal(batch[k], again[k]) for k in batch)
    assert not torch.equal(batch["mlm_labels"], other["mlm_labels"])


def test_clm_labels_are_the_next_token() -> None:
    rows = [
        {"sample_id": 3, "input_ids": [BOS, 10, 11, 12, EOS]},
        {"sample_id": 4, "input_ids": [13, 14, 15]},
    ]
    batch = ClmCollator(PAD)(rows, torch.Generator())
    assert batch["input_ids"].tolist() == [[BOS, 10, 11, 12], [13, 14, 15, PAD]]
    assert batch["labels"].tolist() == [[10, 11, 12, EOS], [14, 15, IGNORE_INDEX, IGNORE_INDEX]]
    assert batch["sample_id"].tolist() == [3, 4]


def test_translation_shifts_the_target() -> None:
    rows = [
        {"sample_id": 0, "src_ids": [10, 11, EOS], "tgt_ids": [BOS, 20, 21, EOS]},
        {"sample_id": 1, "src_ids": [12, EOS], "tgt_ids": [BOS, 22, EOS]},
    ]
    batch = TranslationCollator(PAD)(rows, torch.Generator())
    assert batch["src_ids"].tolist() == [[10, 11, EOS], [12, EOS, PAD]]
    assert batch["src_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch["tgt_in"].tolist() == [[BOS, 20, 21], [BOS, 22, PAD]]
    assert batch["tgt_out"].tolist() == [[20, 21, EOS], [22, EOS, IGNORE_INDEX]]


def test_classification_batch() -> None:
    rows = [
        {"sample_id": 7, "input_ids": [CLS, 10, SEP], "label": 2},
        {"sample_id": 8, "input_ids": [CLS, SEP], "label": 0},
    ]
    batch = ClassificationCollator(PAD)(rows, torch.Generator())
    assert batch["input_ids"].tolist() == [[CLS, 10, SEP], [CLS, SEP, PAD]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch["labels"].tolist() == [2, 0] and batch["sample_id"].tolist() == [7, 8]
