"""Elastic resume: a loader state saved by N ranks resumes on M ranks; across the changes every
sample of the epoch is served exactly once, except the drop_last remainder of the last layout:
R mod (M * batch_size) rows, R being the rows the last layout of the epoch began with."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from data_pipeline_testlib import make_data_dir

from data_pipeline.collators import ClassificationCollator
from data_pipeline.loader import ShardLoader
from data_pipeline.tokenizer import FIXED_SPECIAL_IDS

COLLATE = ClassificationCollator(FIXED_SPECIAL_IDS["[PAD]"])
ROWS, BATCH = 103, 4


def fresh(data_dir: Path, world: int, drop_last: bool = True) -> list[ShardLoader]:
    return [
        ShardLoader(
            data_dir / "classification",
            "train",
            BATCH,
            COLLATE,
            rank=r,
            world_size=world,
            seed=11,
            drop_last=drop_last,
            block_rows=5,
            window_blocks=2,
        )
        for r in range(world)
    ]


def restart(
    data_dir: Path, states: list[dict], world: int, drop_last: bool = True
) -> list[ShardLoader]:
    """A new process group of `world` ranks; each rank loads one saved state (any rank's copy)."""
    loaders = fresh(data_dir, world, drop_last)
    saved = json.loads(json.dumps(states))  # as trainer_state keeps it
    for rank, lo in enumerate(loaders):
        lo.load_state_dict(saved[rank % len(saved)])
    return loaders


def lockstep(loaders: list[ShardLoader], steps: int | None) -> list[int]:
    """Every rank serves `steps` batches (None: to the end of the epoch), as under DDP."""
    iters = [iter(lo) for lo in loaders]
    steps = len(loaders[0]) - loaders[0].state_dict()["batches_served"] if steps is None else steps
    seen: list[int] = []
    for _ in range(steps):
        for it in iters:
            seen += next(it)["sample_id"].tolist()
    return seen


@pytest.fixture
def data(tmp_path: Path) -> Path:
    return make_data_dir(tmp_path / "data", train_rows=ROWS)


# world sizes, and the batches served before each change
CHANGES = [
    ((2, 1, 2), (3, 5)),
    ((2, 1, 2), (0, 9)),
    ((2, 1, 2), (6, 1)),
    ((3, 2), (4,)),
    ((1, 4), (7,)),
    ((4, 3, 1), (2, 2)),
]


@pytest.mark.parametrize(("worlds", "stops"), CHANGES)
def test_changing_world_sizes_within_an_epoch_serves_each_sample_once(
    data: Path, worlds: tuple[int, ...], stops: tuple[int, ...]
) -> None:
    loaders, seen = fresh(data, worlds[0]), []
    for world, steps in zip(worlds[1:], stops, strict=True):
        seen += lockstep(loaders, steps)
        loaders = restart(data, [lo.state_dict() for lo in loaders], world)
    last = loaders[0].state_dict()
    seen += lockstep(loaders, None)
    assert len(seen) == len(set(seen)), "a sample was served twice"
    rows_in_last_layout = sum(b - a for a, b in last["layout"]["remaining"])
    assert ROWS - len(seen) == rows_in_last_layout % (worlds[-1] * BATCH), "a sample was lost"
    assert {lo.state_dict()["batches_served"] for lo in loaders} == {len(loaders[0])}  # epoch over


def test_after_the_changed_epoch_the_new_layout_runs_as_if_started_with_it(data: Path) -> None:
    loaders = fresh(data, 2)
    lockstep(loaders, 3)
    loaders = restart(data, [lo.state_dict() for lo in loaders], 3)
    lockstep(loaders, None)
    lengths = {len(lo) for lo in loaders}
    epoch1 = [[b["sample_id"].tolist() for b in lo] for lo in loaders]
    started_with_three = fresh(data, 3)
    for lo in started_with_three:
        lo.set_epoch(1)
    assert epoch1 == [[b["sample_id"].tolist() for b in lo] for lo in started_with_three]
    assert lengths != {len(lo) for lo in loaders} == {ROWS // (3 * BATCH)}


def test_evaluation_on_another_world_size_serves_every_row(data: Path) -> None:
    loaders, seen = fresh(data, 3, drop_last=False), []
    seen += lockstep(loaders, 2)
    loaders = restart(data, [lo.state_dict() for lo in loaders], 2, drop_last=False)
    seen += lockstep(loaders, None)
    assert set(seen) == set(range(ROWS))
    # repeats only top ranks up: fewer than one row a rank, per layout
    assert len(seen) - ROWS < 2 + 3


def test_a_state_saved_at_the_end_of_an_epoch_starts_the_next_on_the_new_layout(data: Path) -> None:
    loaders = fresh(data, 2)
    lockstep(loaders, None)
    resumed = restart(data, [lo.state_dict() for lo in loaders], 1)
    assert resumed[0].state_dict()["epoch"] == 1 and len(resumed[0]) == ROWS // BATCH
    assert lockstep(resumed, None) == lockstep(with_epoch(fresh(data, 1), 1), None)


def with_epoch(loaders: list[ShardLoader], epoch: int) -> list[ShardLoader]:
    for lo in loaders:
        lo.set_epoch(epoch)
    return loaders
