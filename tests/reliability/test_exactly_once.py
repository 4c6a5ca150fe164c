"""Guarantee 2 (docs/reliability.md): exactly-once data. Two ranks read one epoch, are "killed" three times at
different steps and resumed each time from the state a checkpoint records (as JSON, as trainer_state keeps it);
with sample ids recorded, no sample is repeated and none is missing (drop_last leaves out only the tail that
would give the ranks unequal batch counts, the same rows an uninterrupted epoch leaves out)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "data_pipeline"))
from data_pipeline_testlib import make_data_dir  # noqa: E402

from data_pipeline.loader import ShardLoader, make_loader  # noqa: E402

WORLD, BATCH = 2, 4


def fresh(data_dir: Path) -> list[ShardLoader]:
    return [
        make_loader(
            data_dir, "classification", "train", batch_size=BATCH, rank=r, world_size=WORLD, seed=11
        )
        for r in range(WORLD)
    ]


@pytest.mark.parametrize("kills", [(1, 5, 9), (3, 4, 11), (0, 6, 7)])
def test_three_kill_and_resume_cycles_see_every_sample_once(
    tmp_path: Path, kills: tuple[int, ...]
) -> None:
    data_dir = make_data_dir(tmp_path / "data", train_rows=101)
    uninterrupted = {i for lo in fresh(data_dir) for b in lo for i in b["sample_id"].tolist()}
    per_rank_batches = len(fresh(data_dir)[0])
    seen: list[int] = []
    state_file = tmp_path / "trainer_state.json"
    loaders, done = fresh(data_dir), 0
    for stop in (*kills, per_rank_batches):
        iters = [iter(lo) for lo in loaders]
        for _ in range(stop - done):  # every rank steps in lockstep, as in DDP
            for it in iters:
                seen += next(it)["sample_id"].tolist()
        done = stop
        state_file.write_text(json.dumps([lo.state_dict() for lo in loaders]))  # the checkpoint
        loaders = fresh(
            data_dir
        )  # the process died: new loaders, restored from the checkpoint only
        for lo, state in zip(loaders, json.loads(state_file.read_text()), strict=True):
            lo.load_state_dict(state)
    assert len(seen) == len(set(seen)), "a sample was served twice"
    assert set(seen) == uninterrupted, "a sample was lost"
    assert len(seen) == WORLD * BATCH * per_rank_batches
