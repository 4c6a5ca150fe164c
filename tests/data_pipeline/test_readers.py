"""File readers: every format, every documented bad input as a one-line DataError naming file and line (no Ray)."""

from __future__ import annotations

import gzip
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from data_pipeline_testlib import write

from data_pipeline.errors import DataError
from data_pipeline.readers import (
    ReadOptions,
    detokenize_wikitext,
    file_format,
    file_rows,
    iter_lines,
    text_documents,
)

WIKI = """ = Alpha =

 Alpha is a letter .
 It comes first .
 = not a heading = (no blank line before it)

 = = History = =

 Old .

 = Beta =

 Beta follows .
""".replace("(no blank line before it)", "")


def docs(path: Path, **kw: object) -> list[tuple[str, str]]:
    """(text, origin line) of each document."""
    found = text_documents(str(path), ReadOptions("documents", **kw))
    return [(r["text"], r["origin"].rsplit(":", 1)[1]) for r in found]


def rows(path: Path, kind: str, partner: Path | None = None, **kw: object) -> list[dict]:
    return list(file_rows(str(path), str(partner or ""), ReadOptions(kind, **kw)))


# ------------------------------------------------------------------------------------------ plain text


def test_wikitext_detokenized_to_running_text() -> None:
    raw = (
        " The game 's score , 1 @,@ 000 km ( 620 mi ) , was n't \" good \" : the players ' kit @-@ bag "
        "cost 5 @.@ 5 % . \n = = History = = "
    )
    assert detokenize_wikitext(raw) == (
        "The game's score, 1,000 km (620 mi), wasn't \"good\": the players' kit-bag cost 5.5%.\n== History =="
    )
    assert detokenize_wikitext("Already plain, text.") == "Already plain, text."


def test_wikitext_detokenize_rewrites_documents_of_every_format(tmp_path: Path) -> None:
    path = write(tmp_path / "wiki.txt", WIKI)
    texts = [
        r["text"]
        for r in rows(
            path, "documents", text_unit="file", wikitext_headings=True, wikitext_detokenize=True
        )
    ]
    assert texts == [
        "= Alpha =\nAlpha is a letter.\nIt comes first.\n= not a heading =\n== History ==\nOld.",
        "= Beta =\nBeta follows.",
    ]
    jsonl = write(tmp_path / "w.jsonl", '{"text": "a word , then . "}\n')
    assert [r["text"] for r in rows(jsonl, "documents", wikitext_detokenize=True)] == [
        "a word, then."
    ]


def test_text_units_file_line_and_block(tmp_path: Path) -> None:
    path = write(
        tmp_path / "a.txt", "\nFirst line.\nSecond line.\n\n\n  \nOther doc.\r\nIts end.\n"
    )
    assert docs(path) == [("First line.\nSecond line.", "2"), ("Other doc.\nIts end.", "7")]
    assert docs(path, text_unit="line") == [
        ("First line.", "2"),
        ("Second line.", "3"),
        ("Other doc.", "7"),
        ("Its end.", "8"),
    ]
    assert docs(path, text_unit="file") == [
        ("First line.\nSecond line.\nOther doc.\nIts end.", "2")
    ]


def test_wikitext_headings_start_articles(tmp_path: Path) -> None:
    path = write(tmp_path / "wiki.txt", WIKI)
    articles = docs(path, text_unit="file", wikitext_headings=True)
    assert articles == [
        (
            " = Alpha =\n Alpha is a letter .\n It comes first .\n = not a heading = \n = = History = =\n"
            " Old .",
            "1",
        ),
        (" = Beta =\n Beta follows .", "11"),
    ]
    # Blocks: a heading keeps the block after it (not a document of its own); level 2 headings do not split.
    assert docs(path, text_unit="block", wikitext_headings=True) == [
        (" = Alpha =\n Alpha is a letter .\n It comes first .\n = not a heading = ", "1"),
        (" = = History = =", "7"),
        (" Old .", "9"),
        (" = Beta =\n Beta follows .", "11"),
    ]
    assert len(docs(path, text_unit="file")) == 1  # off by default


def test_gzip_bom_and_crlf_are_read(tmp_path: Path) -> None:
    path = write(tmp_path / "a.txt.gz", "\ufeffÉté\r\n\r\nhiver\n", gz=True)
    assert docs(path) == [("Été", "1"), ("hiver", "3")]


