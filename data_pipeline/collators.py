"""Collators: shard rows -> padded batches of tensors (the batch formats of docs/design.md).

Each collator names the shard `columns` it needs (the loader reads only those) and is called as
`collate(rows, generator)`; the generator, seeded by the loader from (seed, epoch, rank, batch index),
is the only source of randomness, so a resumed run draws the same MLM masks.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

IGNORE_INDEX = -100  # what torch.nn.functional.cross_entropy skips


def pad(seqs: list[list[int]], value: int) -> Tensor:
    """Right-pad to the longest sequence: (B, T) long."""
    out = torch.full((len(seqs), max(len(s) for s in seqs)), value, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = torch.as_tensor(s, dtype=torch.long)
    return out


def _real(seqs: list[list[int]]) -> Tensor:
    """1 at real tokens, 0 at padding: (B, T) long."""
    lengths = torch.tensor([len(s) for s in seqs])
    return (torch.arange(int(lengths.max()))[None, :] < lengths[:, None]).long()


def _sample_ids(rows: list[dict]) -> Tensor:
    return torch.tensor([r["sample_id"] for r in rows], dtype=torch.long)


class MlmNspCollator:
    """Dynamic BERT masking: 15% of real non-special tokens; of those 80% [MASK], 10% random, 10% kept."""

    columns = ("sample_id", "input_ids", "token_type_ids", "next_sentence_label")

    def __init__(
        self,
        pad_id: int,
        mask_id: int,
        vocab_size: int,
        special_ids: Iterable[int],
        mlm_probability: float = 0.15,
    ) -> None:
        if not 0.0 < mlm_probability < 1.0:
            raise ValueError(f"mlm_probability must be in (0, 1), got {mlm_probability}")
        self.pad_id, self.mask_id, self.mlm_probability = pad_id, mask_id, mlm_probability
        special = set(special_ids) | {pad_id, mask_id}
        self.special_ids = torch.tensor(sorted(special), dtype=torch.long)
        # Random replacements are ordinary tokens: a random [CLS] or [SEP] would fake a segment boundary.
        self.random_ids = torch.tensor(
            [i for i in range(vocab_size) if i not in special], dtype=torch.long
        )

    def __call__(self, rows: list[dict], generator: torch.Generator) -> dict[str, Tensor]:
        seqs = [r["input_ids"] for r in rows]
        input_ids, attention_mask = pad(seqs, self.pad_id), _real(seqs)
        candidates = attention_mask.bool() & ~torch.isin(input_ids, self.special_ids)
        masked = self._choose(candidates, generator)
        labels = torch.where(masked, input_ids, IGNORE_INDEX)
        to_mask = masked & (torch.rand(input_ids.shape, generator=generator) < 0.8)
        to_random = masked & ~to_mask & (torch.rand(input_ids.shape, generator=generator) < 0.5)
        random_tokens = self.random_ids[
            torch.randint(len(self.random_ids), input_ids.shape, generator=generator)
        ]
        input_ids = torch.where(
            to_mask, self.mask_id, torch.where(to_random, random_tokens, input_ids)
        )
        return {
            "input_ids": input_ids,
            "token_type_ids": pad([r["token_type_ids"] for r in rows], 0),
            "attention_mask": attention_mask,
            "mlm_labels": labels,
            "next_sentence_label": torch.tensor(
                [r["next_sentence_label"] for r in rows], dtype=torch.long
            ),
            "sample_id": _sample_ids(rows),
        }

    def _choose(self, candidates: Tensor, generator: torch.Generator) -> Tensor:
        """Bernoulli(p) over candidates; a row that drew none gets one, so no row is without an MLM target."""
        masked = candidates & (
            torch.rand(candidates.shape, generator=generator) < self.mlm_probability
        )
        scores = torch.rand(candidates.shape, generator=generator).masked_fill(~candidates, -1.0)
        empty = (masked.sum(dim=1) == 0) & candidates.any(dim=1)  # (B,)
        one = torch.zeros_like(masked).scatter_(
            1, scores.argmax(dim=1, keepdim=True), True
        )  # (B, T)
        return masked | (one & empty[:, None])


class ClmCollator:
    """Blocks of T + 1 tokens -> inputs (first T) and next-token labels (last T).

    With `bos_id` given (document attention), packed documents are kept apart: `position_ids` (B, T) restart at 0
    at every [BOS], `document_mask` (B, T, T) lets a token attend only to earlier tokens of its own document, and
    the label that would predict the next document's [BOS] from the previous one's [EOS] is ignored. The tokens
    before a block's first [BOS] (the tail of a document cut by the block) form a document of their own."""

    columns = ("sample_id", "input_ids")

    def __init__(self, pad_id: int, bos_id: int | None = None) -> None:
        self.pad_id, self.bos_id = pad_id, bos_id

    def __call__(self, rows: list[dict], generator: torch.Generator) -> dict[str, Tensor]:
        seqs = [r["input_ids"] for r in rows]
        ids, real = pad(seqs, self.pad_id), _real(seqs)
        labels = ids[:, 1:].masked_fill(real[:, 1:] == 0, IGNORE_INDEX)  # (B, T)
        batch = {"input_ids": ids[:, :-1], "labels": labels, "sample_id": _sample_ids(rows)}
        if self.bos_id is not None:
            batch.update(self._documents(batch["input_ids"]))
            batch["labels"] = labels.masked_fill(ids[:, 1:] == self.bos_id, IGNORE_INDEX)
        return batch

    def _documents(self, inputs: Tensor) -> dict[str, Tensor]:
        doc = (
            (inputs == self.bos_id).long().cumsum(dim=1)
        )  # (B, T): which document each token belongs to
        index = torch.arange(inputs.size(1)).expand_as(inputs)  # (B, T)
        start = (
            torch.where(inputs == self.bos_id, index, torch.zeros_like(index)).cummax(dim=1).values
        )  # (B, T)
        same = doc[:, :, None] == doc[:, None, :]  # (B, T, T)
        causal = torch.ones(inputs.size(1), inputs.size(1), dtype=torch.bool).tril()
        return {"position_ids": index - start, "document_mask": same & causal}


