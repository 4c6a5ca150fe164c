"""Sources: where rows come from. Each turns a `DataConfig` into `ray.data.Dataset`s of raw rows of one kind.

Row kinds (every row also has `origin`, "file:line" or "sample:...", `replaced`, the count of its lines
whose undecodable bytes were replaced, and `error`, "" unless the input could not be parsed):
    documents  {"text"}          one document; segments (sentences, lines) separated by "\\n"
    pairs      {"src", "tgt"}    a translation pair
    labelled   {"text", "label"} a text and its label as a string (ids are assigned after cleaning)

A source first `resolve`s its inputs on the driver, before Ray starts (missing files, an unreachable
Hub and bad column names fail at once); what it returns is the manifest's provenance record and tells
`read` which files to read. `preflight` then parses them on the driver as the Ray tasks will, keeping
nothing, so a bad line fails in a second instead of after Ray's start-up (the tasks keep their checks).
Reading streams: one Ray task per file parses it (`readers.py`) and yields blocks of about `BLOCK_CHARS`
characters as it goes, so no file is held whole (except as one document, text_unit: file) and the rows
flow on to cleaning and tokenization block by block.

A parse failure travels back as a row whose `error` holds the one-line DataError message, because Ray
re-wraps exceptions raised in tasks and loses their type; `prepare()` re-raises it on the driver.
"""

from __future__ import annotations

import glob
import itertools
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib import metadata
from typing import Any

import pyarrow as pa
import ray.data

from data_pipeline import hf_datasets, sample
from data_pipeline.config import SOURCE_KINDS, DataConfig
from data_pipeline.errors import DataError
from data_pipeline.readers import KIND_FIELDS, ReadOptions, check_file, file_format, file_rows
from data_pipeline.shards import sha256_file
from data_pipeline.storage import GLOB_CHARS, Location, check_bucket, expand_uri, is_remote

__all__ = [
    "BLOCK_CHARS",
    "KIND_FIELDS",
    "SOURCES",
    "Source",
    "expand_paths",
    "preflight",
    "raw_schema",
    "read_task",
]

BLOCK_CHARS = (
    1 << 20
)  # characters per block: ~0.5 s of tokenizing, a few blocks per core on a real corpus
BLOCK_ROWS = 4096
# Reading is cheap parsing and waiting on disk. A fractional CPU lets it run beside the tokenizing tasks,
# and, as the resources differ, keeps it a Ray Data operator of its own: the blocks of one large file
# are then cleaned and tokenized by parallel tasks, not all inside the one task that reads the file.
READ_CPUS = 0.5
# The pre-flight parses inputs up to this size whole (tab-separated pairs ~20 MB/s, plain text ~300 MB/s
# on one core); a larger input gets its first PREFLIGHT_HEAD_ROWS rows per file checked, the rest by Ray.
PREFLIGHT_FULL_BYTES = 256 << 20
PREFLIGHT_HEAD_ROWS = 10_000


@dataclass(frozen=True)
class Source:
    kinds: tuple[str, ...]  # the row kinds this source can supply
    resolve: Callable[
        [DataConfig], dict[str, Any]
    ]  # driver, before Ray: check inputs, return provenance
    read: Callable[
        [DataConfig, str, dict[str, Any]], ray.data.Dataset
    ]  # (config, kind, provenance) -> raw rows
    # (config, kind, provenance) -> the read tasks ({"path", "partner"}) and their reader; None: nothing to check
    tasks: Callable[[DataConfig, str, dict[str, Any]], tuple[list[dict[str, str]], str]] | None = (
        None
    )


def raw_schema(kind: str) -> pa.Schema:
    return pa.schema(
        [
            *((name, pa.string()) for name in (*KIND_FIELDS[kind], "origin")),
            ("replaced", pa.int32()),
            ("error", pa.string()),
        ]
    )


# ---------------------------------------------------------------------------------------------- files


def expand_paths(patterns: list[str]) -> list[str]:
    """Files named by paths, directories (recursively, sorted) and globs; a pattern matching nothing is an error."""
    files: list[str] = []
    for pattern in patterns:
        if is_remote(pattern):
            files.extend(_expand_remote(pattern))
        elif GLOB_CHARS & set(pattern):
            matches = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
            if not matches:
                raise DataError(f"{pattern}: no file matches this pattern (paths)")
            files.extend(matches)
        elif os.path.isdir(pattern):
            found = sorted(
                os.path.join(d, f)
                for d, _, names in os.walk(pattern)
                for f in names
                if not f.startswith(".")
            )
            if not found:
                raise DataError(f"{pattern}: directory holds no files (paths)")
            files.extend(found)
        elif os.path.isfile(pattern):
            files.append(pattern)
        else:
            raise DataError(f"{pattern}: no such file or directory (paths)")
    return list(dict.fromkeys(files))  # de-duplicate, keep order