def test_gzip_data_under_a_plain_name_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path / "corpus.txt", "hello\n", gz=True)
    with pytest.raises(
        DataError,
        match=rf"^{path}:1: gzip-compressed data but the name does not end in .gz; "
        rf"rename it to {path}.gz or decompress it$",
    ):
        docs(path)
    fake = write(tmp_path / "fake.txt.gz", "plain text\n")
    with pytest.raises(
        DataError, match=rf"^{fake}:1: the name ends in .gz but the file is not gzip data$"
    ):
        docs(fake)
    data = gzip.compress("".join(f"line {i}\n" for i in range(10000)).encode())
    truncated = write(tmp_path / "cut.txt.gz", data[: len(data) // 2])
    with pytest.raises(DataError, match=rf"^{truncated}:\d+: cannot read \("):
        docs(truncated)


@pytest.mark.parametrize("content", [b"", b" \n\n\t\n"])
def test_empty_file_is_an_error(tmp_path: Path, content: bytes) -> None:
    path = write(tmp_path / "empty.txt", content)
    with pytest.raises(DataError, match=rf"^{path}: file is empty$"):
        docs(path)


def test_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(
        DataError, match=rf"^{tmp_path}/gone.txt: cannot read \(No such file or directory\)$"
    ):
        docs(tmp_path / "gone.txt")


def test_non_utf8_is_an_error_or_counted_when_replaced(tmp_path: Path) -> None:
    path = write(tmp_path / "latin1.txt", b"ok\nalso ok\ncaf\xe9 cr\xe8me\n\nnext\n")
    with pytest.raises(
        DataError,
        match=rf"^{path}:3: not valid UTF-8 \(byte 0xe9 at column 4\); fix the file "
        r"or set encoding_errors: replace$",
    ):
        docs(path)
    replaced = list(text_documents(str(path), ReadOptions("documents", encoding_errors="replace")))
    assert [(r["text"], r["replaced"]) for r in replaced] == [
        ("ok\nalso ok\ncaf\ufffd cr\ufffdme", 1),
        ("next", 0),
    ]
    assert [bad for _, _, bad in iter_lines(str(path), "replace")] == [0, 0, 1, 0, 0]


# ---------------------------------------------------------------------------------------------- pairs


def test_tsv_pairs_positional_or_by_header(tmp_path: Path) -> None:
    plain = write(tmp_path / "pairs.txt", "one\tun\n\ntwo\tdeux\n")
    assert [(r["src"], r["tgt"], r["origin"]) for r in rows(plain, "pairs")] == [
        ("one", "un", f"{plain}:1"),
        ("two", "deux", f"{plain}:3"),
    ]
    named = write(tmp_path / "pairs.tsv", "id\tfr\ten\n1\tun\tone\n2\tdeux\ttwo\n")
    assert [
        (r["src"], r["tgt"]) for r in rows(named, "pairs", src_column="en", tgt_column="fr")
    ] == [("one", "un"), ("two", "deux")]


def test_tsv_wrong_column_count_names_the_line(tmp_path: Path) -> None:
    bad = write(tmp_path / "bad.tsv", "one\tun\ntwo\tdeux\textra\n")
    with pytest.raises(
        DataError, match=rf"^{bad}:2: expected 2 tab-separated columns \(source, target\), found 3$"
    ):
        rows(bad, "pairs")
    named = write(tmp_path / "named.tsv", "en\tfr\none\tun\n\ntwo\n")
    with pytest.raises(DataError, match=rf"^{named}:4: expected 2 tab-separated columns, found 1$"):
        rows(named, "pairs", src_column="en", tgt_column="fr")


def test_column_indices_read_header_less_tsv_such_as_tatoeba(tmp_path: Path) -> None:
    # The current Tatoeba release: english<TAB>other<TAB>attribution, no header; ko -> en is columns 1 -> 0.
    tatoeba = write(
        tmp_path / "kor.txt",
        "Hi.\t안녕.\tCC-BY 2.0 (France) #1 (a) & #2 (b)\n\n"
        "Run!\t뛰어!\tCC-BY 2.0 (France) #3 (c) & #4 (d)\n",
    )
    assert [
        (r["src"], r["tgt"], r["origin"])
        for r in rows(tatoeba, "pairs", src_column=1, tgt_column=0)
    ] == [("안녕.", "Hi.", f"{tatoeba}:1"), ("뛰어!", "Run!", f"{tatoeba}:3")]
    tsv = write(
        tmp_path / "pairs.tsv", "en\tfr\none\tun\n"
    )  # a .tsv with indices has no header either
    assert [(r["src"], r["tgt"]) for r in rows(tsv, "pairs", src_column=0, tgt_column=1)] == [
        ("en", "fr"),
        ("one", "un"),
    ]


def test_column_index_out_of_range_or_width_change_names_file_and_line(tmp_path: Path) -> None:
    two = write(tmp_path / "two.txt", "\nHi.\tSalut.\n")
    with pytest.raises(
        DataError,
        match=rf"^{two}:2: src_column 2 is out of range: the line has 2 tab-separated "
        r"columns \(indices 0-1\)$",
    ):
        rows(two, "pairs", src_column=2, tgt_column=0)
    ragged = write(tmp_path / "ragged.txt", "Hi.\tSalut.\tCC-BY\nRun!\tCours !\n")
    with pytest.raises(
        DataError, match=rf"^{ragged}:2: expected 3 tab-separated columns, found 2$"
    ):
        rows(ragged, "pairs", src_column=1, tgt_column=0)
    csv_file = write(tmp_path / "p.csv", "en,fr\none,un\n")
    with pytest.raises(
        DataError,
        match=rf"^src_column: column indices \(1, 0\) are for header-less tab-separated "
        rf"files, but {csv_file} is csv; name the columns instead$",
    ):
        rows(csv_file, "pairs", src_column=1, tgt_column=0)


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("p.csv", 'en,fr\none,un\n"two, too",deux\n'),
        ("p.jsonl", '{"en": "one", "fr": "un"}\n{"en": "two, too", "fr": "deux"}\n'),
    ],
)
def test_named_pairs_in_csv_and_jsonl(tmp_path: Path, name: str, content: str) -> None:
    path = write(tmp_path / name, content)
    assert [
        (r["src"], r["tgt"]) for r in rows(path, "pairs", src_column="en", tgt_column="fr")
    ] == [("one", "un"), ("two, too", "deux")]
    with pytest.raises(
        DataError, match=r"^src_column: .* pairs need both src_column and tgt_column"
    ):
        rows(path, "pairs")


