"""Length-grouped batches (`group_by_length`): less padding, and the loader's guarantees kept: one
order per (seed, epoch), every row once per epoch on any number of ranks, exact resume at every batch,
also on another world size, no more rows held; off = today's batches."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from data_pipeline.collators import IGNORE_INDEX, ClassificationCollator, ClmCollator
from data_pipeline.examples import BUILDERS
from data_pipeline.loader import ShardLoader, make_loader
from data_pipeline.shards import write_json, write_task
from data_pipeline.tokenizer import FIXED_SPECIAL_IDS

ROWS, BATCH, GROUP = 301, 8, 5  # chunks of 40 rows
# Blocks of 16 rows in shards of 50 (16+16+16+2), 4 blocks a window: windows of ~50 rows (a 1-row shard
# shifts the later ones) whose edges are not batch edges: chunks are cut short by windows and batches
# straddle windows.
SMALL = {"block_rows": 16, "window_blocks": 4}
MAX_LEN = 40


def translation_rows(n: int, seed: int = 0) -> list[dict]:
    """Pairs whose source length is uniform on 1..MAX_LEN and whose target length follows it (+-2), as
    in translation; src ends in [EOS] (3), tgt is [BOS] ... [EOS]."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        src_len = rng.randint(1, MAX_LEN)
        tgt_len = max(1, src_len + rng.randint(-2, 2))
        rows.append(
            {
                "sample_id": i,
                "src_ids": [7 + i % 40] * src_len + [3],
                "tgt_ids": [2] + [7 + i % 40] * tgt_len + [3],
                "src_text": f"s{i}",
                "tgt_text": f"t{i}",
            }
        )
    return rows


def make_translation_dir(root: Path, rows: int, shard_rows: int = 50) -> Path:
    builder = BUILDERS["translation"]
    splits = {"train": translation_rows(rows), "validation": translation_rows(5, seed=1)}
    write_task(
        root / "translation",
        "translation",
        builder.schema,
        splits,
        shard_rows,
        builder.token_columns,
    )
    write_json(
        root / "manifest.json",
        {"tasks": {"translation": {}}, "special_tokens": FIXED_SPECIAL_IDS, "vocab_size": 50},
    )
    return root


@pytest.fixture
def data(tmp_path: Path) -> Path:
    return make_translation_dir(tmp_path / "data", ROWS)


def loaders(
    data: Path, world: int, group: int = GROUP, batch: int = BATCH, **kw: object
) -> list[ShardLoader]:
    collate = make_loader(data, "translation", "train", batch).collate
    options = {"seed": 3, **SMALL, **kw}
    return [
        ShardLoader(
            data / "translation",
            "train",
            batch,
            collate,
            rank=r,
            world_size=world,
            group_by_length=group,
            **options,  # type: ignore[arg-type]
        )
        for r in range(world)
    ]


def lockstep(group: list[ShardLoader], steps: int | None = None) -> list[list[int]]:
    """Every rank serves `steps` batches (None: to the end of the epoch), as under DDP; batches in
    the order the ranks serve them."""
    iters = [iter(lo) for lo in group]
    left = len(group[0]) - group[0].state_dict()["batches_served"]
    out: list[list[int]] = []
    for _ in range(left if steps is None else steps):
        out += [next(it)["sample_id"].tolist() for it in iters]
    return out


def restart(data: Path, states: list[dict], world: int) -> list[ShardLoader]:
    group = loaders(data, world)
    saved = json.loads(json.dumps(states))  # as trainer_state keeps it
    for rank, lo in enumerate(group):
        lo.load_state_dict(saved[rank % len(saved)])
    return group


def real_fraction(loader: ShardLoader) -> float:
    real = padded = 0
    for batch in loader:
        real += int(batch["src_mask"].sum()) + int((batch["tgt_out"] != IGNORE_INDEX).sum())
        padded += batch["src_ids"].numel() + batch["tgt_out"].numel()
    return real / padded


def test_grouping_cuts_padding(tmp_path: Path) -> None:
    data = make_translation_dir(tmp_path / "data", 2048, shard_rows=512)
    kw = {"block_rows": 256, "window_blocks": 2}
    # Random batches of 16 pad to about the max of 16 uniform lengths on 1..40, E = 40 * 16/17 ~ 38, while
    # a row holds 20.5 on average: ~55% real (+ framing tokens, which every row has).
    random_batches = real_fraction(loaders(data, 1, group=0, batch=16, **kw)[0])
    # Sorted in chunks of 10 batches, a batch spans ~1/10 of the range (4 tokens) plus the +-2 of the
    # target: the longest row of a batch is ~5 tokens over its mean, ~80% real at worst.
    grouped = real_fraction(loaders(data, 1, group=10, batch=16, **kw)[0])
    assert random_batches < 0.62
    assert grouped > 0.80


def lengths_of(loader: ShardLoader) -> list[list[int]]:
    """src + tgt tokens of each row of each batch."""
    return [
        (batch["src_mask"].sum(1) + (batch["tgt_out"] != IGNORE_INDEX).sum(1)).tolist()
        for batch in loader
    ]


def test_batches_within_a_chunk_are_not_served_in_ascending_length(data: Path) -> None:
    batches = lengths_of(loaders(data, 1)[0])
    first_chunk = [max(b) for b in batches[:GROUP]]  # positions 0..40: one chunk inside window 0
    assert first_chunk != sorted(first_chunk)
    # each batch is a run of the chunk's ranking: batches overlap in length at their edges only
    spans = sorted((min(b), max(b)) for b in batches[:GROUP])
    assert all(hi <= lo for (_, hi), (lo, _) in zip(spans, spans[1:], strict=False))


