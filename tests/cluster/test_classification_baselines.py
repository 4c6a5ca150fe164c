"""The baselines a classifier's test accuracy is reported next to (cluster/evaluation.py)."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cluster.evaluation import bow_logistic_regression, classification_baselines

WORDS = {0: "socket server connection", 1: "thread lock queue", 2: "file path directory"}


def _split(task_dir: Path, split: str, labels: list[int]) -> None:
    texts = [f"{WORDS[y]} example {i}" for i, y in enumerate(labels)]
    (task_dir / split).mkdir(parents=True)
    pq.write_table(
        pa.table({"text": texts, "label": pa.array(labels, pa.int32())}),
        task_dir / split / "part-0.parquet",
    )


def test_baselines_score_the_split_they_are_asked_about(tmp_path: Path) -> None:
    _split(tmp_path, "train", [0] * 20 + [1] * 10 + [2] * 10)  # training majority: 0
    _split(tmp_path, "validation", [0, 1, 2])
    _split(tmp_path, "test", [2, 2, 2, 1])  # majority 2, which the training majority never answers
    got = classification_baselines(tmp_path, "test", num_labels=3)
    assert got["majority_class_accuracy"] == 0.0
    assert got["split_majority_rate"] == 0.75
    assert got["uniform_chance"] == pytest.approx(1 / 3)
    assert got["bow_accuracy"] == 1.0  # the words give the label away
    assert got["bow_macro_f1"] > 0.6  # class 0 is absent from the test split: its F1 is 0


def test_bag_of_words_learns_from_words_and_works_without_validation() -> None:
    texts = [WORDS[y] for y in (0, 1, 2) * 5]
    labels = [0, 1, 2] * 5
    unseen = ["a thread and a lock", "server socket"]
    assert bow_logistic_regression(texts, labels, None, unseen) == [1, 0]
    assert bow_logistic_regression(texts, labels, (texts[:3], labels[:3]), ["directory path"]) == [
        2
    ]
