"""Helpers and fixtures for tests/data_pipeline (a uniquely named module: test dirs have no __init__.py)."""

from __future__ import annotations

import gzip
from pathlib import Path

import pytest

from data_pipeline.examples import BUILDERS
from data_pipeline.shards import write_json, write_task
from data_pipeline.tokenizer import FIXED_SPECIAL_IDS

VOCAB = 50  # ids 7..49 are ordinary tokens in the synthetic data


def write(path: Path, text: str | bytes, gz: bool = False) -> Path:
    data = text.encode("utf-8") if isinstance(text, str) else text
    path.write_bytes(gzip.compress(data, mtime=0) if gz else data)
    return path


def classification_rows(n: int, start: int = 0) -> list[dict]:
    """Rows of varied length whose sample_id is recoverable from the tokens (id 7 + sample_id % 40)."""
    return [
        {
            "sample_id": start + i,
            "input_ids": [2] + [7 + (start + i) % 40] * (1 + i % 5) + [3],
            "label": (start + i) % 3,
            "text": f"row {start + i}",
        }
        for i in range(n)
    ]


def make_data_dir(
    root: Path, train_rows: int, validation_rows: int = 5, shard_rows: int = 7
) -> Path:
    """A prepared-looking data dir with a synthetic classification task (several shards), no Ray."""
    builder = BUILDERS["classification"]
    splits = {
        "train": classification_rows(train_rows),
        "validation": classification_rows(validation_rows, start=train_rows),
    }
    write_task(
        root / "classification",
        "classification",
        builder.schema,
        splits,
        shard_rows,
        builder.token_columns,
        {"labels": ["a", "b", "c"]},
    )
    write_json(
        root / "manifest.json",
        {"tasks": {"classification": {}}, "special_tokens": FIXED_SPECIAL_IDS, "vocab_size": VOCAB},
    )
    return root


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return make_data_dir(tmp_path / "data", train_rows=53)