@pytest.mark.parametrize("world", [1, 2])
def test_every_row_once_per_epoch(data: Path, world: int) -> None:
    for epoch in (0, 1):
        group = loaders(data, world)
        for lo in group:
            lo.set_epoch(epoch)
        assert len({len(lo) for lo in group}) == 1
        batches = lockstep(group)
        ids = [i for b in batches for i in b]
        assert all(len(b) == BATCH for b in batches)
        assert len(ids) == len(set(ids)) == ROWS - ROWS % (world * BATCH)
        assert len(batches) == world * (ROWS // (world * BATCH))


def test_the_order_is_a_function_of_seed_and_epoch(data: Path) -> None:
    first = lockstep(loaders(data, 1))
    assert lockstep(loaders(data, 1)) == first
    # the same global sequence on 2 ranks: a global batch of 16 is two of the 1-rank batches of 8
    two_ranks = lockstep(loaders(data, 2))
    assert two_ranks == first[: len(two_ranks)]
    later = loaders(data, 1)
    later[0].set_epoch(1)
    assert lockstep(later) != first


@pytest.mark.parametrize("world", [1, 2])
def test_resume_at_every_batch_gives_the_uninterrupted_batches(data: Path, world: int) -> None:
    whole = lockstep(loaders(data, world))
    for k in range(len(whole) // world + 1):
        group = loaders(data, world)
        head = lockstep(group, k)
        rest = lockstep(restart(data, [lo.state_dict() for lo in group], world))
        assert head + rest == whole, f"resumed after {k} batches"


@pytest.mark.parametrize("steps", [0, 1, 4, 9, 17])
def test_two_ranks_resumed_as_one_serve_every_row_once(data: Path, steps: int) -> None:
    group = loaders(data, 2)
    seen = [i for b in lockstep(group, steps) for i in b]
    resumed = restart(data, [lo.state_dict() for lo in group], 1)
    last = resumed[0].state_dict()
    seen += [i for b in lockstep(resumed) for i in b]
    assert len(seen) == len(set(seen)), "a row was served twice"
    rows_in_last_layout = sum(b - a for a, b in last["layout"]["remaining"])
    assert ROWS - len(seen) == rows_in_last_layout % BATCH, "a row was lost"


def test_no_more_rows_held_than_without_grouping(data: Path) -> None:
    plain, grouped = loaders(data, 1, group=0)[0], loaders(data, 1)[0]
    lockstep([plain])
    lockstep([grouped])
    assert grouped.stats == plain.stats


def test_off_is_the_default_and_serves_todays_batches(data_dir: Path, data: Path) -> None:
    default = make_loader(data, "translation", "train", BATCH, seed=3)
    off = make_loader(data, "translation", "train", BATCH, seed=3, group_by_length=0)
    assert default.group_by_length == 0
    for a, b in zip(default, off, strict=True):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # a state saved before the option existed (no key) resumes an ungrouped loader
    collate = ClassificationCollator(FIXED_SPECIAL_IDS["[PAD]"])
    saved = ShardLoader(data_dir / "classification", "train", 4, collate, seed=1)
    next(iter(saved))
    state = {k: v for k, v in saved.state_dict().items() if k != "group_by_length"}
    fresh = ShardLoader(data_dir / "classification", "train", 4, collate, seed=1)
    fresh.load_state_dict(state)
    with pytest.raises(ValueError, match="group_by_length"):
        ShardLoader(
            data_dir / "classification", "train", 4, collate, seed=1, group_by_length=2
        ).load_state_dict(state)


def test_fixed_length_rows_give_the_same_batches_in_another_order(tmp_path: Path) -> None:
    # clm-like rows, all 9 tokens; windows of 16 rows, chunks of 2 batches of 4, every edge aligned
    builder = BUILDERS["clm"]
    rows = [{"sample_id": i, "input_ids": [2] + [7 + i % 40] * 8} for i in range(64)]
    write_task(tmp_path / "clm", "clm", builder.schema, {"train": rows}, 32, builder.token_columns)
    collate = ClmCollator(FIXED_SPECIAL_IDS["[PAD]"])

    def batches(group: int) -> list[list[int]]:
        lo = ShardLoader(
            tmp_path / "clm",
            "train",
            4,
            collate,
            block_rows=8,
            window_blocks=2,
            group_by_length=group,
        )
        return lockstep([lo])

    plain, grouped = batches(0), batches(2)
    assert grouped != plain
    assert sorted(map(sorted, grouped)) == sorted(map(sorted, plain))


def test_negative_group_by_length_is_a_config_error(data: Path) -> None:
    from cluster.config import load_config
    from cluster.jobs import FinetuneJob
    from data_pipeline.configlib import ConfigError

    assert (
        load_config(FinetuneJob, None, ["trainer.group_by_length=50"]).trainer.group_by_length == 50
    )
    with pytest.raises(ConfigError, match=r"^trainer\.group_by_length: must be >= 0"):
        load_config(FinetuneJob, None, ["trainer.group_by_length=-1"])
    with pytest.raises(ValueError, match="group_by_length"):
        make_loader(data, "translation", "train", 4, group_by_length=-1)


def test_the_training_loader_alone_is_grouped(data: Path) -> None:
    from cluster.jobs import FinetuneJob, TrainerConfig
    from cluster.tasks import _loaders

    trainer = TrainerConfig(batch_size=4, group_by_length=7)
    job = FinetuneJob(data_dir=str(data), task="translation", trainer=trainer)
    train, val = _loaders(job, 0, 1)
    assert (train.group_by_length, val.group_by_length) == (7, 0)
