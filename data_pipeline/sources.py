"""Sources: where rows come from. Each yields `ray.data.Dataset`s of raw rows of one input kind.

Row kinds (every row also has `origin`, "file:line" or "sample:...", and `error`, "" unless the file
could not be parsed):
    documents  {"text"}          one document; segments (sentences, lines) separated by "\n"
    pairs      {"src", "tgt"}    a translation pair
    labelled   {"text", "label"} a text and its label as a string (ids are assigned after cleaning)

File parsing runs inside Ray tasks; a parse failure travels back as a row whose `error` holds the
one-line DataError message, because Ray re-wraps exceptions raised in tasks and loses their type.
`prepare()` re-raises it as a DataError on the driver.
"""

from __future__ import annotations

import csv
import glob
import gzip
import io
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import pyarrow as pa
import ray.data

from data_pipeline import sample
from data_pipeline.errors import DataError

if TYPE_CHECKING:
    from data_pipeline.config import DataConfig

KIND_FIELDS: dict[str, tuple[str, ...]] = {
    "documents": ("text",),
    "pairs": ("src", "tgt"),
    "labelled": ("text", "label"),
}
_GLOB_CHARS = frozenset("*?[")


@dataclass(frozen=True)
class Source:
    kinds: tuple[str, ...]  # the row kinds this source can supply
    read: Callable[[DataConfig, str], ray.data.Dataset]  # (config, kind) -> dataset of raw rows


# ---------------------------------------------------------------------------------------------- files


def expand_paths(patterns: list[str]) -> list[str]:
    """Files named by paths, directories (recursively, sorted) and globs; a pattern matching nothing is an error."""
    files: list[str] = []
    for pattern in patterns:
        if _GLOB_CHARS & set(pattern):
            matches = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
            if not matches:
                raise DataError(f"{pattern}: no file matches this pattern (paths)")
            files.extend(matches)
        elif os.path.isdir(pattern):
            found = sorted(os.path.join(d, f) for d, _, names in os.walk(pattern) for f in names
                           if not f.startswith("."))
            if not found:
                raise DataError(f"{pattern}: directory holds no files (paths)")
            files.extend(found)
        elif os.path.isfile(pattern):
            files.append(pattern)
        else:
            raise DataError(f"{pattern}: no such file or directory (paths)")
    return list(dict.fromkeys(files))  # de-duplicate, keep order


def read_lines(path: str) -> list[str]:
    """Lines of a UTF-8 text file (gzip if it ends in .gz); empty and undecodable files are errors."""
    try:
        with open(path, "rb") as f:
            data = f.read()
        if path.endswith(".gz"):
            data = gzip.decompress(data)
    except (OSError, EOFError) as e:
        raise DataError(f"{path}: cannot read ({e})") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        column = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise DataError(f"{path}:{line}: not valid UTF-8 (byte 0x{data[e.start]:02x} at column {column})") from None
    if not text.strip():
        raise DataError(f"{path}: file is empty")
    # Split on "\n" only: str.splitlines() also splits on \x0b, \x1c, \u2028 ..., which would shift line numbers.
    return text.removeprefix("\ufeff").replace("\r\n", "\n").replace("\r", "\n").split("\n")


def parse_text_file(path: str) -> list[dict[str, str]]:
    """One document per blank-line-separated block; each line is a segment."""
    rows, block, start = [], [], 0
    for number, line in enumerate([*read_lines(path), ""], start=1):
        if line.strip():
            start = start or number
            block.append(line)
        elif block:
            rows.append({"text": "\n".join(block), "origin": f"{path}:{start}"})
            block, start = [], 0
    return rows


def parse_tsv_pairs(path: str) -> list[dict[str, str]]:
    """`source<TAB>target` per line; blank lines are skipped."""
    rows = []
    for number, line in enumerate(read_lines(path), start=1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) != 2:
            raise DataError(f"{path}:{number}: expected 2 tab-separated columns (source, target), found {len(fields)}")
        rows.append({"src": fields[0], "tgt": fields[1], "origin": f"{path}:{number}"})
    return rows


def parse_aligned_pair(src_path: str, tgt_path: str) -> list[dict[str, str]]:
    """Two line-aligned files; lines blank on both sides are skipped."""
    src, tgt = _drop_final_newline(read_lines(src_path)), _drop_final_newline(read_lines(tgt_path))
    if len(src) != len(tgt):
        short, long_ = (src_path, tgt_path) if len(src) < len(tgt) else (tgt_path, src_path)
        raise DataError(f"{short}:{min(len(src), len(tgt)) + 1}: file ends here but {long_} has "
                        f"{max(len(src), len(tgt))} lines (parallel files must be line-aligned)")
    return [{"src": s, "tgt": t, "origin": f"{src_path}:{i}"}
            for i, (s, t) in enumerate(zip(src, tgt, strict=True), start=1) if s.strip() or t.strip()]


