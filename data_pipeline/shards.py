"""Parquet shards of bounded size, one manifest per task, and the helpers that read them back.

Layout of a task directory (docs/design.md):
    <task>/manifest.json
    <task>/<split>/part-00000.parquet ...
Writing is deterministic (same rows => byte-identical files), so sha256s identify a dataset.
Shards hold row groups of at most ROW_GROUP_ROWS rows, so a reader can fetch a slice of a shard
without the rest of it (the training loader streams them: data_pipeline/loader.py).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from data_pipeline.errors import DataDirError, DataError
from data_pipeline.storage import Location, cache_root, explain, is_remote, is_uri, resolve

MANIFEST = "manifest.json"
_PARQUET_OPTIONS: dict[str, Any] = {"compression": "zstd", "write_statistics": False}
# Rows per Parquet row group: the unit a streaming reader fetches. 1,024 rows of a 128-token
# block are ~0.5 MB of token ids; a whole 4,096-row shard in one group would be read whole.
ROW_GROUP_ROWS = 1024


def sha256_file(path: str | os.PathLike[str]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def refuse_non_empty(path: Path) -> None:
    """Output directories are never overwritten, not even partly."""
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise DataError(
            f"{path}: output directory exists and is not empty; choose a new one or remove it"
        )


def count_tokens(table: pa.Table, token_columns: tuple[str, ...]) -> int:
    return sum(
        int(pc.sum(pc.list_value_length(table.column(c))).as_py() or 0) for c in token_columns
    )


def write_split(
    table: pa.Table, split_dir: Path, shard_rows: int, token_columns: tuple[str, ...]
) -> list[dict]:
    """Write `table` as part-00000.parquet ... of at most `shard_rows` rows; return their manifest entries.

    An empty split still gets one (empty) shard so that its schema can be read back.
    """
    split_dir.mkdir(parents=True, exist_ok=False)
    shards = []
    starts = range(0, max(table.num_rows, 1), shard_rows)
    for number, start in enumerate(starts):
        part = table.slice(start, shard_rows)
        path = split_dir / f"part-{number:05d}.parquet"
        pq.write_table(
            part, path, row_group_size=min(max(shard_rows, 1), ROW_GROUP_ROWS), **_PARQUET_OPTIONS
        )
        shards.append(
            {
                "file": f"{split_dir.name}/{path.name}",
                "rows": part.num_rows,
                "tokens": count_tokens(part, token_columns),
                "sha256": sha256_file(path),
            }
        )
    return shards


def write_task(
    task_dir: Path,
    task: str,
    schema: pa.Schema,
    splits: dict[str, pa.Table | list[dict]],
    shard_rows: int,
    token_columns: tuple[str, ...],
    extra: dict[str, Any] | None = None,
) -> dict:
    """Write every split of one task (a table, or rows as dicts) and its manifest.json; returns the manifest."""
    refuse_non_empty(task_dir)
    task_dir.mkdir(parents=True, exist_ok=True)
    manifest: dict[str, Any] = {
        "task": task,
        "schema": {f.name: str(f.type) for f in schema},
        "splits": {},
    }
    for split, rows in splits.items():
        if isinstance(rows, pa.Table):
            table = rows.select(schema.names).cast(schema).combine_chunks()
        else:
            table = pa.Table.from_pylist(rows, schema=schema)
        shards = write_split(table, task_dir / split, shard_rows, token_columns)
        manifest["splits"][split] = {
            "shards": shards,
            "rows": sum(s["rows"] for s in shards),
            "tokens": sum(s["tokens"] for s in shards),
        }
    manifest.update(extra or {})
    write_json(task_dir / MANIFEST, manifest)
    return manifest


def write_json(path: Path, obj: dict) -> None:
    path.write_text(
        json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8"
    )


def read_manifest(path: str | os.PathLike[str]) -> dict:
    """A manifest.json, given the file or the directory holding it (a local path or a URI)."""
    if is_uri(path):
        loc = Location.of(path)
        loc = loc if loc.name.endswith(".json") else loc / MANIFEST
        fs, where = resolve(loc.text)
        return read_json_at(fs, where, loc.text)
    path = Path(path)
    if path.is_dir():
        path = path / MANIFEST
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise DataError(
            f"{path}: no manifest (was the data prepared with `kiln data prepare`?)"
        ) from None
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None


def data_view(data_dir: str | os.PathLike[str]) -> Path:
    """A local directory holding what readers of a prepared data directory open whole: its
    manifests and tokenizers. A local directory is its own view. A remote one's are fetched into
    the cache once per version of its top manifest (the key is that file's sha256), each checked
    against the sha256 the manifest records; its shards stay where they are (the loader streams
    them)."""
    if not is_remote(data_dir):
        return Path(data_dir)
    root = Location.of(data_dir)
    raw = _read_bytes(root / MANIFEST)
    top = _parse_json(raw, f"{root / MANIFEST}")
    target = cache_root() / "data" / hashlib.sha256(raw).hexdigest()[:20] / root.name
    if target.is_dir():
        return target
    tmp = target.with_name(f".tmp-{target.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        _write_view(root, raw, top, tmp)
        try:
            tmp.rename(target)
        except OSError:  # another process fetched it first
            if not target.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _write_view(root: Location, raw: bytes, top: dict, tmp: Path) -> None:
    """The top manifest as read (checkpoints record its sha256), then each file it lists with a
    sha256: tokenizer(s) and per-task manifests, refused when they differ from what it records."""
    tmp.mkdir(parents=True)
    (tmp / MANIFEST).write_bytes(raw)
    files = {
        info["file"]: info.get("sha256")
        for info in (top.get("tokenizer"), top.get("target_tokenizer"))
        if isinstance(info, dict) and info.get("file")
    }
    files.update(
        {f"{task}/{MANIFEST}": entry.get("sha256") for task, entry in top.get("tasks", {}).items()}
    )
    for name, expected in sorted(files.items()):
        data = _read_bytes(root / name)
        if expected and hashlib.sha256(data).hexdigest() != expected:
            raise DataError(
                f"{root / name}: sha256 does not match {root / MANIFEST}; the file changed or is "
                "corrupt (prepare the data again)"
            )
        (tmp / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp / name).write_bytes(data)


def _read_bytes(loc: Location) -> bytes:
    """A whole file of a prepared data directory; a missing one is a DataDirError naming it."""
    fs, path = resolve(loc.text)
    try:
        with fs.open_input_stream(path, compression=None) as f:
            return f.read()
    except FileNotFoundError:
        what = "no manifest" if loc.name == MANIFEST else "missing"
        raise DataDirError(
            f"{loc}: {what} (was the data prepared with `kiln data prepare`?)"
        ) from None
    except (OSError, pa.ArrowException) as e:
        raise explain(loc.text, e) from None


def _parse_json(raw: bytes, shown: str) -> dict:
    try:
        return json.loads(raw.decode("utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{shown}:{e.lineno}: invalid JSON ({e.msg})") from None
    except UnicodeDecodeError:
        raise DataError(f"{shown}: not UTF-8 text (not a manifest)") from None


def read_split(
    task_dir: str | os.PathLike[str],
    split: str,
    columns: list[str] | None = None,
    verify: bool = False,
) -> pa.Table:
    """All rows of one split (only `columns`, if given), in shard order; `verify` checks the
    sha256s. A remote task directory (a URI) is always verified: each shard is read once, hashed,
    then parsed."""
    if is_remote(task_dir):
        return _read_remote_split(Location.of(task_dir), split, columns)
    task_dir = Path(task_dir)
    manifest = read_manifest(task_dir)
    tables = []
    for shard in _listed_shards(manifest, split, task_dir / MANIFEST):
        path = task_dir / shard["file"]
        if verify and sha256_file(path) != shard["sha256"]:
            raise DataError(
                f"{path}: sha256 does not match {task_dir / MANIFEST}; the shard changed or is corrupt"
            )
        try:
            tables.append(pq.read_table(path, columns=columns))
        except (OSError, pa.ArrowException) as e:  # truncated, overwritten, not Parquet at all
            first = (str(e).splitlines() or [type(e).__name__])[0]
            raise DataError(f"{path}: cannot read this shard ({first}); prepare it again") from None
    return pa.concat_tables(tables)


def _read_remote_split(task_dir: Location, split: str, columns: list[str] | None) -> pa.Table:
    manifest = read_manifest(task_dir.text)
    tables = []
    for shard in _listed_shards(manifest, split, task_dir / MANIFEST):
        loc = task_dir / shard["file"]
        data = _read_bytes(loc)
        if hashlib.sha256(data).hexdigest() != shard["sha256"]:
            raise DataError(
                f"{loc}: sha256 does not match {task_dir / MANIFEST}; "
                "the shard changed or is corrupt"
            )
        try:
            tables.append(pq.read_table(pa.BufferReader(data), columns=columns))
        except (OSError, pa.ArrowException) as e:  # not Parquet at all
            raise DataError(
                f"{loc}: cannot read this shard ({_first_line(e)}); prepare it again"
            ) from None
    return pa.concat_tables(tables)


def _listed_shards(manifest: dict, split: str, shown: Path | Location) -> list[dict]:
    if split not in manifest["splits"]:
        raise DataError(f"{shown}: no split {split!r}; it has {sorted(manifest['splits'])}")
    return list(manifest["splits"][split]["shards"])


# ---------------------------------------------------------------- streaming reads (pyarrow.fs)
def read_json_at(fs: pafs.FileSystem, path: str, shown: str | None = None) -> dict:
    """A manifest.json through `fs`; errors name the file (`shown`: as the user wrote it)."""
    shown = shown or path
    try:
        with fs.open_input_stream(path, compression=None) as f:
            return json.loads(f.read().decode("utf-8"))
    except FileNotFoundError:
        raise DataDirError(
            f"{shown}: no manifest (was the data prepared with `kiln data prepare`?)"
        ) from None
    except json.JSONDecodeError as e:
        raise DataError(f"{shown}:{e.lineno}: invalid JSON ({e.msg})") from None
    except (OSError, pa.ArrowException) as e:
        raise explain(shown, e) from None


def verify_sha256(
    fs: pafs.FileSystem, path: str, expected: str, manifest: str, shown: str | None = None
) -> None:
    """Stream the file through sha256 (1 MiB at a time) and refuse it if it differs. `shown`: the
    file as errors name it (a URI keeps its scheme)."""
    shown = shown or path
    digest = hashlib.sha256()
    try:
        with fs.open_input_stream(path, compression=None) as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    except (OSError, pa.ArrowException) as e:
        raise DataError(f"{shown}: cannot read this shard ({_first_line(e)})") from None
    if digest.hexdigest() != expected:
        raise DataError(
            f"{shown}: sha256 does not match {manifest}; the shard changed or is corrupt"
        )


def read_rows(
    fs: pafs.FileSystem,
    path: str,
    start: int,
    stop: int,
    columns: list[str],
    shown: str | None = None,
) -> pa.Table:
    """Rows [start, stop) of one shard: only the row groups that hold them are read and decoded."""
    shown = shown or path
    try:
        with fs.open_input_file(path) as f:
            parquet = pq.ParquetFile(f)
            groups, first, offset = [], None, 0
            for i in range(parquet.metadata.num_row_groups):
                rows = parquet.metadata.row_group(i).num_rows
                if offset < stop and offset + rows > start:
                    groups.append(i)
                    first = offset if first is None else first
                offset += rows
            table = parquet.read_row_groups(groups, columns=columns)
    except (OSError, pa.ArrowException) as e:  # truncated, overwritten, not Parquet at all
        raise DataError(
            f"{shown}: cannot read this shard ({_first_line(e)}); prepare it again"
        ) from None
    if offset < stop:
        raise DataError(
            f"{shown}: has {offset} rows, its manifest says at least {stop}; prepare it again"
        )
    return table.slice(start - (first or 0), stop - start)


def _first_line(e: BaseException) -> str:
    return (str(e).splitlines() or [type(e).__name__])[0]
