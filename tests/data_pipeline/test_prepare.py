"""`prepare()` end to end: the only tests here that start Ray (marked e2e), plus its driver-side pieces without Ray."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pytest
import ray
from data_pipeline_testlib import write

from data_pipeline import prepare as prepare_module
from data_pipeline.config import DataConfig
from data_pipeline.errors import DataError
from data_pipeline.loader import make_loader
from data_pipeline.prepare import prepare
from data_pipeline.shards import read_manifest, read_split, sha256_file
from data_pipeline.tokenizer import load_tokenizer

TINY = DataConfig(
    sample_docs=30,
    sample_pairs=300,
    sample_labelled=200,
    vocab_size=500,
    seq_len=32,
    validation_fraction=0.2,
    test_fraction=0.1,
    shard_rows=100,
)


def test_non_empty_output_is_refused_before_any_work(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_ray() -> None:
        raise AssertionError("Ray was started for a refused output directory")

    monkeypatch.setattr(prepare_module, "_quiet_ray_data", no_ray)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.txt").write_text("keep me")
    with pytest.raises(
        DataError, match=rf"^{tmp_path / 'out'}: output directory exists and is not empty"
    ):
        prepare(TINY, tmp_path / "out")
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary directory left behind
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["old.txt"]


def _bad_inputs(tmp: Path) -> list[tuple[DataConfig, str]]:
    """(config, error) for each kind of bad input; every file is fine up to its bad line."""
    good = "".join(f"sentence {i}\tphrase {i}\n" for i in range(100))
    tsv = write(tmp / "cols.tsv", good + "one\ttwo\tthree\n")
    de, en = write(tmp / "a.de", "eins\nzwei\ndrei\n"), write(tmp / "a.en", "one\ntwo\n")
    sst = write(
        tmp / "sst.tsv", "sentence\tlabel\n" + "".join(f"review {i}\t{i % 2}\n" for i in range(50))
    )
    empty, gz = write(tmp / "empty.txt", "\n \n"), write(tmp / "packed.txt", "some text\n", gz=True)
    utf8 = write(tmp / "latin1.txt", b"fine\n" * 40 + b"caf\xe9\n")
    tatoeba = write(tmp / "kor.txt", "Hi.\t안녕.\tCC-BY 2.0 (France)\n" * 3)
    text = {"source": "text", "tasks": ["clm"]}
    pairs = {"source": "parallel", "tasks": ["translation"]}
    return [
        (DataConfig(**text, paths=[str(empty)]), rf"^{empty}: file is empty$"),
        (
            DataConfig(**text, paths=[str(utf8)]),
            rf"^{utf8}:41: not valid UTF-8 \(byte 0xe9 at column 4\)",
        ),
        (
            DataConfig(**text, paths=[str(gz)]),
            rf"^{gz}:1: gzip-compressed data but the name does not end in .gz",
        ),
        (
            DataConfig(**text, paths=[str(tmp / "gone.txt")]),
            rf"^{tmp}/gone.txt: no such file or directory",
        ),
        (
            DataConfig(**pairs, paths=[str(tsv)]),
            rf"^{tsv}:101: expected 2 tab-separated columns \(source, target\)",
        ),
        (
            DataConfig(**pairs, paths=[str(de), str(en)]),
            rf"^{en}:3: file ends here but {de} has 3 lines",
        ),
        (
            DataConfig(**pairs, paths=[str(tatoeba)], src_column=3, tgt_column=0),
            rf"^{tatoeba}:1: src_column 3 is out of range: the line has 3 tab-separated columns",
        ),
        (
            DataConfig(
                source="labelled",
                paths=[str(sst)],
                tasks=["classification"],
                text_column="sentence",
                labels=["0"],
            ),
            rf"^{sst}:3: label '1' is not one of the given labels \['0'\] \(labels\)$",
        ),
    ]


def test_bad_input_fails_before_ray_starts_and_leaves_no_output(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_ray(*args: object, **kwargs: object) -> None:
        raise AssertionError("Ray was started for bad input")

    monkeypatch.setattr(prepare_module, "init_ray", no_ray)
    monkeypatch.setattr(ray, "init", no_ray)
    (tmp_path / "in").mkdir()
    for cfg, message in _bad_inputs(tmp_path / "in"):
        with pytest.raises(DataError, match=message):
            prepare(cfg, tmp_path / "runs" / "out")
        assert sorted(p.name for p in tmp_path.iterdir()) == ["in"], (
            message
        )  # no output, its parent or temporary


def test_data_prepare_command_fails_in_one_line_with_exit_2_before_ray(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from cluster.cli import main

    def no_ray(*args: object, **kwargs: object) -> None:
        raise AssertionError("Ray was started for bad input")

    monkeypatch.setattr(ray, "init", no_ray)
    bad = write(tmp_path / "pairs.tsv", "one\tun\ntwo\n")
    with pytest.raises(SystemExit) as stop:
        main(
            [
                "data",
                "prepare",
                "data.source=parallel",
                f"data.paths=[{bad}]",
                "data.tasks=[translation]",
                "--out",
                str(tmp_path / "out"),
            ]
        )
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip()
    assert (
        err.endswith(f"{bad}:2: expected 2 tab-separated columns (source, target), found 1")
        and "\n" not in err
    )
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    if ray.is_initialized():  # another test module's Ray: use it, leave it running
        yield
        return
    # address="local": a new Ray for the tests, never a cluster someone else started on this machine
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def _files(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): sha256_file(p) for p in sorted(root.rglob("*")) if p.is_file()
    }


@pytest.mark.e2e
def test_prepare_sample_is_complete_deterministic_and_loadable(
    local_ray: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    messages: list[str] = []
    manifest = prepare(TINY, tmp_path / "a", progress=messages.append)
    (tmp_path / "b").mkdir()  # an existing empty directory is fine
    prepare(TINY, tmp_path / "b")
    assert _files(tmp_path / "a") == _files(
        tmp_path / "b"
    )  # byte-identical shards, tokenizer and manifests
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "a",
        "b",
    ]  # temporary directories renamed away

    assert read_manifest(tmp_path / "a") == manifest
    assert manifest["special_tokens"] == {
        "[PAD]": 0,
        "[UNK]": 1,
        "[CLS]": 2,
        "[SEP]": 3,
        "[MASK]": 4,
        "[BOS]": 5,
        "[EOS]": 6,
    }
    assert manifest["tokenizer"]["sha256"] == sha256_file(tmp_path / "a" / "tokenizer.json")
    assert (
        manifest["vocab_size"]
        == load_tokenizer(tmp_path / "a" / "tokenizer.json").get_vocab_size()
        <= 500
    )
    assert (
        manifest["sources"]["documents"]["kept"] == 30
        and manifest["sources"]["pairs"]["kept"] == 300
    )
    assert manifest["dropped"]["pairs"] == {
        "empty": 0,
        "too_short": 0,
        "too_long": 0,
        "duplicate": 0,
    }
    assert manifest["config"]["seq_len"] == 32 and any(
        m.startswith("tokenizer: trained bpe") for m in messages
    )

    for task in ("mlm_nsp", "clm", "translation", "classification"):
        task_manifest = read_manifest(tmp_path / "a" / task)
        assert (
            task_manifest["splits"]["train"]["rows"] > 0
            and task_manifest["splits"]["validation"]["rows"] > 0
        )
        ids = [
            i
            for split in task_manifest["splits"]
            for i in read_split(tmp_path / "a" / task, split, ["sample_id"], verify=True)
            .column(0)
            .to_pylist()
        ]
        assert len(ids) == len(set(ids))  # sample_id unique within the task
        batch = next(iter(make_loader(tmp_path / "a", task, "train", batch_size=4)))
        assert batch["sample_id"].shape == (4,)
    assert set(read_manifest(tmp_path / "a" / "translation")["splits"]) == {
        "train",
        "validation",
        "test",
    }
    labels = read_manifest(tmp_path / "a" / "classification")["labels"]
    assert labels == ["concurrency", "files", "network", "numbers", "text"]

    # A file source with the sample's tokenizer reused: labels from the file, ids from the loaded vocabulary.
    lines = [
        f'{{"sentence": "review number {i} was {w}", "label": "{w}"}}'
        for i in range(40)
        for w in ("good", "bad", "fine")
    ]
    reviews = write(tmp_path / "reviews.jsonl", "\n".join(lines) + "\n" + lines[0] + "\n")
    cfg = DataConfig(
        source="labelled",
        paths=[str(reviews)],
        text_column="sentence",
        tasks=["classification"],
        tokenizer_path=str(tmp_path / "a" / "tokenizer.json"),
    )
    files = prepare(cfg, tmp_path / "files")
    assert (
        files["dropped"]["labelled"]["duplicate"] == 1
        and files["sources"]["labelled"]["kept"] == 120
    )
    assert files["inputs"]["files"] == [
        {"path": str(reviews), "bytes": reviews.stat().st_size, "sha256": sha256_file(reviews)}
    ]
    assert files["tokenizer"]["sha256"] == manifest["tokenizer"]["sha256"]
    assert read_manifest(tmp_path / "files" / "classification")["labels"] == ["bad", "fine", "good"]

    # Bad input found inside a Ray task (the driver's pre-flight check skipped, as for a bad line past the head
    # of a large input) comes back as a DataError naming the file and line.
    monkeypatch.setattr(prepare_module, "preflight", lambda cfg, inputs: None)
    bad = write(tmp_path / "pairs.tsv", "one\tun\ntwo\tdeux\tzwei\n")
    with pytest.raises(DataError, match=rf"^{bad}:2: expected 2 tab-separated columns"):
        prepare(
            DataConfig(source="parallel", paths=[str(bad)], tasks=["translation"]), tmp_path / "c"
        )
    assert not (tmp_path / "c").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "a",
        "b",
        "files",
        "pairs.tsv",
        "reviews.jsonl",
    ]


WIKI = "".join(
    f" = Article {a} =\n\n"
    + "".join(
        f" Paragraph {p} of article {a} says {'many ' * (a + p)}things .\n\n" for p in range(4)
    )
    for a in range(40)
)


@pytest.mark.e2e
def test_prepare_reads_files_of_every_kind_and_names_bad_input(
    local_ray: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    wiki = write(tmp_path / "wiki.txt.gz", WIKI, gz=True)
    gpt = DataConfig(
        source="text",
        paths=[str(wiki)],
        text_unit="file",
        wikitext_headings=True,
        tasks=["clm"],
        seq_len=16,
        tokenizer="char",
        vocab_size=100,
        validation_fraction=0.1,
    )
    trained = prepare(gpt, tmp_path / "trained")  # two passes: read + clean, train, tokenize
    assert (
        trained["sources"]["documents"]["rows_read"] == 40
        and trained["dropped"]["documents"]["duplicate"] == 0
    )
    reuse = str(tmp_path / "trained" / "tokenizer.json")
    prepare(
        DataConfig(**{**gpt.to_dict(), "tokenizer_path": reuse}), tmp_path / "loaded"
    )  # one fused pass
    for split in ("train", "validation"):  # the same vocabulary either way: the same shards
        assert read_split(tmp_path / "trained" / "clm", split) == read_split(
            tmp_path / "loaded" / "clm", split
        )
    tok = load_tokenizer(tmp_path / "loaded" / "tokenizer.json")
    blocks = read_split(tmp_path / "loaded" / "clm", "train").column("input_ids").to_pylist()
    stream = blocks[0] + [t for b in blocks[1:] for t in b[1:]]
    assert stream[0] == trained["special_tokens"]["[BOS]"]
    first_article = tok.decode(stream[1 : stream.index(trained["special_tokens"]["[EOS]"])])
    a = int(
        re.match(r"= Article (\d+) =\n", first_article).group(1)
    )  # cleaned: no blank lines or edge spaces
    assert first_article == f"= Article {a} =\n" + "\n".join(
        f"Paragraph {p} of article {a} says {'many ' * (a + p)}things ." for p in range(4)
    )

    # Labelled TSV with a given label set: ids follow the given order; replaced bytes are counted.
    sst = write(
        tmp_path / "sst.tsv",
        b"sentence\tlabel\n"
        + b"".join(
            f"review {i} is {'good' if i % 2 else 'bad'}\t{i % 2}\n".encode() for i in range(60)
        )
        + b"caf\xe9\t1\n",
    )
    cls = DataConfig(
        source="labelled",
        paths=[str(sst)],
        text_column="sentence",
        labels=["1", "0"],
        tasks=["classification"],
        tokenizer_path=reuse,
        encoding_errors="replace",
    )
    labelled = prepare(cls, tmp_path / "sst")
    assert labelled["sources"]["labelled"]["encoding_errors_replaced"] == 1
    assert read_manifest(tmp_path / "sst" / "classification")["labels"] == ["1", "0"]
    train = read_split(tmp_path / "sst" / "classification", "train").to_pylist()
    assert all(
        r["label"] == (0 if r["text"].endswith("good") or r["text"].startswith("caf") else 1)
        for r in train
    )

    # Bad input found inside a Ray task (pre-flight skipped): a one-line DataError naming file and line, and
    # nothing written.
    monkeypatch.setattr(prepare_module, "preflight", lambda cfg, inputs: None)
    de, en = (
        write(tmp_path / "pairs.de", "eins\nzwei\ndrei\n"),
        write(tmp_path / "pairs.en", "one\ntwo\n"),
    )
    bad_cases = [
        (
            DataConfig(**{**cls.to_dict(), "encoding_errors": "strict"}),
            rf"^{sst}:62: not valid UTF-8",
        ),
        (
            DataConfig(**{**cls.to_dict(), "labels": ["0"]}),
            rf"^{sst}:3: label '1' is not one of the given labels",
        ),
        (
            DataConfig(source="parallel", paths=[str(de), str(en)], tasks=["translation"]),
            rf"^{en}:3: file ends here but {de} has 3 lines \(parallel files must be line-aligned\)$",
        ),
    ]
    for cfg, message in bad_cases:
        with pytest.raises(DataError, match=message):
            prepare(cfg, tmp_path / "bad")
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "loaded",
        "pairs.de",
        "pairs.en",
        "sst",
        "sst.tsv",
        "trained",
        "wiki.txt.gz",
    ]  # no output, no temporary directory


@pytest.mark.e2e
def test_prepare_reads_a_saved_hugging_face_dataset(local_ray: None, tmp_path: Path) -> None:
    import datasets

    texts = [f"sample sentence number {i} {'!' * (i % 3)}" for i in range(50)]
    features = datasets.Features(
        {
            "sentence": datasets.Value("string"),
            "label": datasets.ClassLabel(names=["positive", "negative"]),
        }
    )
    ds = datasets.Dataset.from_dict(
        {"sentence": texts, "label": [i % 2 for i in range(50)]}, features=features
    )
    datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "saved"))
    cfg = DataConfig(
        source="hf",
        hf_name=str(tmp_path / "saved"),
        text_column="sentence",
        tasks=["classification"],
        tokenizer="char",
        vocab_size=64,
    )
    manifest = prepare(cfg, tmp_path / "out")
    assert manifest["inputs"]["label_names"] == {"label": ["positive", "negative"]}
    assert read_manifest(tmp_path / "out" / "classification")["labels"] == [
        "positive",
        "negative",
    ]  # ClassLabel order
    assert manifest["sources"]["labelled"]["rows_read"] == 50


# ------------------------------------------------------------------------------- driver side, no Ray


class _Batches:
    """Stands in for a Ray Dataset: `_collect` only iterates its batches."""

    def __init__(self, *batches: pa.Table) -> None:
        self.batches = batches

    def iter_batches(self, **kwargs: object) -> Iterator[pa.Table]:
        return iter(self.batches)


def _cleaned_batch(
    texts: list[str], drops: list[str], split: str = "train", error: str = ""
) -> pa.Table:
    return pa.table(
        {
            "text": texts,
            "origin": [f"f:{i}" for i in range(len(texts))],
            "replaced": [1] * len(texts),
            "error": [error] * len(texts),
            "drop": drops,
            "key": texts,
            "split": [split] * len(texts),
        }
    )


def test_collect_keeps_first_occurrences_and_counts_every_drop() -> None:
    cfg = DataConfig(source="text", paths=["f"], tasks=["clm"])
    table, info, dropped = prepare_module._collect(
        _Batches(
            _cleaned_batch(["a", "b", "a", ""], ["", "", "", "empty"]),
            _cleaned_batch(["b", "c", "long"], ["", "", "too_long"], split="validation"),
        ),
        cfg,
        "documents",
    )
    assert table.column("text").to_pylist() == ["a", "b", "c"] and table.column_names == [
        "text",
        "origin",
        "split",
    ]
    assert dropped == {"empty": 1, "too_short": 0, "too_long": 1, "duplicate": 2}
    assert info == {
        "rows_read": 7,
        "kept": 3,
        "splits": {"train": 2, "validation": 1, "test": 0},
        "encoding_errors_replaced": 7,
    }
    with pytest.raises(DataError, match=r"^f.txt:3: broken$"):
        prepare_module._collect(
            _Batches(_cleaned_batch(["a"], [""], error="f.txt:3: broken")), cfg, "documents"
        )
    with pytest.raises(DataError, match=r"^min_chars: all 1 documents rows were dropped"):
        prepare_module._collect(_Batches(_cleaned_batch([""], ["empty"])), cfg, "documents")


def test_label_names_given_from_classlabel_or_inferred() -> None:
    table = pa.table({"label": ["10", "2", "2"], "origin": ["f:1", "f:2", "f:3"]})
    infer = DataConfig(source="labelled", paths=["f"], tasks=["classification"])
    assert prepare_module._label_names(infer, {}, table) == [
        "2",
        "10",
    ]  # numeric order for integer labels
    given = DataConfig(
        source="labelled", paths=["f"], tasks=["classification"], labels=["10", "2", "7"]
    )
    assert prepare_module._label_names(given, {}, table) == ["10", "2", "7"]
    assert prepare_module._label_names(infer, {"label_names": {"label": ["2", "10"]}}, table) == [
        "2",
        "10",
    ]
    with pytest.raises(
        DataError, match=r"^f:1: label '10' is not one of the given labels \['2'\] \(labels\)$"
    ):
        prepare_module._label_names(infer, {"label_names": {"label": ["2"]}}, table)


@pytest.mark.e2e
def test_prepare_reads_tatoeba_columns_by_index_with_plain_bpe(
    local_ray: None, tmp_path: Path
) -> None:
    # The current Tatoeba release: english<TAB>other<TAB>attribution, no header; ko -> en is columns 1 -> 0.
    lines = (
        f"I see {i} cats.\t고양이 {i} 마리가 보여요.\tCC-BY 2.0 (France) #{i}\n" for i in range(200)
    )
    tatoeba = write(tmp_path / "kor.txt", "".join(lines))
    cfg = DataConfig(
        source="parallel",
        paths=[str(tatoeba)],
        src_column=1,
        tgt_column=0,
        tasks=["translation"],
        tokenizer="plain_bpe",
        vocab_size=200,
        validation_fraction=0.1,
        test_fraction=0.1,
    )
    manifest = prepare(cfg, tmp_path / "ko-en")
    assert (
        manifest["sources"]["pairs"]["rows_read"] == 200
        and manifest["tokenizer"]["kind"] == "plain_bpe"
    )
    tok = load_tokenizer(tmp_path / "ko-en" / "tokenizer.json")
    eos = manifest["special_tokens"]["[EOS]"]
    for row in read_split(tmp_path / "ko-en" / "translation", "train").to_pylist():
        assert row["src_text"].startswith("고양이") and row["tgt_text"].startswith("I see")
        assert (
            tok.decode(row["src_ids"][:-1]) == row["src_text"] and row["src_ids"][-1] == eos
        )  # exact round trip