def parse_labelled_file(path: str, text_column: str, label_column: str) -> list[dict[str, str]]:
    """TSV (default), CSV (.csv) with a header row, or JSONL (.jsonl/.json) with one object per line."""
    name = path.removesuffix(".gz")
    if name.endswith((".jsonl", ".json")):
        return _parse_jsonl(path, text_column, label_column)
    dialect = {"delimiter": ","} if name.endswith(".csv") else {"delimiter": "\t", "quoting": csv.QUOTE_NONE}
    reader = csv.reader(io.StringIO("\n".join(read_lines(path))), **dialect)
    header = next(reader)
    columns = {}
    for key, column in (("text_column", text_column), ("label_column", label_column)):
        if column not in header:
            raise DataError(f"{path}:1: no column {column!r} ({key}); the header has {header}")
        columns[key] = header.index(column)
    rows = []
    for fields in reader:
        if not fields or fields == [""]:
            continue
        if len(fields) != len(header):
            raise DataError(f"{path}:{reader.line_num}: expected {len(header)} columns, found {len(fields)}")
        rows.append(_labelled_row(path, reader.line_num, fields[columns["text_column"]],
                                  fields[columns["label_column"]]))
    return rows


def _parse_jsonl(path: str, text_column: str, label_column: str) -> list[dict[str, str]]:
    rows = []
    for number, line in enumerate(read_lines(path), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{number}: invalid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(obj, dict):
            raise DataError(f"{path}:{number}: expected a JSON object, found {type(obj).__name__}")
        for key, column in (("text_column", text_column), ("label_column", label_column)):
            if column not in obj:
                raise DataError(f"{path}:{number}: missing key {column!r} ({key})")
        rows.append(_labelled_row(path, number, obj[text_column], obj[label_column]))
    return rows


def _labelled_row(path: str, number: int, text: object, label: object) -> dict[str, str]:
    if not isinstance(text, str):
        raise DataError(f"{path}:{number}: the text must be a string, found {type(text).__name__}")
    if isinstance(label, bool) or not isinstance(label, (str, int)) or not str(label).strip():
        raise DataError(f"{path}:{number}: the label must be a non-empty string or an integer, found {label!r}")
    return {"text": text, "label": str(label).strip(), "origin": f"{path}:{number}"}


def _drop_final_newline(lines: list[str]) -> list[str]:
    return lines[:-1] if lines and lines[-1] == "" else lines


# ------------------------------------------------------------------------------------------ datasets


def _parse_task(batch: dict, kind: str, text_column: str, label_column: str) -> pa.Table:
    """Ray UDF: parse the file(s) of one row; a DataError becomes an `error` row (see module docstring)."""
    path, partner = str(batch["path"][0]), str(batch["partner"][0])
    try:
        if kind == "documents":
            rows = parse_text_file(path)
        elif kind == "pairs":
            rows = parse_aligned_pair(path, partner) if partner else parse_tsv_pairs(path)
        else:
            rows = parse_labelled_file(path, text_column, label_column)
        errors = [""] * len(rows)
    except DataError as e:
        rows = [{**dict.fromkeys(KIND_FIELDS[kind], ""), "origin": path}]
        errors = [str(e)]
    columns = {name: [r[name] for r in rows] for name in (*KIND_FIELDS[kind], "origin")}
    return pa.table({**columns, "error": errors}, schema=raw_schema(kind))


def raw_schema(kind: str) -> pa.Schema:
    return pa.schema([(name, pa.string()) for name in (*KIND_FIELDS[kind], "origin", "error")])


def _read_files(cfg: DataConfig, kind: str) -> ray.data.Dataset:
    files = expand_paths(cfg.paths)
    pair_names = [p for p in files if not p.removesuffix(".gz").endswith(".tsv")]
    if kind == "pairs" and len(cfg.paths) == 2 and len(files) == 2 and len(pair_names) == 2:
        tasks = [{"path": files[0], "partner": files[1]}]  # two plain files: source side, target side
    else:
        tasks = [{"path": f, "partner": ""} for f in files]
    # One block per file so that files parse in parallel; preserve_order keeps file order.
    ds = ray.data.from_items(tasks, override_num_blocks=len(tasks))
    return ds.map_batches(_parse_task, batch_size=1, fn_kwargs={
        "kind": kind, "text_column": cfg.text_column, "label_column": cfg.label_column})


def sample_rows(kind: str, seed: int, n: int) -> pa.Table:
    """Raw rows of the built-in sample of one kind."""
    if kind == "documents":
        rows = [{"text": d, "origin": f"sample:documents:{i}"} for i, d in enumerate(sample.sample_documents(seed, n))]
    elif kind == "pairs":
        rows = [{"src": s, "tgt": t, "origin": f"sample:pairs:{i}"}
                for i, (s, t) in enumerate(sample.sample_pairs(seed, n))]
    else:
        labelled, names = sample.sample_labelled(seed, n)
        rows = [{"text": t, "label": names[y], "origin": f"sample:labelled:{i}"} for i, (t, y) in enumerate(labelled)]
    return pa.Table.from_pylist([{**r, "error": ""} for r in rows], schema=raw_schema(kind))


def _sample_task(batch: dict, kind: str) -> pa.Table:
    return sample_rows(kind, int(batch["seed"][0]), int(batch["n"][0]))


def _read_sample(cfg: DataConfig, kind: str) -> ray.data.Dataset:
    # Generated inside a Ray task, so the three kinds are generated in parallel, not on the driver.
    n = {"documents": cfg.sample_docs, "pairs": cfg.sample_pairs, "labelled": cfg.sample_labelled}[kind]
    return ray.data.from_items([{"seed": cfg.seed, "n": n}]).map_batches(_sample_task, batch_size=1,
                                                                         fn_kwargs={"kind": kind})


SOURCES: dict[str, Source] = {
    "sample": Source(("documents", "pairs", "labelled"), _read_sample),
    "text": Source(("documents",), _read_files),
    "parallel": Source(("pairs",), _read_files),
    "labelled": Source(("labelled",), _read_files),
}