def test_aligned_files_pair_lines_and_must_have_equal_counts(tmp_path: Path) -> None:
    src = write(tmp_path / "train.de", "eins\nzwei\n\ndrei\n")
    tgt = write(tmp_path / "train.en", "one\ntwo\n\nthree\n")
    assert [(r["src"], r["tgt"], r["origin"]) for r in rows(src, "pairs", tgt)] == [
        ("eins", "one", f"{src}:1"),
        ("zwei", "two", f"{src}:2"),
        ("drei", "three", f"{src}:4"),
    ]
    short = write(tmp_path / "short.en", "one\ntwo\n")
    with pytest.raises(
        DataError, match=rf"^{short}:3: file ends here but {src} has 4 lines \(parallel files must"
    ):
        rows(src, "pairs", short)
    with pytest.raises(DataError, match=rf"^{short}:3: file ends here but {src} has 4 lines"):
        rows(short, "pairs", src)  # the shorter file is named whichever side it is on


# ------------------------------------------------------------------------------------------- labelled


def _parquet(path: Path, table: pa.Table) -> Path:
    pq.write_table(table, path)
    return path


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("data.tsv", 'label\tsentence\npos\tgood film\nneg\tbad "quoted" film\n'),
        (
            "data.txt",
            'label\tsentence\npos\tgood film\nneg\tbad "quoted" film\n',
        ),  # other names read as TSV
        ("data.csv", 'sentence,label\ngood film,pos\n"bad ""quoted"" film",neg\n'),
        (
            "data.jsonl",
            '{"sentence": "good film", "label": "pos"}\n\n'
            '{"sentence": "bad \\"quoted\\" film", "label": "neg"}\n',
        ),
        (
            "data.parquet",
            pa.table({"sentence": ["good film", 'bad "quoted" film'], "label": ["pos", "neg"]}),
        ),
    ],
)
def test_labelled_formats(tmp_path: Path, name: str, content: str | pa.Table) -> None:
    path = (
        _parquet(tmp_path / name, content)
        if isinstance(content, pa.Table)
        else write(tmp_path / name, content)
    )
    got = rows(path, "labelled", text_column="sentence")
    assert [(r["text"], r["label"]) for r in got] == [
        ("good film", "pos"),
        ('bad "quoted" film', "neg"),
    ]


def test_integer_labels_become_strings(tmp_path: Path) -> None:
    path = write(tmp_path / "d.jsonl", '{"text": "a b", "label": 1}\n')
    assert rows(path, "labelled")[0]["label"] == "1"
    table = _parquet(
        tmp_path / "d.parquet", pa.table({"text": ["x"], "label": pa.array([3], pa.int64())})
    )
    assert rows(table, "labelled")[0]["label"] == "3"


