"""The contiguous split (`DataConfig.split: contiguous`) and `dedupe: false`: kept rows cut in input
order into train | validation | test ranges, with the arithmetic `kiln lm-baseline` uses for
`split_path`, and repeated rows kept, so that a prepared clm dataset of a text file holds out exactly
the lines the language-model baselines are scored on (tests/finetune/test_lm_baseline_splits.py
checks that end to end)."""

from __future__ import annotations

from collections.abc import Iterator

import pyarrow as pa
import pytest

from data_pipeline import prepare as prepare_module
from data_pipeline.clean import contiguous_bounds, split_contiguously
from data_pipeline.config import DataConfig
from data_pipeline.errors import DataError


def test_bounds_cut_in_order_and_give_each_non_zero_fraction_a_row() -> None:
    assert contiguous_bounds(100, 0.1, 0.2) == (70, 80)
    assert contiguous_bounds(32777, 0.05, 0.05) == (29499, 31138)  # tiny-shakespeare's lines
    assert contiguous_bounds(3, 0.01, 0.01) == (1, 2)  # at least one row each
    assert contiguous_bounds(10, 0.1, 0.0) == (9, 10)  # no test range at all
    assert contiguous_bounds(2, 0.3, 0.3) == (0, 1)  # train empty: the caller refuses


def _kept(n: int) -> pa.Table:
    return pa.table({"text": [f"line {i}" for i in range(n)], "split": ["train"] * n})


def test_split_contiguously_replaces_the_hash_split_in_row_order() -> None:
    table = split_contiguously(_kept(20), 0.1, 0.15, "documents")
    assert table.column("text").to_pylist() == [f"line {i}" for i in range(20)]
    assert table.column("split").to_pylist() == ["train"] * 15 + ["validation"] * 2 + ["test"] * 3
    with pytest.raises(DataError, match=r"^validation_fraction: documents: 2 kept rows are too"):
        split_contiguously(_kept(2), 0.3, 0.3, "documents")


def test_config_defaults_keep_the_hash_split_and_dedupe() -> None:
    cfg = DataConfig()
    assert (cfg.split, cfg.dedupe) == ("hash", True)
    assert DataConfig(split="contiguous", dedupe=False).to_dict()["split"] == "contiguous"
    with pytest.raises(DataError, match="split: .*did you mean 'contiguous'"):
        DataConfig(split="contiguos")
    with pytest.raises(DataError, match="dedupe"):
        DataConfig(dedupe="no")  # type: ignore[arg-type]


class _Batches:
    def __init__(self, *batches: pa.Table) -> None:
        self.batches = batches

    def iter_batches(self, **kwargs: object) -> Iterator[pa.Table]:
        return iter(self.batches)


def _cleaned(texts: list[str], drops: list[str], split: str) -> pa.Table:
    """A batch as clean_batch leaves it, with a hash split that the contiguous one must override."""
    n = len(texts)
    return pa.table(
        {
            "text": texts,
            "origin": [f"f:{i}" for i in range(n)],
            "replaced": [0] * n,
            "error": [""] * n,
            "drop": drops,
            "key": texts,
            "split": [split] * n,
        }
    )


def test_collect_keeps_repeats_and_cuts_the_kept_rows_contiguously() -> None:
    # Speaker lines repeat (tiny-shakespeare's "First Citizen:"); a blank line is dropped before the cut.
    texts = ["A:", "x", "A:", "y", "", "A:", "z", "A:", "w", "A:"]
    drops = ["", "", "", "", "empty", "", "", "", "", ""]
    cfg = DataConfig(
        source="text",
        paths=["f"],
        tasks=["clm"],
        split="contiguous",
        dedupe=False,
        validation_fraction=0.2,
        test_fraction=0.1,
    )
    batches = (_cleaned(texts[:5], drops[:5], "validation"), _cleaned(texts[5:], drops[5:], "test"))
    table, info, dropped = prepare_module._collect(_Batches(*batches), cfg, "documents")
    kept = [t for t in texts if t]
    assert table.column("text").to_pylist() == kept  # nothing de-duplicated, order kept
    assert table.column("split").to_pylist() == ["train"] * 6 + ["validation"] * 2 + ["test"]
    assert dropped["duplicate"] == 0 and dropped["empty"] == 1
    assert info["splits"] == {"train": 6, "validation": 2, "test": 1}
    defaults = DataConfig(source="text", paths=["f"], tasks=["clm"])
    hashed, _, dropped = prepare_module._collect(_Batches(*batches), defaults, "documents")
    assert dropped["duplicate"] == 4  # the defaults still de-duplicate ...
    assert (
        hashed.column("split").to_pylist() == ["validation"] * 3 + ["test"] * 2
    )  # ... and keep it