class TranslationCollator:
    """`src [EOS]` and `[BOS] y [EOS]` -> encoder input, decoder input `[BOS] y`, decoder target `y [EOS]`.

    With a target vocabulary of its own, `tgt_pad_id` pads the decoder input (GPT-2's pad is its end-of-text token,
    which is also its BOS and EOS): no mask here is read back from the ids, `src_mask` comes from the lengths and
    the target's padding is IGNORE_INDEX in `tgt_out`, so a pad id equal to a real token is harmless."""

    columns = ("sample_id", "src_ids", "tgt_ids")

    def __init__(self, pad_id: int, tgt_pad_id: int | None = None) -> None:
        self.pad_id = pad_id
        self.tgt_pad_id = pad_id if tgt_pad_id is None else tgt_pad_id

    def __call__(self, rows: list[dict], generator: torch.Generator) -> dict[str, Tensor]:
        src = [r["src_ids"] for r in rows]
        tgt_in, tgt_out = [r["tgt_ids"][:-1] for r in rows], [r["tgt_ids"][1:] for r in rows]
        return {
            "src_ids": pad(src, self.pad_id),
            "src_mask": _real(src),
            "tgt_in": pad(tgt_in, self.tgt_pad_id),
            "tgt_out": pad(tgt_out, IGNORE_INDEX),
            "sample_id": _sample_ids(rows),
        }


class ClassificationCollator:
    """`[CLS] text [SEP]` rows -> padded ids, attention mask and labels."""

    columns = ("sample_id", "input_ids", "label")

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, rows: list[dict], generator: torch.Generator) -> dict[str, Tensor]:
        seqs = [r["input_ids"] for r in rows]
        return {
            "input_ids": pad(seqs, self.pad_id),
            "attention_mask": _real(seqs),
            "labels": torch.tensor([r["label"] for r in rows], dtype=torch.long),
            "sample_id": _sample_ids(rows),
        }
