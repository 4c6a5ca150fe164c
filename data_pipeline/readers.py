"""Readers: one input file (or a line-aligned pair of files) -> raw rows of one kind, streamed.

Pure Python, no Ray: `sources.py` runs these inside Ray Data tasks, and the tests call them directly.
Every row is a dict of the kind's fields (`KIND_FIELDS`) plus `origin` ("path:line" of its first line)
and `replaced` (how many of its lines had undecodable bytes replaced, under `encoding_errors: replace`).
Every bad input raises a one-line `DataError` that starts with "path:line: " (or "path: " when the
whole file is at fault), so a user can go straight to the culprit.

Formats, by file name (a trailing .gz is looked through, except for Parquet):
    .jsonl .json   one JSON object per line          columns are keys
    .csv           comma-separated, header row       columns are header names; quoted fields may span lines
    .tsv           tab-separated, header row         no header for pairs without src/tgt_column (2 columns)
                                                     or with column indices (src_column: 1, tgt_column: 0)
    .parquet       Parquet                           the number in messages is the row (1-based)
    anything else  plain text: documents by `text_unit`; pairs and labelled rows as .tsv
"""

from __future__ import annotations

import csv
import gzip
import json
import re
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import islice
from typing import IO

import pyarrow as pa
import pyarrow.parquet as pq

from data_pipeline.config import DataConfig
from data_pipeline.errors import DataError
from data_pipeline.storage import is_remote, open_input, resolve

KIND_FIELDS: dict[str, tuple[str, ...]] = {
    "documents": ("text",),
    "pairs": ("src", "tgt"),
    "labelled": ("text", "label"),
}
TABULAR: dict[str, str] = {
    ".jsonl": "jsonl",
    ".json": "jsonl",
    ".csv": "csv",
    ".tsv": "tsv",
    ".parquet": "parquet",
}
GZIP_MAGIC = b"\x1f\x8b"
# A WikiText level-1 heading: " = Title = ". Level 2 and deeper (" = = Section = = ") do not match.
_HEADING = re.compile(r"^\s*=\s+(?!=)\S.*?(?<!=)\s+=\s*$")
# WikiText's tokenised text back to running text, line by line (after lm-evaluation-harness's
# `wikitext_detokenizer`): " @-@ " joins, punctuation and clitics reattach, brackets and quotes close up. A byte-level
# BPE sees " ." and "." as different tokens, so a model pretrained on the spaced form meets unseen tokens in
# ordinary text (and vice versa).
_WIKITEXT_RULES = [
    (re.compile(r" @([-,.])@ "), r"\1"),  # 1 @,@ 000 -> 1,000; well @-@ known -> well-known
    (
        re.compile(r" (n't|'s|'re|'ve|'ll|'d|'m)\b"),
        r"\1",
    ),  # do n't -> don't; the game 's -> the game's
    (re.compile(r"(\w)s ' "), r"\1s' "),  # the players ' -> the players'
    (re.compile(r" ([.,;:!?%])(?= |$)"), r"\1"),  # word , -> word,
    (re.compile(r"([(\[{]) "), r"\1"),  # ( 620 mi ) -> (620 mi)
    (re.compile(r" ([)\]}])"), r"\1"),
    (re.compile(r'" ([^"]*?) "'), r'"\1"'),  # " quoted " -> "quoted"
    (re.compile(r"= = = ="), "===="),  # heading markers: = = Section = = -> == Section ==
    (re.compile(r"= = ="), "==="),
    (re.compile(r"= ="), "=="),
]


def detokenize_wikitext(text: str) -> str:
    """WikiText's space-separated tokens as running text, each line stripped (see _WIKITEXT_RULES)."""
    lines = []
    for line in text.split("\n"):
        for pattern, repl in _WIKITEXT_RULES:
            line = pattern.sub(repl, line)
        lines.append(line.strip())
    return "\n".join(lines)


