"""Sources: paths, the Ray read task (called directly), Hugging Face datasets on disk; no Ray is started."""

from __future__ import annotations

import socket
import time
import tracemalloc
from pathlib import Path

import pyarrow as pa
import pytest
from data_pipeline_testlib import write

from data_pipeline import sources
from data_pipeline.config import DataConfig
from data_pipeline.errors import DataError
from data_pipeline.hf_datasets import arrow_file_rows, resolve
from data_pipeline.readers import ReadOptions
from data_pipeline.sources import SOURCES, expand_paths, raw_schema, read_task


def test_globs_and_directories_expand_sorted(tmp_path: Path) -> None:
    for name in ("b.txt", "a.txt", "sub/c.txt", ".hidden"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        write(tmp_path / name, "x\n")
    assert expand_paths([str(tmp_path / "*.txt")]) == [
        str(tmp_path / "a.txt"),
        str(tmp_path / "b.txt"),
    ]
    assert expand_paths([str(tmp_path)]) == [
        str(tmp_path / n) for n in ("a.txt", "b.txt", "sub/c.txt")
    ]
    assert expand_paths([str(tmp_path / "b.txt"), str(tmp_path / "*.txt")]) == [
        str(tmp_path / "b.txt"),
        str(tmp_path / "a.txt"),
    ]  # no file twice


def test_missing_path_and_unmatched_glob_are_named_before_any_work(tmp_path: Path) -> None:
    with pytest.raises(
        DataError, match=rf"^{tmp_path}/nope.txt: no such file or directory \(paths\)$"
    ):
        SOURCES["text"].resolve(
            DataConfig(source="text", paths=[str(tmp_path / "nope.txt")], tasks=["clm"])
        )
    with pytest.raises(DataError, match=r"\*.tsv: no file matches this pattern \(paths\)$"):
        expand_paths([str(tmp_path / "*.tsv")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"empty: directory holds no files"):
        expand_paths([str(tmp_path / "empty")])


def test_resolved_files_record_size_and_hash(tmp_path: Path) -> None:
    path = write(tmp_path / "a.txt", "hello\n")
    inputs = SOURCES["text"].resolve(DataConfig(source="text", paths=[str(path)], tasks=["clm"]))
    assert inputs == {
        "source": "text",
        "files": [
            {
                "path": str(path),
                "bytes": 6,
                "sha256": ("5891b5b522d5df086d0ff0b110fbd9d21bb4fc7163af34d08286a2e846f6be03"),
            }
        ],
    }


def _task(
    path: Path, opts: ReadOptions, partner: str = "", block_chars: int = 1000
) -> list[pa.Table]:
    return list(
        read_task({"path": [str(path)], "partner": [partner]}, opts, "file", {}, block_chars)
    )


def test_read_task_streams_blocks_of_bounded_size(tmp_path: Path) -> None:
    path = write(
        tmp_path / "lines.txt", "".join(f"line number {i:02d}\n" for i in range(10))
    )  # 14 chars a line
    blocks = _task(path, ReadOptions("documents", text_unit="line"), block_chars=25)
    assert [b.num_rows for b in blocks] == [2, 2, 2, 2, 2] and all(
        b.schema == raw_schema("documents") for b in blocks
    )
    assert pa.concat_tables(blocks).column("origin").to_pylist() == [
        f"{path}:{i}" for i in range(1, 11)
    ]


def test_read_task_turns_a_data_error_into_an_error_row(tmp_path: Path) -> None:
    path = write(tmp_path / "bad.tsv", "one\tun\ntwo\n")
    (block,) = _task(path, ReadOptions("pairs"))
    assert block.to_pylist() == [
        {
            "src": "",
            "tgt": "",
            "origin": str(path),
            "replaced": 0,
            "error": (f"{path}:2: expected 2 tab-separated columns (source, target), found 1"),
        }
    ]


def test_two_plain_paths_are_a_line_aligned_pair(tmp_path: Path) -> None:
    de, en = write(tmp_path / "a.de", "eins\n"), write(tmp_path / "a.en", "one\n")
    cfg = DataConfig(source="parallel", paths=[str(de), str(en)], tasks=["translation"])
    assert sources._file_tasks(cfg, "pairs", [str(de), str(en)]) == [
        {"path": str(de), "partner": str(en)}
    ]
    tsvs = [str(write(tmp_path / f"{n}.tsv", "a\tb\n")) for n in "xy"]
    cfg = DataConfig(source="parallel", paths=tsvs, tasks=["translation"])
    assert sources._file_tasks(cfg, "pairs", tsvs) == [{"path": p, "partner": ""} for p in tsvs]


# ---------------------------------------------------------------------------------------- pre-flight


def _preflight(cfg: DataConfig) -> dict | None:
    return sources.preflight(cfg, SOURCES[cfg.source].resolve(cfg))


def test_preflight_parses_every_line_as_the_read_tasks_do(tmp_path: Path) -> None:
    bad = write(tmp_path / "pairs.tsv", "".join(f"{i}\tdeux\n" for i in range(5000)) + "x\ty\tz\n")
    cfg = DataConfig(source="parallel", paths=[str(bad)], tasks=["translation"])
    with pytest.raises(
        DataError,
        match=rf"^{bad}:5001: expected 2 tab-separated columns \(source, target\), found 3$",
    ):
        _preflight(cfg)
    good = write(tmp_path / "good.tsv", "one\tun\n")
    assert _preflight(DataConfig(**{**cfg.to_dict(), "paths": [str(good)]})) == {
        "files": 1,
        "bytes": good.stat().st_size,
        "rows": 1,
        "whole": True,
    }
    assert _preflight(DataConfig(tasks=["clm"])) is None  # the built-in sample: nothing to read


def test_preflight_of_a_large_input_checks_the_head_of_each_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sources, "PREFLIGHT_FULL_BYTES", 100)
    monkeypatch.setattr(sources, "PREFLIGHT_HEAD_ROWS", 3)
    late = write(
        tmp_path / "late.txt", b"a\nb\nc\nd\n" + b"e\n" * 50 + b"caf\xe9\n"
    )  # bad byte on line 55
    cfg = DataConfig(source="text", paths=[str(late)], text_unit="line", tasks=["clm"])
    assert _preflight(cfg) == {"files": 1, "bytes": late.stat().st_size, "rows": 3, "whole": False}
    monkeypatch.setattr(sources, "PREFLIGHT_FULL_BYTES", 1000)
    with pytest.raises(
        DataError, match=rf"^{late}:55: not valid UTF-8"
    ):  # whole: the last line is reached
        _preflight(cfg)


def test_preflight_streams_a_one_document_file_in_flat_memory(tmp_path: Path) -> None:
    # text_unit: file makes the whole file one document for the Ray task; the check holds one line at a time.
    big = write(
        tmp_path / "big.txt",
        "".join(f"line {i} of a large single document\n" for i in range(100_000)),
    )
    cfg = DataConfig(source="text", paths=[str(big)], text_unit="file", tasks=["clm"])
    inputs = SOURCES["text"].resolve(cfg)
    tracemalloc.start()
    try:
        assert sources.preflight(cfg, inputs)["rows"] == 100_000  # type: ignore[index]
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert big.stat().st_size > 3_000_000 and peak < 500_000


def test_preflight_reads_hugging_face_rows(saved_sst: Path) -> None:
    cfg = DataConfig(
        source="hf",
        hf_name=str(saved_sst),
        text_column="sentence",
        tasks=["classification"],
        labels=["negative"],
    )
    with pytest.raises(
        DataError, match=r"data-00000-of-00001.arrow:2: label 'positive' is not one of the given"
    ):
        _preflight(cfg)
    checked = _preflight(DataConfig(**{**cfg.to_dict(), "labels": None}))
    assert checked is not None and checked["rows"] == 3 and checked["whole"]


# ------------------------------------------------------------------------------------ Hugging Face


@pytest.fixture(scope="module")
def saved_sst(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import datasets

    features = datasets.Features(
        {
            "sentence": datasets.Value("string"),
            "label": datasets.ClassLabel(names=["negative", "positive"]),
            "pair": {"de": datasets.Value("string"), "en": datasets.Value("string")},
        }
    )
    train = datasets.Dataset.from_dict(
        {
            "sentence": ["dull", "great fun", "fine"],
            "label": [0, 1, 1],
            "pair": [{"de": "eins", "en": "one"}] * 3,
        },
        features=features,
    )
    root = tmp_path_factory.mktemp("hf") / "sst"
    datasets.DatasetDict({"train": train, "test": train.select([0])}).save_to_disk(str(root))
    return root


def test_saved_dataset_resolves_to_its_arrow_files_with_class_names(saved_sst: Path) -> None:
    opts = ReadOptions("labelled", text_column="sentence")
    inputs = resolve(str(saved_sst), "train", opts)
    assert inputs["num_rows"] == 3 and inputs["label_names"] == {"label": ["negative", "positive"]}
    assert all(
        f["path"].startswith(str(saved_sst)) and f["path"].endswith(".arrow")
        for f in inputs["files"]
    )
    got = [
        r for f in inputs["files"] for r in arrow_file_rows(f["path"], opts, inputs["label_names"])
    ]
    assert [(r["text"], r["label"]) for r in got] == [
        ("dull", "negative"),
        ("great fun", "positive"),
        ("fine", "positive"),
    ]
    pairs = ReadOptions(
        "pairs", src_column="pair.de", tgt_column="pair.en"
    )  # struct fields, as in HF translation
    assert [(r["src"], r["tgt"]) for r in arrow_file_rows(inputs["files"][0]["path"], pairs, {})][
        0
    ] == ("eins", "one")


def test_hf_errors_name_the_key(saved_sst: Path) -> None:
    with pytest.raises(
        DataError, match=r"^hf_split: .*sst has splits \['test', 'train'\], not 'validation'$"
    ):
        resolve(str(saved_sst), "validation", ReadOptions("labelled", text_column="sentence"))
    with pytest.raises(
        DataError, match=r"sst\[train\]: no column 'text' \(text_column\); it has \['sentence', "
    ):
        resolve(str(saved_sst), "train", ReadOptions("documents"))


def test_hf_data_files_load_through_datasets(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    path = write(tmp_path / "docs.jsonl", '{"text": "first"}\n{"text": "second"}\n')
    inputs = resolve(str(tmp_path / "*.jsonl"), "train", ReadOptions("documents"))
    got = [
        r["text"]
        for f in inputs["files"]
        for r in arrow_file_rows(f["path"], ReadOptions("documents"), {})
    ]
    assert got == ["first", "second"] and inputs["num_rows"] == 2 and path.exists()


def test_hub_name_offline_fails_at_once_in_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    def unreachable(*args: object, **kwargs: object) -> socket.socket:
        raise OSError("Name or service not known")

    monkeypatch.setattr(socket, "create_connection", unreachable)
    start = time.perf_counter()
    with pytest.raises(DataError) as err:
        resolve("stanfordnlp/sst2", "train", ReadOptions("labelled", text_column="sentence"))
    assert time.perf_counter() - start < 5 and "\n" not in str(err.value)
    assert str(err.value).startswith(
        "hf_name: 'stanfordnlp/sst2' is not a local directory or file, and the "
        "Hugging Face Hub (huggingface.co) cannot be reached (offline)"
    )
