"""`ShardLoader`: each training rank's share of a split, in a seeded order, resumable mid-epoch.

Why not a Ray Data iterator: those cannot resume mid-epoch (ray-project/ray#37633) and exact resume is
a requirement (docs/design.md). This module makes no Ray or torch.distributed call, so it works the
same inside a Ray Train worker and in a plain process; rank and world size are passed in.

Per epoch every rank computes the same permutation of all rows (seeded by seed and epoch) and takes
the rows at positions rank, rank + world_size, ...; every rank serves the same number of batches, so
collective operations never wait on a rank that ran out. The state is (epoch, batches served).
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor

from data_pipeline.collators import (
    ClassificationCollator,
    ClmCollator,
    MlmNspCollator,
    TranslationCollator,
)
from data_pipeline.errors import DataError
from data_pipeline.shards import read_manifest, read_split

__all__ = ["COLLATORS", "ClassificationCollator", "ClmCollator", "Collator", "MlmNspCollator", "ShardLoader",
           "TranslationCollator", "make_loader", "read_manifest"]


class Collator(Protocol):
    columns: tuple[str, ...]

    def __call__(self, rows: list[dict], generator: torch.Generator) -> dict[str, Tensor]: ...


def seed_for(*parts: int) -> int:
    """A 63-bit seed from integers; unlike seed + epoch, nearby inputs give unrelated streams."""
    digest = hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") & (2**63 - 1)


class ShardLoader:
    """Iterate one epoch of batches per `for` loop; `len()` is the batch count per epoch on every rank.

    drop_last=True: each rank gets floor(rows / world_size) rows, whole batches only (training).
    drop_last=False: every row is served; ranks are topped up by repeating rows from the start of the
    permutation (as torch's DistributedSampler does) and the last batch may be short. Repeats carry the
    same sample_id, so an evaluation can count each sample once.
    """

    def __init__(self, task_dir: str | os.PathLike[str], split: str, batch_size: int, collate: Collator,
                 rank: int = 0, world_size: int = 1, seed: int = 0, shuffle: bool = True,
                 drop_last: bool = True) -> None:
        if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need batch_size >= 1 and 0 <= rank < world_size; got batch_size={batch_size}, "
                             f"rank={rank}, world_size={world_size}")
        self.task_dir, self.split, self.batch_size, self.collate = Path(task_dir), split, batch_size, collate
        self.rank, self.world_size, self.seed, self.shuffle, self.drop_last = rank, world_size, seed, shuffle, drop_last
        table = read_split(self.task_dir, split, columns=list(collate.columns))
        self._columns = {name: table.column(name).to_pylist() for name in collate.columns}
        self.num_rows = table.num_rows
        if drop_last:
            self.rows_per_rank = self.num_rows // world_size
            self._num_batches = self.rows_per_rank // batch_size
        else:
            self.rows_per_rank = math.ceil(self.num_rows / world_size)
            self._num_batches = math.ceil(self.rows_per_rank / batch_size)
        if self._num_batches == 0:
            raise DataError(f"{self.task_dir}/{split}: {self.num_rows} rows make no batch of {batch_size} "
                            f"on each of {world_size} ranks; lower the batch size or add data")
        self.epoch, self._batch = 0, 0

    def __len__(self) -> int:
        return self._num_batches

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        if self._batch >= len(self):  # the last epoch was served in full but the loop never asked for more
            self.epoch, self._batch = self.epoch + 1, 0
        indices = self.rank_indices(self.epoch)
        while self._batch < len(self):
            batch_index = self._batch
            rows = [self._row(i) for i in indices[batch_index * self.batch_size:(batch_index + 1) * self.batch_size]]
            generator = torch.Generator().manual_seed(seed_for(self.seed, self.epoch, self.rank, batch_index))
            batch = self.collate(rows, generator)
            self._batch += 1  # counted as served once handed out: a checkpoint taken now resumes after it
            yield batch
        self.epoch, self._batch = self.epoch + 1, 0

    def rank_indices(self, epoch: int) -> list[int]:
        """Row indices this rank serves in `epoch`, in order."""
        if self.shuffle:
            order = torch.randperm(self.num_rows, generator=torch.Generator().manual_seed(
                seed_for(self.seed, epoch))).tolist()
        else:
            order = list(range(self.num_rows))
        total = self.rows_per_rank * self.world_size
        order = (order * math.ceil(total / self.num_rows))[:total]  # trims (drop_last) or tops up by wrapping
        mine = order[self.rank::self.world_size]
        return mine[: len(self) * self.batch_size] if self.drop_last else mine

    def set_epoch(self, epoch: int) -> None:
        """Start `epoch` from its first batch (for loops that count epochs themselves)."""
        self.epoch, self._batch = epoch, 0

    def state_dict(self) -> dict[str, Any]:
        """Where the next batch comes from; identical on every rank, so any rank's copy resumes all of them."""
        return {"epoch": self.epoch, "batches_served": self._batch, "seed": self.seed,
                "world_size": self.world_size, "num_rows": self.num_rows, "batch_size": self.batch_size,
                "shuffle": self.shuffle, "drop_last": self.drop_last}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume exactly; the data and the layout (ranks, batch size, seed) must be the ones saved."""
        mine = self.state_dict()
        wrong = {k: (state.get(k), mine[k]) for k in mine if k not in ("epoch", "batches_served")
                 and state.get(k) != mine[k]}
        if wrong:
            raise ValueError(f"loader state does not match this loader (saved, now): {wrong}")
        if not 0 <= state["batches_served"] <= len(self):
            raise ValueError(f"batches_served {state['batches_served']} outside 0..{len(self)}")
        self.epoch, self._batch = int(state["epoch"]), int(state["batches_served"])

    def _row(self, index: int) -> dict:
        return {name: values[index] for name, values in self._columns.items()}


def _mlm_nsp(top: dict) -> Collator:
    special = top["special_tokens"]
    return MlmNspCollator(pad_id=special["[PAD]"], mask_id=special["[MASK]"], vocab_size=top["vocab_size"],
                          special_ids=special.values())


def _translation(top: dict) -> Collator:
    framing = top.get("translation_specials")  # present when targets have their own tokenizer
    if framing is None:
        return TranslationCollator(top["special_tokens"]["[PAD]"])
    return TranslationCollator(framing["source"]["pad"], framing["target"]["pad"])


COLLATORS: dict[str, Callable[[dict], Collator]] = {  # task -> collator, from the top-level manifest
    "mlm_nsp": _mlm_nsp,
    "clm": lambda top: ClmCollator(top["special_tokens"]["[PAD]"]),
    "translation": _translation,
    "classification": lambda top: ClassificationCollator(top["special_tokens"]["[PAD]"]),
}


def make_loader(data_dir: str | os.PathLike[str], task: str, split: str, batch_size: int, rank: int = 0,
                world_size: int = 1, seed: int = 0, shuffle: bool = True, drop_last: bool = True,
                document_attention: bool = False) -> ShardLoader:
    """A loader for `task`/`split` of a prepared data directory, with the task's collator. document_attention
    (clm only): packed documents do not attend to each other (ClmCollator)."""
    top = read_manifest(data_dir)
    if task not in top.get("tasks", {}):
        raise DataError(f"{Path(data_dir) / 'manifest.json'}: no task {task!r}; it has {sorted(top.get('tasks', {}))}")
    collate = COLLATORS[task](top)
    if document_attention:
        if task != "clm":
            raise DataError(f"document_attention applies to the clm task, not {task!r}")
        collate = ClmCollator(top["special_tokens"]["[PAD]"], bos_id=top["special_tokens"]["[BOS]"])
    return ShardLoader(Path(data_dir) / task, split, batch_size, collate, rank=rank,
                       world_size=world_size, seed=seed, shuffle=shuffle, drop_last=drop_last)