@dataclass(frozen=True)
class ReadOptions:
    """What a reader needs from `DataConfig`, small enough to ship to every Ray task."""

    kind: str  # "documents" | "pairs" | "labelled"
    text_unit: str = "block"
    wikitext_headings: bool = False
    encoding_errors: str = "strict"
    text_column: str = "text"
    label_column: str = "label"
    src_column: str | int | None = (
        None  # a header name, or a 0-based index into a header-less TSV line
    )
    tgt_column: str | int | None = None
    labels: tuple[str, ...] | None = None  # the allowed labels; None: any (the set is inferred)
    wikitext_detokenize: bool = False  # documents: WikiText's spaced tokens back to running text

    @classmethod
    def from_config(cls, cfg: DataConfig, kind: str) -> ReadOptions:
        return cls(
            kind,
            cfg.text_unit,
            cfg.wikitext_headings,
            cfg.encoding_errors,
            cfg.text_column,
            cfg.label_column,
            cfg.src_column,
            cfg.tgt_column,
            tuple(cfg.labels) if cfg.labels else None,
            wikitext_detokenize=cfg.wikitext_detokenize,
        )

    def columns(self, fmt: str, path: str = "") -> Columns | None:
        """Config key -> column name (or index), in KIND_FIELDS order; None: two positional columns
        (pairs in header-less TSV)."""
        if self.kind == "documents":
            return {"text_column": self.text_column}
        if self.kind == "labelled":
            return {"text_column": self.text_column, "label_column": self.label_column}
        if self.src_column is None and self.tgt_column is None and fmt in ("tsv", "text"):
            return None
        if self.src_column is None or self.tgt_column is None:
            raise DataError(
                f"src_column: {fmt} pairs need both src_column and tgt_column "
                f"(got {self.src_column!r}, {self.tgt_column!r})"
            )
        if isinstance(self.src_column, int) and fmt not in ("tsv", "text"):
            where = f"{path} is {fmt}" if path else f"the input is {fmt}"
            raise DataError(
                f"src_column: column indices ({self.src_column}, {self.tgt_column}) are for "
                f"header-less tab-separated files, but {where}; name the columns instead"
            )
        return {"src_column": self.src_column, "tgt_column": self.tgt_column}


def file_format(path: str) -> str:
    """ "jsonl" | "csv" | "tsv" | "parquet" | "text", from the name (.gz looked through)."""
    name = path.lower().removesuffix(".gz")
    return next((fmt for suffix, fmt in TABULAR.items() if name.endswith(suffix)), "text")


# ---------------------------------------------------------------------------------------------- lines


def _open_binary(path: str) -> IO[bytes]:
    """The file's bytes (a local path or a URI), decompressed when the name ends in .gz; gzip data
    under another name is refused."""
    try:
        with open_input(path) as f:
            magic = f.read(2)
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from None
    if path.endswith(".gz"):
        if magic != GZIP_MAGIC:
            raise DataError(f"{path}:1: the name ends in .gz but the file is not gzip data")
        return _Gunzip(open_input(path))
    if magic == GZIP_MAGIC:
        # Read as text this would be a stream of undecodable bytes; say what it is instead.
        raise DataError(
            f"{path}:1: gzip-compressed data but the name does not end in .gz; "
            f"rename it to {path}.gz or decompress it"
        )
    return open_input(path)


class _Gunzip(gzip.GzipFile):
    """gzip over a stream it owns: closing it closes the stream (GzipFile leaves a fileobj open)."""

    def __init__(self, raw: IO[bytes]) -> None:
        super().__init__(fileobj=raw, mode="rb")
        self._raw = raw

    def close(self) -> None:
        try:
            super().close()
        finally:
            self._raw.close()


def iter_lines(path: str, encoding_errors: str = "strict") -> Iterator[tuple[int, str, int]]:
    """(line number, line without its end, 1 if undecodable bytes were replaced else 0), streamed.

    Lines split on "\\n" only (str.splitlines() also splits on \\x0b, \\u2028 ..., which would shift line
    numbers); a UTF-8 byte-order mark is dropped. A file with no visible character is an error.
    """
    seen_text, number = False, 0
    try:
        with _open_binary(path) as f:
            for number, raw in enumerate(f, start=1):
                raw = raw.rstrip(b"\r\n")
                if number == 1:
                    raw = raw.removeprefix(b"\xef\xbb\xbf")
                try:
                    line, bad = raw.decode("utf-8"), 0
                except UnicodeDecodeError as e:
                    if encoding_errors != "replace":
                        raise DataError(
                            f"{path}:{number}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at column "
                            f"{e.start + 1}); fix the file or set encoding_errors: replace"
                        ) from None
                    line, bad = raw.decode("utf-8", errors="replace"), 1
                seen_text = seen_text or not line.isspace() and line != ""
                yield number, line, bad
    except (OSError, EOFError, zlib.error) as e:  # a truncated or corrupt .gz
        raise DataError(f"{path}:{number + 1}: cannot read ({e})") from None
    if not seen_text:
        raise DataError(f"{path}: file is empty")


