from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch
from data_pipeline_testlib import make_data_dir

from data_pipeline.collators import ClassificationCollator, MlmNspCollator
from data_pipeline.errors import DataError
from data_pipeline.loader import ShardLoader, make_loader


def ids_of(loader: ShardLoader, limit: int | None = None) -> list[list[int]]:
    out = []
    for batch in loader:
        out.append(batch["sample_id"].tolist())
        if limit is not None and len(out) == limit:
            break
    return out


def ranks(data_dir: Path, world: int = 2, **kw: object) -> list[ShardLoader]:
    return [
        make_loader(
            data_dir,
            "classification",
            "train",
            batch_size=4,
            rank=r,
            world_size=world,
            seed=7,
            **kw,
        )
        for r in range(world)
    ]


def test_ranks_get_equal_batch_counts_and_disjoint_rows(data_dir: Path) -> None:
    # 53 rows, 2 ranks, batches of 4: 26 rows per rank -> 6 batches each; 5 rows are left for another epoch.
    loaders = ranks(data_dir)
    assert [len(lo) for lo in loaders] == [6, 6]
    served = [ids_of(lo) for lo in loaders]
    assert [len(s) for s in served] == [6, 6] and all(len(b) == 4 for s in served for b in s)
    flat = [i for s in served for b in s for i in b]
    assert len(flat) == len(set(flat)) == 48 and set(flat) <= set(range(53))


def test_drop_last_false_serves_every_row_with_equal_counts(data_dir: Path) -> None:
    loaders = ranks(
        data_dir, world=3, drop_last=False
    )  # 53 rows -> 18 per rank (1 repeated), 5 batches each
    assert [len(lo) for lo in loaders] == [5, 5, 5]
    flat = [i for lo in loaders for b in ids_of(lo) for i in b]
    counts = Counter(flat)
    assert set(counts) == set(range(53)) and len(flat) == 54 and sorted(counts.values())[-1] == 2


def test_epochs_reshuffle_and_cover_all_rows(data_dir: Path) -> None:
    loader = make_loader(data_dir, "classification", "train", batch_size=53, seed=1)
    first, second = ids_of(loader), ids_of(loader)
    assert loader.epoch == 2
    assert sorted(first[0]) == sorted(second[0]) == list(range(53)) and first != second
    again = make_loader(data_dir, "classification", "train", batch_size=53, seed=1)
    assert ids_of(again) == first  # seeded
    ordered = make_loader(data_dir, "classification", "train", batch_size=53, shuffle=False)
    assert ids_of(ordered) == [list(range(53))]


def test_mid_epoch_resume_is_exact_on_two_ranks(data_dir: Path) -> None:
    full = [ids_of(lo) for lo in ranks(data_dir)]  # two epochs' worth, uninterrupted
    full = [f + ids_of(lo) for f, lo in zip(full, ranks_after_epoch(data_dir), strict=True)]
    loaders = ranks(data_dir)
    head = [ids_of(lo, limit=4) for lo in loaders]  # stop after 4 of 6 batches
    states = [lo.state_dict() for lo in loaders]
    assert states[0] == states[1] and states[0]["batches_served"] == 4 and states[0]["epoch"] == 0
    resumed = ranks(data_dir)
    for lo, state in zip(resumed, json.loads(json.dumps(states)), strict=True):
        lo.load_state_dict(state)
    tail = [ids_of(lo) + ids_of(lo) for lo in resumed]  # rest of epoch 0, then all of epoch 1
    assert [h + t for h, t in zip(head, tail, strict=True)] == full
    epoch0 = [i for r in range(2) for b in (head[r] + tail[r][:2]) for i in b]
    assert len(epoch0) == len(set(epoch0)) == 48  # nothing repeated, nothing missing


def ranks_after_epoch(data_dir: Path) -> list[ShardLoader]:
    loaders = ranks(data_dir)
    for lo in loaders:
        lo.set_epoch(1)
    return loaders


def test_resumed_masks_are_identical(tmp_path: Path) -> None:
    """MLM masks come from a generator seeded by (seed, epoch, rank, batch): resuming redraws the same ones."""
    root = make_data_dir(tmp_path, train_rows=40)
    coll = MlmNspCollator(pad_id=0, mask_id=4, vocab_size=50, special_ids=range(7))

    class AsMlm:  # the classification rows carry everything MLM needs but the segment columns
        columns = ClassificationCollator.columns

        def __call__(self, rows: list[dict], generator: torch.Generator) -> dict[str, torch.Tensor]:
            rows = [
                {**r, "token_type_ids": [0] * len(r["input_ids"]), "next_sentence_label": 0}
                for r in rows
            ]
            return coll(rows, generator)

    def loader() -> ShardLoader:
        return ShardLoader(
            root / "classification", "train", 5, AsMlm(), rank=1, world_size=2, seed=3
        )

    straight = list(loader())
    partial = loader()
    next(iter(partial))
    next(iter(partial))  # a fresh `iter` continues where the last one stopped
    resumed = loader()
    resumed.load_state_dict(partial.state_dict())
    rest = list(resumed)
    assert len(rest) == len(straight) - 2
    for a, b in zip(straight[2:], rest, strict=True):
        assert torch.equal(a["mlm_labels"], b["mlm_labels"]) and torch.equal(
            a["input_ids"], b["input_ids"]
        )


def test_a_full_epoch_then_islice_style_consumer_moves_to_the_next_epoch(data_dir: Path) -> None:
    loader = make_loader(data_dir, "classification", "train", batch_size=10)
    it = iter(loader)
    first_epoch = [
        next(it)["sample_id"].tolist() for _ in range(len(loader))
    ]  # never asks for one more
    assert loader.state_dict()["batches_served"] == len(loader)
    second_epoch = ids_of(loader)
    assert loader.epoch == 2 and len(second_epoch) == len(loader) and second_epoch != first_epoch


def test_state_from_another_batch_size_or_seed_is_refused(data_dir: Path) -> None:
    """Another world size is resumed (test_loader_elastic.py); another batch size or seed is not."""
    state = ranks(data_dir)[0].state_dict()
    other = make_loader(data_dir, "classification", "train", batch_size=5, world_size=2, seed=7)
    with pytest.raises(ValueError, match="batch_size"):
        other.load_state_dict(state)
    other = make_loader(data_dir, "classification", "train", batch_size=4, world_size=2, seed=8)
    with pytest.raises(ValueError, match="seed"):
        other.load_state_dict(state)


def test_columns_read_and_batch_keys(data_dir: Path) -> None:
    loader = make_loader(
        data_dir, "classification", "validation", batch_size=2, shuffle=False, drop_last=False
    )
    assert sorted(loader.columns) == [
        "input_ids",
        "label",
        "sample_id",
    ]  # the text column is never read
    batches = list(loader)
    assert [b["sample_id"].tolist() for b in batches] == [[53, 54], [55, 56], [57]]
    assert set(batches[0]) == {"input_ids", "attention_mask", "labels", "sample_id"}


def test_bad_arguments(data_dir: Path) -> None:
    with pytest.raises(DataError, match="no task 'clm'"):
        make_loader(data_dir, "clm", "train", 4)
    with pytest.raises(DataError, match="5 rows make no batch of 8"):
        make_loader(data_dir, "classification", "validation", 8)
    with pytest.raises(ValueError, match="rank"):
        make_loader(data_dir, "classification", "train", 4, rank=2, world_size=2)
