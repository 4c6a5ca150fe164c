"""The streaming loader: one global order per (seed, epoch) whatever the world size, equal batch
counts, exact resume at every batch, sha256 checked once per shard, and bounded memory."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from data_pipeline_testlib import make_data_dir

from data_pipeline.collators import ClassificationCollator
from data_pipeline.errors import DataError
from data_pipeline.examples import BUILDERS
from data_pipeline.shards import ROW_GROUP_ROWS, write_task
from data_pipeline.tokenizer import FIXED_SPECIAL_IDS

COLLATE = ClassificationCollator(FIXED_SPECIAL_IDS["[PAD]"])


def loaders(data_dir: Path, world: int, batch: int = 4, **kw: object) -> list:
    from data_pipeline.loader import ShardLoader

    options = {"seed": 5, "block_rows": 3, "window_blocks": 2, **kw}
    return [
        ShardLoader(
            data_dir / "classification",
            "train",
            batch,
            COLLATE,
            rank=r,
            world_size=world,
            **options,
        )  # type: ignore[arg-type]
        for r in range(world)
    ]


def served(loader: object, limit: int | None = None) -> list[list[int]]:
    out: list[list[int]] = []
    for batch in loader:  # type: ignore[attr-defined]
        out.append(batch["sample_id"].tolist())
        if len(out) == limit:
            break
    return out


def flat(batches: list[list[int]]) -> list[int]:
    return [i for b in batches for i in b]


@pytest.fixture
def data(tmp_path: Path) -> Path:
    return make_data_dir(tmp_path / "data", train_rows=61)  # 9 shards of <= 7 rows, blocks of 3


def test_the_global_sequence_does_not_depend_on_the_world_size(data: Path) -> None:
    whole = flat(served(loaders(data, 1, batch=1)[0]))
    assert sorted(whole) == list(range(61)) and whole != list(range(61))
    for world in (2, 3, 4):
        ranks = loaders(data, world)
        counts = {len(lo) for lo in ranks}
        # equal batch counts; drop_last keeps whole batches only
        assert counts == {61 // (world * 4)}
        steps = counts.pop()
        per_rank = [served(lo) for lo in ranks]
        # step t's global batch (rank 0's batch, then rank 1's, ...) is the sequence's t-th slice
        # of world * 4 rows: N ranks of batch b train on what one rank of batch N * b would
        global_batches = [flat([per_rank[r][t] for r in range(world)]) for t in range(steps)]
        assert flat(global_batches) == whole[: world * 4 * steps]
        one_rank = served(loaders(data, 1, batch=world * 4)[0])
        assert [sorted(b) for b in global_batches] == [sorted(b) for b in one_rank[:steps]]


@pytest.mark.parametrize("world", [1, 2, 3, 5])
def test_drop_last_false_serves_every_row_with_equal_batch_counts(data: Path, world: int) -> None:
    ranks = loaders(data, world, drop_last=False, shuffle=False)
    assert len({len(lo) for lo in ranks}) == 1
    ids = flat([i for lo in ranks for i in served(lo)])
    counts = Counter(ids)
    assert set(counts) == set(range(61)) and len(ids) == world * -(-61 // world)
    assert sum(c - 1 for c in counts.values()) == len(ids) - 61  # only the top-up repeats


def test_order_is_seeded_per_seed_and_epoch(data: Path) -> None:
    first = loaders(data, 2)
    epoch0 = [served(lo) for lo in first]
    epoch1 = [served(lo) for lo in first]
    assert epoch0 == [served(lo) for lo in loaders(data, 2)]
    assert epoch0 != epoch1
    assert epoch0 != [served(lo) for lo in loaders(data, 2, seed=6)]
    again = loaders(data, 2)
    for lo in again:
        lo.set_epoch(1)
    assert [served(lo) for lo in again] == epoch1


def test_rows_are_shuffled_only_within_a_window(data: Path) -> None:
    """Shard-then-block: a window of 2 blocks of 3 rows holds rows of at most 2 shards."""
    order = loaders(data, 1)[0].order(0)
    ids = flat(served(loaders(data, 1, batch=1)[0]))
    for window in range(order.num_windows):
        start, stop = order.window_span(window)
        shards = {i // 7 for i in ids[start:stop]}  # make_data_dir writes 7 rows a shard
        assert shards == {s for s, _, _ in order.window_parts(window)} and len(shards) <= 2


@pytest.mark.parametrize("drop_last", [True, False])
def test_resume_at_every_batch_equals_the_uninterrupted_run(data: Path, drop_last: bool) -> None:
    straight = [served(lo) + served(lo) for lo in loaders(data, 2, drop_last=drop_last)]
    batches = len(loaders(data, 2, drop_last=drop_last)[0])
    for k in range(batches + 1):
        ranks = loaders(data, 2, drop_last=drop_last)
        head = [served(lo, limit=k) if k else [] for lo in ranks]
        states = json.loads(json.dumps([lo.state_dict() for lo in ranks]))
        resumed = loaders(data, 2, drop_last=drop_last)
        for lo, state in zip(resumed, states, strict=True):
            lo.load_state_dict(state)
        tail = [served(lo) for lo in resumed]
        if k == batches:  # the loop never asked past the last batch: the next `for` is epoch 1
            assert tail == [s[batches:] for s in straight]
        else:
            again = [h + t + served(lo) for h, t, lo in zip(head, tail, resumed, strict=True)]
            assert again == straight


def test_a_changed_shard_is_refused_naming_it(data: Path) -> None:
    shard = data / "classification" / "train" / "part-00003.parquet"
    shard.write_bytes(shard.read_bytes()[:-1] + b"\x00")
    with pytest.raises(DataError, match=r"part-00003.parquet: sha256 does not match .*manifest"):
        served(loaders(data, 1, shuffle=False)[0])


def test_each_shard_is_hashed_once_per_process(data: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import data_pipeline.loader as loader_module

    hashed: list[str] = []
    real = loader_module.verify_sha256
    monkeypatch.setattr(
        loader_module,
        "verify_sha256",
        lambda fs, path, *a: (hashed.append(path), real(fs, path, *a))[1],
    )
    lo = loaders(data, 1, batch=1)[0]
    served(lo)
    served(lo)
    assert len(hashed) == len(set(hashed)) == 9


def test_each_rank_reads_each_window_once_per_epoch(tmp_path: Path) -> None:
    """A rank's slices are spread over every global batch, so it reads the windows of the whole
    served sequence, each once (never a window twice), and keeps its own rows."""
    data = make_data_dir(tmp_path / "data", train_rows=600, shard_rows=50)
    ranks = loaders(data, 3, batch=5, block_rows=10, window_blocks=2)
    for lo in ranks:
        served(lo)
        served_rows = len(lo) * 5 * 3  # the global batches of the epoch
        assert served_rows <= lo.stats["rows_read"] <= served_rows + 20  # + the last window's rest
        assert lo.stats["windows_read"] == -(-lo.stats["rows_read"] // 20)


def test_memory_holds_two_windows_whatever_the_corpus(tmp_path: Path) -> None:
    """Rows held as Arrow at once: the window served and the one read ahead; 1x and 10x data
    alike."""
    peaks = []
    for rows in (200, 2000):
        data = make_data_dir(tmp_path / str(rows), train_rows=rows, shard_rows=40)
        lo = loaders(data, 2, batch=4, block_rows=10, window_blocks=3)[0]
        assert len(served(lo)) == len(lo)
        peaks.append(lo.stats["peak_rows_held"])
    assert peaks[0] == peaks[1] == 2 * 3 * 10


def test_writer_bounds_row_groups_and_old_single_group_shards_still_read(tmp_path: Path) -> None:
    builder = BUILDERS["classification"]
    rows = [{"sample_id": i, "input_ids": [2, 7, 3], "label": 0, "text": ""} for i in range(2500)]
    write_task(
        tmp_path / "task",
        "classification",
        builder.schema,
        {"train": rows},
        3000,
        builder.token_columns,
    )
    meta = pq.read_metadata(tmp_path / "task" / "train" / "part-00000.parquet")
    groups = [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
    assert groups == [ROW_GROUP_ROWS] * 2 + [452]
    # A shard written before row groups were bounded (one group of 7 rows) read 3 rows at a time.
    data = make_data_dir(tmp_path / "data", train_rows=61)
    single = data / "classification" / "train" / "part-00000.parquet"
    assert pq.read_metadata(single).num_row_groups == 1
    ids = flat(served(loaders(data, 1, batch=1, shuffle=False)[0]))
    assert ids == list(range(61))
