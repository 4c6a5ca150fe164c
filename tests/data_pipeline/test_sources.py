"""File sources: formats and the errors that name file and line (parse functions, no Ray)."""

from __future__ import annotations

from pathlib import Path

import pytest
from data_pipeline_testlib import write

from data_pipeline.errors import DataError
from data_pipeline.sources import (
    expand_paths,
    parse_aligned_pair,
    parse_labelled_file,
    parse_text_file,
    parse_tsv_pairs,
    read_lines,
)


def test_text_file_gives_one_document_per_blank_line_block(tmp_path: Path) -> None:
    path = write(tmp_path / "a.txt", "\nFirst line.\nSecond line.\n\n\n  \nOther doc.\r\nIts end.\n")
    rows = parse_text_file(str(path))
    assert rows == [{"text": "First line.\nSecond line.", "origin": f"{path}:2"},
                    {"text": "Other doc.\nIts end.", "origin": f"{path}:7"}]


def test_gzip_and_utf8_bom_are_read(tmp_path: Path) -> None:
    path = write(tmp_path / "a.txt.gz", "\ufeffÉté\n\nhiver\n", gz=True)
    assert [r["text"] for r in parse_text_file(str(path))] == ["Été", "hiver"]


def test_globs_and_directories_expand_sorted(tmp_path: Path) -> None:
    for name in ("b.txt", "a.txt", "sub/c.txt", ".hidden"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        write(tmp_path / name, "x\n")
    assert expand_paths([str(tmp_path / "*.txt")]) == [str(tmp_path / "a.txt"), str(tmp_path / "b.txt")]
    assert expand_paths([str(tmp_path)]) == [str(tmp_path / n) for n in ("a.txt", "b.txt", "sub/c.txt")]
    assert expand_paths([str(tmp_path / "b.txt"), str(tmp_path / "*.txt")]) == [
        str(tmp_path / "b.txt"), str(tmp_path / "a.txt")]  # no file twice


def test_missing_path_and_unmatched_glob_are_named(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=rf"^{tmp_path}/nope.txt: no such file or directory"):
        expand_paths([str(tmp_path / "nope.txt")])
    with pytest.raises(DataError, match=r"\*.tsv: no file matches"):
        expand_paths([str(tmp_path / "*.tsv")])


def test_empty_file_is_an_error(tmp_path: Path) -> None:
    path = write(tmp_path / "empty.txt", " \n\n")
    with pytest.raises(DataError, match=rf"^{path}: file is empty$"):
        parse_text_file(str(path))


def test_non_utf8_names_file_line_and_column(tmp_path: Path) -> None:
    path = write(tmp_path / "latin1.txt", b"ok\nalso ok\ncaf\xe9 cr\xe8me\n")
    with pytest.raises(DataError, match=rf"^{path}:3: not valid UTF-8 \(byte 0xe9 at column 4\)$"):
        read_lines(str(path))


def test_tsv_pairs_and_wrong_column_count(tmp_path: Path) -> None:
    good = write(tmp_path / "good.tsv", "one\tun\n\ntwo\tdeux\n")
    assert [(r["src"], r["tgt"], r["origin"]) for r in parse_tsv_pairs(str(good))] == [
        ("one", "un", f"{good}:1"), ("two", "deux", f"{good}:3")]
    bad = write(tmp_path / "bad.tsv", "one\tun\ntwo\tdeux\textra\n")
    with pytest.raises(DataError, match=rf"^{bad}:2: expected 2 tab-separated columns \(source, target\), found 3$"):
        parse_tsv_pairs(str(bad))


def test_aligned_files_must_have_equal_line_counts(tmp_path: Path) -> None:
    src = write(tmp_path / "train.en", "one\ntwo\nthree\n")
    tgt = write(tmp_path / "train.fr", "un\ndeux\ntrois\n")
    assert [(r["src"], r["tgt"]) for r in parse_aligned_pair(str(src), str(tgt))] == [
        ("one", "un"), ("two", "deux"), ("three", "trois")]
    short = write(tmp_path / "short.fr", "un\ndeux\n")
    with pytest.raises(DataError, match=rf"^{short}:3: file ends here but {src} has 3 lines"):
        parse_aligned_pair(str(src), str(short))


@pytest.mark.parametrize(("name", "content"), [
    ("data.tsv", "label\tsentence\npos\tgood film\nneg\tbad \"quoted\" film\n"),
    ("data.csv", 'sentence,label\ngood film,pos\n"bad ""quoted"" film",neg\n'),
    ("data.jsonl", '{"sentence": "good film", "label": "pos"}\n\n'
                   '{"sentence": "bad \\"quoted\\" film", "label": "neg"}\n'),
])
def test_labelled_formats(tmp_path: Path, name: str, content: str) -> None:
    path = write(tmp_path / name, content)
    rows = parse_labelled_file(str(path), text_column="sentence", label_column="label")
    assert [(r["text"], r["label"]) for r in rows] == [("good film", "pos"), ('bad "quoted" film', "neg")]


def test_integer_labels_from_jsonl_become_strings(tmp_path: Path) -> None:
    path = write(tmp_path / "d.jsonl", '{"text": "a b", "label": 1}\n')
    assert parse_labelled_file(str(path), "text", "label")[0]["label"] == "1"


@pytest.mark.parametrize(("name", "content", "message"), [
    ("d.tsv", "sentence\tlabel\na\t0\nb\t1\textra\n", r":3: expected 2 columns, found 3$"),
    ("d.csv", "sentence,label\na,0\nb\n", r":3: expected 2 columns, found 1$"),
    ("d.tsv", "text\tlabel\na\t0\n", r":1: no column 'sentence' \(text_column\)"),
    ("d.jsonl", '{"sentence": "a", "label": 0}\n{"sentence": "b", label: 1}\n', r":2: invalid JSON"),
    ("d.jsonl", '{"sentence": "a"}\n', r":1: missing key 'label' \(label_column\)"),
    ("d.jsonl", '{"sentence": "a", "label": null}\n', r":1: the label must be"),
    ("d.jsonl", '["a", 0]\n', r":1: expected a JSON object"),
])
def test_labelled_errors_name_file_and_line(tmp_path: Path, name: str, content: str, message: str) -> None:
    path = write(tmp_path / name, content)
    with pytest.raises(DataError, match=f"^{path}{message}"):
        parse_labelled_file(str(path), text_column="sentence", label_column="label")