def _expand_remote(pattern: str) -> list[str]:
    found = expand_uri(pattern)
    if not found:
        check_bucket(pattern)
        what = "no file matches this pattern" if GLOB_CHARS & set(pattern) else "no such object"
        raise DataError(f"{pattern}: {what} (paths)")
    return found


def _resolve_files(cfg: DataConfig) -> dict[str, Any]:
    return {"source": cfg.source, "files": [_file_record(p) for p in expand_paths(cfg.paths)]}


def _file_record(path: str) -> dict[str, Any]:
    """Provenance for the manifest; a remote file is read once here for its sha256 (the read
    tasks read it again, streamed)."""
    if is_remote(path):
        loc = Location.of(path)
        return {"path": path, "bytes": loc.size(), "sha256": loc.sha256()}
    return {"path": path, "bytes": os.path.getsize(path), "sha256": sha256_file(path)}


def _file_tasks(cfg: DataConfig, kind: str, files: list[str]) -> list[dict[str, str]]:
    """One task per file, or one for a line-aligned pair: exactly two plain-text paths given for pairs."""
    aligned = (
        kind == "pairs"
        and len(cfg.paths) == 2
        and len(files) == 2
        and all(file_format(f) == "text" for f in files)
        and cfg.src_column is None
    )
    if aligned:
        return [{"path": files[0], "partner": files[1]}]  # source side, target side
    return [{"path": f, "partner": ""} for f in files]


def read_task(
    batch: dict,
    opts: ReadOptions,
    reader: str,
    label_names: dict[str, list[str]],
    block_chars: int = BLOCK_CHARS,
) -> Iterator[pa.Table]:
    """Ray UDF: parse the file of one task row, yielding blocks as it goes; a DataError becomes an `error` row."""
    path, partner = str(batch["path"][0]), str(batch["partner"][0])
    rows: list[dict] = []
    chars = 0
    try:
        parsed = (
            hf_datasets.arrow_file_rows(path, opts, label_names)
            if reader == "hf"
            else file_rows(path, partner, opts)
        )
        for row in parsed:
            rows.append(row)
            chars += sum(len(row[name]) for name in KIND_FIELDS[opts.kind])
            if chars >= block_chars or len(rows) >= BLOCK_ROWS:
                yield _table(rows, opts.kind)
                rows, chars = [], 0
    except DataError as e:
        rows = [
            {
                **dict.fromkeys(KIND_FIELDS[opts.kind], ""),
                "origin": path,
                "replaced": 0,
                "error": str(e),
            }
        ]
    if rows:
        yield _table(rows, opts.kind)


def _table(rows: list[dict], kind: str) -> pa.Table:
    schema = raw_schema(kind)
    return pa.table({name: [r.get(name, "") for r in rows] for name in schema.names}, schema=schema)


def _read_tasks(
    cfg: DataConfig,
    kind: str,
    tasks: list[dict[str, str]],
    reader: str,
    label_names: dict[str, list[str]],
) -> ray.data.Dataset:
    # One input block per task so that files parse in parallel; prepare() preserves order.
    return ray.data.from_items(tasks, override_num_blocks=len(tasks)).map_batches(
        read_task,
        batch_size=1,
        num_cpus=READ_CPUS,
        fn_kwargs={
            "opts": ReadOptions.from_config(cfg, kind),
            "reader": reader,
            "label_names": label_names,
            "block_chars": BLOCK_CHARS,
        },
    )


def _files_tasks(
    cfg: DataConfig, kind: str, inputs: dict[str, Any]
) -> tuple[list[dict[str, str]], str]:
    return _file_tasks(cfg, kind, [f["path"] for f in inputs["files"]]), "file"


def _read_files(cfg: DataConfig, kind: str, inputs: dict[str, Any]) -> ray.data.Dataset:
    return _read_tasks(cfg, kind, *_files_tasks(cfg, kind, inputs), {})