# ------------------------------------------------------------------------------------------ documents


def text_documents(path: str, opts: ReadOptions) -> Iterator[dict]:
    """Plain text -> documents: the whole file, each non-blank line, or each blank-line-separated block.

    With `wikitext_headings` a level-1 heading line (" = Title = ", after a blank line or first in the
    file) also starts a document and belongs to it: in block mode the blank line after a heading does
    not end the document.
    """
    lines: list[str] = []
    start = replaced = 0
    only_headings, after_blank = False, True
    for number, line, bad in iter_lines(path, opts.encoding_errors):
        blank = line == "" or line.isspace()
        # WikiText puts a blank line before every heading; a table row such as " = Played , W = " has none.
        heading = (
            opts.wikitext_headings
            and after_blank
            and not blank
            and _HEADING.match(line) is not None
        )
        after_blank = blank
        boundary = (
            heading
            or (opts.text_unit == "line" and not blank)
            or (opts.text_unit == "block" and blank and not only_headings)
        )
        if boundary and lines:
            yield {"text": "\n".join(lines), "origin": f"{path}:{start}", "replaced": replaced}
            lines, start, replaced = [], 0, 0
        if not blank:
            only_headings = heading and (only_headings or not lines)
            lines.append(line)
            start = start or number
        replaced += bad
    if lines:
        yield {"text": "\n".join(lines), "origin": f"{path}:{start}", "replaced": replaced}


# --------------------------------------------------------------------------------------------- pairs


def aligned_pairs(src_path: str, tgt_path: str, opts: ReadOptions) -> Iterator[dict]:
    """Two line-aligned files (source side, target side); lines blank on both sides are skipped."""
    src = iter_lines(src_path, opts.encoding_errors)
    tgt = iter_lines(tgt_path, opts.encoding_errors)
    for s in src:
        t = next(tgt, None)
        if t is None:
            _misaligned(tgt_path, s[0], src_path, s[0] + sum(1 for _ in src))
        if s[1].strip() or t[1].strip():
            yield {
                "src": s[1],
                "tgt": t[1],
                "origin": f"{src_path}:{s[0]}",
                "replaced": s[2] + t[2],
            }
    rest = sum(1 for _ in tgt)
    if rest:
        _misaligned(src_path, s[0] + 1, tgt_path, s[0] + rest)


def _misaligned(short: str, line: int, long_: str, long_lines: int) -> None:
    raise DataError(
        f"{short}:{line}: file ends here but {long_} has {long_lines} lines "
        "(parallel files must be line-aligned)"
    )


# ------------------------------------------------------------------------------------------- records

# config key ("text_column", ...) -> column name, in the order values come back; an int is a 0-based
# column index into a header-less TSV line (src_column / tgt_column only)
Columns = dict[str, str | int]
Record = tuple[int, list[object], int]  # (line or row number, values, lines with replaced bytes)


def file_rows(path: str, partner: str, opts: ReadOptions) -> Iterator[dict]:
    """Raw rows of one file (or of a line-aligned pair when `partner` names the target-side file)."""
    for row in _file_rows(path, partner, opts):
        if opts.wikitext_detokenize:  # documents only (DataConfig checks)
            row = {**row, "text": detokenize_wikitext(row["text"])}
        yield row


def _file_rows(path: str, partner: str, opts: ReadOptions) -> Iterator[dict]:
    if partner:
        yield from aligned_pairs(path, partner, opts)
        return
    fmt = file_format(path)
    if opts.kind == "documents" and fmt == "text":
        yield from text_documents(path, opts)
        return
    columns = opts.columns(fmt, path)
    for number, values, bad in records(path, fmt, columns, opts.encoding_errors):
        yield make_row(path, number, values, bad, opts, columns)


