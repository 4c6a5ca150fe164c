from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest
from data_pipeline_testlib import classification_rows

from data_pipeline.errors import DataError
from data_pipeline.examples import BUILDERS
from data_pipeline.shards import read_manifest, read_split, sha256_file, write_task

BUILDER = BUILDERS["classification"]


def _write(root: Path, n: int = 23) -> dict:
    splits = {
        "train": classification_rows(n),
        "validation": classification_rows(3, start=n),
        "test": [],
    }
    return write_task(
        root, "classification", BUILDER.schema, splits, 10, BUILDER.token_columns, {"labels": ["a"]}
    )


def test_shards_are_bounded_and_described_by_the_manifest(tmp_path: Path) -> None:
    manifest = _write(tmp_path / "task")
    train = manifest["splits"]["train"]
    assert [s["rows"] for s in train["shards"]] == [10, 10, 3] and train["rows"] == 23
    assert [s["file"] for s in train["shards"]] == [f"train/part-0000{i}.parquet" for i in range(3)]
    assert train["tokens"] == sum(len(r["input_ids"]) for r in classification_rows(23))
    for shard in train["shards"]:
        assert sha256_file(tmp_path / "task" / shard["file"]) == shard["sha256"]
    assert pq.read_schema(tmp_path / "task" / "train" / "part-00000.parquet").equals(BUILDER.schema)
    assert (
        manifest["splits"]["test"]["rows"] == 0 and len(manifest["splits"]["test"]["shards"]) == 1
    )
    assert read_manifest(tmp_path / "task") == manifest and manifest["labels"] == ["a"]


def test_same_rows_give_byte_identical_shards(tmp_path: Path) -> None:
    first, second = _write(tmp_path / "one"), _write(tmp_path / "two")
    assert first == second
    assert (tmp_path / "one/manifest.json").read_bytes() == (
        tmp_path / "two/manifest.json"
    ).read_bytes()
    third = _write(tmp_path / "three", n=24)["splits"]["train"]["shards"]
    assert (
        third[0]["sha256"] == first["splits"]["train"]["shards"][0]["sha256"]
    )  # the same first 10 rows
    assert (
        third[2]["sha256"] != first["splits"]["train"]["shards"][2]["sha256"]
    )  # one more row in the last


def test_non_empty_directory_is_refused_and_untouched(tmp_path: Path) -> None:
    (tmp_path / "task").mkdir()
    (tmp_path / "task" / "keep.txt").write_text("mine")
    with pytest.raises(DataError, match="exists and is not empty"):
        _write(tmp_path / "task")
    assert [p.name for p in (tmp_path / "task").iterdir()] == ["keep.txt"]


def test_read_split_reads_columns_in_order_and_verifies(tmp_path: Path) -> None:
    _write(tmp_path / "task")
    table = read_split(tmp_path / "task", "train", columns=["sample_id"], verify=True)
    assert table.column_names == ["sample_id"] and table.column("sample_id").to_pylist() == list(
        range(23)
    )
    with pytest.raises(DataError, match="no split 'dev'"):
        read_split(tmp_path / "task", "dev")
    shard = tmp_path / "task" / "train" / "part-00001.parquet"
    shard.write_bytes(shard.read_bytes()[:-1] + b"\x00")
    with pytest.raises(DataError, match=r"part-00001.parquet: sha256 does not match"):
        read_split(tmp_path / "task", "train", verify=True)


def test_read_manifest_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"manifest.json: no manifest"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text('{\n  "a": 1,\n}')
    with pytest.raises(DataError, match=r"manifest.json:3: invalid JSON"):
        read_manifest(tmp_path)