def preflight(cfg: DataConfig, inputs: dict[str, Any]) -> dict[str, Any] | None:
    """On the driver, before Ray starts: parse every input as the read tasks will, raising their DataError.

    Streams row by row and keeps nothing. Returns what was checked (files, bytes, rows, whole: every row or
    the first PREFLIGHT_HEAD_ROWS of each file), or None for a source without files (the sample).
    """
    source = SOURCES[cfg.source]
    if source.tasks is None:
        return None
    total = sum(f["bytes"] for f in inputs["files"])
    limit = None if total <= PREFLIGHT_FULL_BYTES else PREFLIGHT_HEAD_ROWS
    rows = 0
    for kind in cfg.row_kinds():
        tasks, reader = source.tasks(cfg, kind, inputs)
        for task in tasks:
            rows += _check_task(task, ReadOptions.from_config(cfg, kind), reader, inputs, limit)
    return {"files": len(inputs["files"]), "bytes": total, "rows": rows, "whole": limit is None}


def _check_task(
    task: dict[str, str], opts: ReadOptions, reader: str, inputs: dict[str, Any], limit: int | None
) -> int:
    if reader == "file":
        return check_file(task["path"], task["partner"], opts, limit)
    parsed = hf_datasets.arrow_file_rows(task["path"], opts, inputs["label_names"])
    try:
        return sum(1 for _ in itertools.islice(parsed, limit))
    finally:
        parsed.close()


# ------------------------------------------------------------------------------------ Hugging Face


def _resolve_hf(cfg: DataConfig) -> dict[str, Any]:
    assert cfg.hf_name is not None  # DataConfig checks it
    resolved = [
        hf_datasets.resolve(cfg.hf_name, cfg.hf_split, ReadOptions.from_config(cfg, kind))
        for kind in cfg.row_kinds()
    ]
    return {
        **resolved[0],
        "label_names": {k: v for r in resolved for k, v in r["label_names"].items()},
    }


def _hf_tasks(
    cfg: DataConfig, kind: str, inputs: dict[str, Any]
) -> tuple[list[dict[str, str]], str]:
    return [{"path": f["path"], "partner": ""} for f in inputs["files"]], "hf"


def _read_hf(cfg: DataConfig, kind: str, inputs: dict[str, Any]) -> ray.data.Dataset:
    return _read_tasks(cfg, kind, *_hf_tasks(cfg, kind, inputs), inputs["label_names"])


# --------------------------------------------------------------------------------------------- sample


def sample_rows(kind: str, seed: int, n: int) -> pa.Table:
    """Raw rows of the built-in sample of one kind."""
    if kind == "documents":
        rows = [
            {"text": d, "origin": f"sample:documents:{i}"}
            for i, d in enumerate(sample.sample_documents(seed, n))
        ]
    elif kind == "pairs":
        rows = [
            {"src": s, "tgt": t, "origin": f"sample:pairs:{i}"}
            for i, (s, t) in enumerate(sample.sample_pairs(seed, n))
        ]
    else:
        labelled, names = sample.sample_labelled(seed, n)
        rows = [
            {"text": t, "label": names[y], "origin": f"sample:labelled:{i}"}
            for i, (t, y) in enumerate(labelled)
        ]
    return pa.Table.from_pylist(
        [{**r, "replaced": 0, "error": ""} for r in rows], schema=raw_schema(kind)
    )


def _sample_task(batch: dict, kind: str) -> pa.Table:
    return sample_rows(kind, int(batch["seed"][0]), int(batch["n"][0]))


def _resolve_sample(cfg: DataConfig) -> dict[str, Any]:
    return {
        "source": "sample",
        "python": sys.version.split()[0],
        "num2words": metadata.version("num2words"),
    }


def _read_sample(cfg: DataConfig, kind: str, inputs: dict[str, Any]) -> ray.data.Dataset:
    # Generated inside a Ray task, so the three kinds are generated in parallel, not on the driver.
    n = {"documents": cfg.sample_docs, "pairs": cfg.sample_pairs, "labelled": cfg.sample_labelled}[
        kind
    ]
    return ray.data.from_items([{"seed": cfg.seed, "n": n}]).map_batches(
        _sample_task, batch_size=1, fn_kwargs={"kind": kind}
    )


# One per name of data_pipeline.config.Source, supplying the row kinds config's SOURCE_KINDS lists.
SOURCES: dict[str, Source] = {
    "sample": Source(SOURCE_KINDS["sample"], _resolve_sample, _read_sample),
    "text": Source(SOURCE_KINDS["text"], _resolve_files, _read_files, _files_tasks),
    "parallel": Source(SOURCE_KINDS["parallel"], _resolve_files, _read_files, _files_tasks),
    "labelled": Source(SOURCE_KINDS["labelled"], _resolve_files, _read_files, _files_tasks),
    "hf": Source(SOURCE_KINDS["hf"], _resolve_hf, _read_hf, _hf_tasks),
}