def check_file(path: str, partner: str, opts: ReadOptions, limit: int | None = None) -> int:
    """Parse a file (or an aligned pair) as `file_rows` does, keeping nothing; the rows checked.

    The driver's pre-flight check before Ray starts: every DataError the Ray tasks would raise, it raises.
    Plain-text documents are checked line by line (one document may be a whole file, text_unit: file), so
    memory stays flat whatever the size; `limit` stops after that many rows (lines).
    """
    if not partner and opts.kind == "documents" and file_format(path) == "text":
        rows: Iterator[object] = iter_lines(path, opts.encoding_errors)
    else:
        rows = file_rows(path, partner, opts)
    try:
        return sum(1 for _ in islice(rows, limit))
    finally:
        rows.close()  # type: ignore[attr-defined]  # a generator: closes the file when stopped early


def make_row(
    path: str,
    number: int,
    values: list[object],
    replaced: int,
    opts: ReadOptions,
    columns: Columns | None,
) -> dict:
    """A raw row from a record's values; text must be a string (null reads as empty and is dropped later)."""
    keys = list(columns) if columns else ["column 1", "column 2"]
    row: dict[str, object] = {}
    for field, key, value in zip(KIND_FIELDS[opts.kind], keys, values, strict=True):
        if field == "label":
            row[field] = check_label(path, number, value, opts.labels)
        elif value is None or isinstance(value, str):
            row[field] = value or ""
        else:
            name = columns[key] if columns else key
            raise DataError(
                f"{path}:{number}: column {name!r} ({key}) must hold text, "
                f"found {type(value).__name__} {repr(value)[:80]}"
            )
    return {**row, "origin": f"{path}:{number}", "replaced": replaced}


def check_label(path: str, number: int, label: object, allowed: tuple[str, ...] | None) -> str:
    """The label as a string (spaces normalised, as cleaning does); with a given set it must be in it."""
    if isinstance(label, bool) or not isinstance(label, (str, int)) or not str(label).strip():
        raise DataError(
            f"{path}:{number}: the label must be a non-empty string or an integer, found {label!r}"
        )
    name = " ".join(str(label).split())
    if allowed is not None and name not in allowed:
        raise DataError(
            f"{path}:{number}: label {name!r} is not one of the given labels {list(allowed)} (labels)"
        )
    return name


def records(
    path: str, fmt: str, columns: Columns | None, encoding_errors: str = "strict"
) -> Iterator[Record]:
    """The records of a tabular file, with the values of `columns`; None columns: 2 positional columns."""
    readers: dict[str, Callable[[str, Columns | None, str], Iterator[Record]]] = {
        "jsonl": _jsonl_records,
        "csv": _csv_records,
        "tsv": _tsv_records,
        "text": _tsv_records,
        "parquet": _parquet_records,
    }
    found = False
    for record in readers[fmt](path, columns, encoding_errors):
        found = True
        yield record
    if not found:
        raise DataError(f"{path}: no rows (only a header or blank lines)")


def _jsonl_records(path: str, columns: Columns | None, errors: str) -> Iterator[Record]:
    columns = columns or {}
    for number, line, bad in iter_lines(path, errors):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(
                f"{path}:{number}: invalid JSON ({e.msg} at column {e.colno})"
            ) from None
        if not isinstance(obj, dict):
            raise DataError(f"{path}:{number}: expected a JSON object, found {type(obj).__name__}")
        for key, name in columns.items():
            if name not in obj:
                raise DataError(f"{path}:{number}: missing key {name!r} ({key})")
        yield number, [obj[name] for name in columns.values()], bad


def _csv_records(path: str, columns: Columns | None, errors: str) -> Iterator[Record]:
    replaced: list[int] = [
        0
    ]  # per physical line (1-based), so a record spanning lines counts them all

    def text_lines() -> Iterator[str]:
        for _, line, bad in iter_lines(path, errors):
            replaced.append(bad)
            yield line + "\n"  # csv needs the line ends to keep newlines inside quoted fields

    reader = csv.reader(text_lines(), strict=True)
    try:
        header = next(reader)
        index = _header_index(path, header, columns or {}, reader.line_num)
        for fields in reader:
            if not fields or fields == [""]:
                continue
            if len(fields) != len(header):
                raise DataError(
                    f"{path}:{reader.line_num}: expected {len(header)} columns, found {len(fields)}"
                )
            first = reader.line_num - sum(
                f.count("\n") for f in fields
            )  # where a multi-line record began
            yield first, [fields[i] for i in index], sum(replaced[first : reader.line_num + 1])
    except csv.Error as e:
        raise DataError(f"{path}:{reader.line_num}: malformed CSV ({e})") from None


