from __future__ import annotations

from collections import Counter

import pyarrow as pa

from data_pipeline.clean import assign_split, clean_batch, clean_text, content_key, drop_reason


def test_clean_text_normalises_and_strips_controls() -> None:
    decomposed = "cafe\u0301"  # e + combining acute
    assert (
        clean_text(f"  {decomposed}\x00\x07 au\tlait \x9f ", keep_newlines=False)
        == "caf\u00e9 au lait"
    )
    assert (
        clean_text("one  line\r\n\n  two\x0b\n\n\nthree ", keep_newlines=True)
        == "one line\ntwo\nthree"
    )
    assert clean_text("a\nb", keep_newlines=False) == "a b"


def test_drop_reasons() -> None:
    assert drop_reason(["ok", "fine"], min_chars=1, max_chars=10) == ""
    assert drop_reason(["ok", ""], min_chars=1, max_chars=10) == "empty"
    assert drop_reason(["ok", "fine"], min_chars=3, max_chars=10) == "too_short"
    assert drop_reason(["a" * 11], min_chars=1, max_chars=10) == "too_long"


def test_split_is_deterministic_content_based_and_near_the_fractions() -> None:
    keys = [content_key([f"row {i}"]) for i in range(4000)]
    splits = [assign_split(k, seed=0, validation_fraction=0.1, test_fraction=0.05) for k in keys]
    assert splits == [assign_split(k, 0, 0.1, 0.05) for k in keys]
    counts = Counter(splits)
    assert (
        abs(counts["validation"] / 4000 - 0.1) < 0.02 and abs(counts["test"] / 4000 - 0.05) < 0.015
    )
    other_seed = [assign_split(k, 1, 0.1, 0.05) for k in keys]
    assert other_seed != splits
    assert set(assign_split(k, 0, 0.0, 0.0) for k in keys) == {"train"}


def test_clean_batch_marks_drops_and_adds_keys() -> None:
    batch = pa.table(
        {
            "src": ["one", " one ", "", "x" * 50],
            "tgt": ["un", "un", "deux", "y"],
            "origin": ["f:1", "f:2", "f:3", "f:4"],
            "error": [""] * 4,
        }
    )
    out = clean_batch(
        batch,
        "pairs",
        min_chars=1,
        max_chars=40,
        seed=0,
        validation_fraction=0.0,
        test_fraction=0.0,
    )
    assert out.column("src").to_pylist() == ["one", "one", "", "x" * 50]
    assert out.column("drop").to_pylist() == ["", "", "empty", "too_long"]
    keys = out.column("key").to_pylist()
    assert (
        keys[0] == keys[1] != keys[2]
    )  # equal after cleaning: the driver will drop row 2 as a duplicate
    assert out.column("split").to_pylist() == ["train"] * 4