def test_label_outside_the_given_set_names_file_and_line(tmp_path: Path) -> None:
    good = write(tmp_path / "good.tsv", "sentence\tlabel\ngood\t1\nbad\t 0\n")
    assert [
        r["label"] for r in rows(good, "labelled", text_column="sentence", labels=("0", "1"))
    ] == ["1", "0"]
    path = write(tmp_path / "sst.tsv", "sentence\tlabel\ngood\t1\nbad\t0\nodd\t2\n")
    with pytest.raises(
        DataError,
        match=rf"^{path}:4: label '2' is not one of the given labels \['0', '1'\] "
        r"\(labels\)$",
    ):
        rows(path, "labelled", text_column="sentence", labels=("0", "1"))


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        (
            "d.tsv",
            "sentence\tlabel\na\t0\nb\t1\textra\n",
            r":3: expected 2 tab-separated columns, found 3$",
        ),
        ("d.csv", "sentence,label\na,0\nb\n", r":3: expected 2 columns, found 1$"),
        ("d.csv", 'sentence,label\n"a,0\n', r":\d: malformed CSV"),
        (
            "d.tsv",
            "text\tlabel\na\t0\n",
            r":1: no column 'sentence' \(text_column\); the header has \['text', 'label'\]$",
        ),
        ("d.tsv", "sentence\tlabel\n\n", r": no rows \(only a header or blank lines\)$"),
        (
            "d.jsonl",
            '{"sentence": "a", "label": 0}\n{"sentence": "b", label: 1}\n',
            r":2: invalid JSON",
        ),
        ("d.jsonl", '{"sentence": "a"}\n', r":1: missing key 'label' \(label_column\)$"),
        (
            "d.jsonl",
            '{"sentence": "a", "label": null}\n',
            r":1: the label must be a non-empty string or an integer",
        ),
        (
            "d.jsonl",
            '{"sentence": 7, "label": 1}\n',
            r":1: column 'sentence' \(text_column\) must hold text, found int",
        ),
        ("d.jsonl", '["a", 0]\n', r":1: expected a JSON object, found list$"),
    ],
)
def test_labelled_errors_name_file_and_line(
    tmp_path: Path, name: str, content: str, message: str
) -> None:
    path = write(tmp_path / name, content)
    with pytest.raises(DataError, match=f"^{path}{message}"):
        rows(path, "labelled", text_column="sentence")


def test_parquet_errors_name_the_file(tmp_path: Path) -> None:
    path = _parquet(tmp_path / "d.parquet", pa.table({"body": ["x"], "label": ["a"]}))
    with pytest.raises(
        DataError, match=rf"^{path}: no column 'text' \(text_column\); it has \['body', 'label'\]$"
    ):
        rows(path, "labelled")
    broken = write(tmp_path / "broken.parquet", "not parquet at all\n")
    with pytest.raises(DataError, match=rf"^{broken}: not a readable Parquet file"):
        rows(broken, "labelled")


# ---------------------------------------------------------------------------------- documents in tables


def test_documents_from_table_formats_and_nulls(tmp_path: Path) -> None:
    jsonl = write(tmp_path / "d.jsonl.gz", '{"body": "first doc"}\n{"body": null}\n', gz=True)
    assert [(r["text"], r["origin"]) for r in rows(jsonl, "documents", text_column="body")] == [
        ("first doc", f"{jsonl}:1"),
        ("", f"{jsonl}:2"),
    ]  # null reads as empty: cleaning drops and counts it
    table = pa.table({"meta": [{"title": "T", "body": "struct text"}]})
    nested = _parquet(tmp_path / "n.parquet", table)
    assert [r["text"] for r in rows(nested, "documents", text_column="meta.body")] == [
        "struct text"
    ]
    csv_path = write(tmp_path / "d.csv", 'id,body\n1,"two\nlines"\n2,after\n')
    assert [(r["text"], r["origin"]) for r in rows(csv_path, "documents", text_column="body")] == [
        ("two\nlines", f"{csv_path}:2"),
        ("after", f"{csv_path}:4"),
    ]


def test_file_format_looks_through_gz() -> None:
    assert [
        file_format(p) for p in ("a.JSONL.gz", "b.csv", "c.tsv.gz", "d.parquet", "e.txt.gz", "f")
    ] == ["jsonl", "csv", "tsv", "parquet", "text", "text"]