def _tsv_records(path: str, columns: Columns | None, errors: str) -> Iterator[Record]:
    """Tab-separated, no quoting. `columns` None: no header, exactly 2 columns; column indices: no header,
    every line as wide as the first; column names: the first non-blank line is the header."""
    lines = iter_lines(path, errors)
    index: list[int] | None = None
    width: int | None = 2
    if columns is not None and all(isinstance(c, int) for c in columns.values()):
        index, width = [int(c) for c in columns.values()], None  # the first line sets the width
    elif columns is not None:
        for number, line, _ in lines:
            if line.strip():
                header = line.split("\t")
                index, width = _header_index(path, header, columns, number), len(header)
                break
    for number, line, bad in lines:
        if not line.strip():
            continue
        fields = line.split("\t")
        if width is None:
            width = _indexed_width(path, number, len(fields), columns or {})
        if len(fields) != width:
            what = (
                "tab-separated columns"
                if index is not None
                else "tab-separated columns (source, target)"
            )
            raise DataError(f"{path}:{number}: expected {width} {what}, found {len(fields)}")
        yield number, list(fields) if index is None else [fields[i] for i in index], bad


def _indexed_width(path: str, number: int, width: int, columns: Columns) -> int:
    """The first line's width, which every column index must fit (indices count from 0)."""
    for key, column in columns.items():
        if not isinstance(column, int) or column >= width:
            raise DataError(
                f"{path}:{number}: {key} {column} is out of range: the line has {width} "
                f"tab-separated columns (indices 0-{width - 1})"
            )
    return width


def _parquet_records(path: str, columns: Columns | None, errors: str) -> Iterator[Record]:
    try:
        fs, where = resolve(path) if is_remote(path) else (None, path)
        parquet = pq.ParquetFile(where, filesystem=fs)  # a URI: read by ranges, not fetched whole
    except (OSError, pa.ArrowException) as e:
        raise DataError(f"{path}: not a readable Parquet file ({str(e).splitlines()[0]})") from None
    names = arrow_columns(path, parquet.schema_arrow, columns or {})
    yield from arrow_records(
        parquet.iter_batches(batch_size=4096, columns=sorted({n.split(".")[0] for n in names})),
        names,
    )


def arrow_columns(path: str, schema: pa.Schema, columns: Columns) -> list[str]:
    """Check that every named column exists ("a.b": field b of struct column a); returns the names."""
    for key, name in columns.items():
        head = name if name in schema.names else name.split(".")[0]
        if head not in schema.names or (
            head != name and not pa.types.is_struct(schema.field(head).type)
        ):
            raise DataError(f"{path}: no column {name!r} ({key}); it has {schema.names}")
    return list(columns.values())


def arrow_records(
    batches: Iterator[pa.RecordBatch],
    names: list[str],
    label_names: dict[str, list[str]] | None = None,
) -> Iterator[Record]:
    """Rows of Arrow record batches (Parquet, Hugging Face Arrow files), numbered from 1.

    `label_names` maps a column of integer class ids to their names (a Hugging Face ClassLabel).
    """
    row = 0
    for batch in batches:
        values = [_arrow_column(batch, name) for name in names]
        for i, name in enumerate(names):
            if label_names and name in label_names:
                values[i] = [
                    v if v is None or not 0 <= v < len(label_names[name]) else label_names[name][v]
                    for v in values[i]
                ]
        for record in zip(*values, strict=True):
            row += 1
            yield row, list(record), 0


def _arrow_column(batch: pa.RecordBatch, name: str) -> list[object]:
    if name in batch.schema.names:
        return batch.column(name).to_pylist()
    head, _, field = name.partition(".")
    return [None if v is None else v.get(field) for v in batch.column(head).to_pylist()]


def _header_index(path: str, header: list[str], columns: Columns, line: int) -> list[int]:
    for key, name in columns.items():
        if name not in header:
            raise DataError(f"{path}:{line}: no column {name!r} ({key}); the header has {header}")
    return [header.index(name) for name in columns.values()]
