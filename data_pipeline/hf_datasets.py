"""Hugging Face `datasets` as a source: a `save_to_disk` directory, data files, or (online only) a Hub name.

`resolve()` runs on the driver before Ray starts: it opens the dataset (memory-mapped Arrow, no copy),
picks the split, checks the named columns and finds the Arrow files that hold the rows. Ray tasks then
stream those files in record batches (`arrow_file_rows`), one task per file. Ray Data's
`from_huggingface` is not used: it first asks the Hub for Parquet copies (network calls, even for a local
dataset) and otherwise sends the whole table through the driver.
"""

from __future__ import annotations

import glob
import os
import socket
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlparse

import pyarrow as pa

from data_pipeline.errors import DataError
from data_pipeline.readers import ReadOptions, arrow_columns, arrow_records, make_row

# Data files -> the `datasets` builder that reads them (and its options).
DATA_FILE_BUILDERS: dict[str, tuple[str, dict[str, str]]] = {
    ".parquet": ("parquet", {}),
    ".jsonl": ("json", {}),
    ".json": ("json", {}),
    ".csv": ("csv", {}),
    ".tsv": ("csv", {"delimiter": "\t"}),
    ".txt": ("text", {}),
    ".arrow": ("arrow", {}),
}
_SAVED_MARKERS = ("dataset_dict.json", "state.json")  # what save_to_disk writes
_HUB_TIMEOUT_S = 3.0


def resolve(name: str, split: str, opts: ReadOptions) -> dict[str, Any]:
    """Open `name` (split `split`), check its columns; returns the provenance and the Arrow files to read."""
    ds = _load(name, split)
    columns = opts.columns("parquet") or {}
    arrow_columns(f"{name}[{split}]", ds.data.schema, columns)
    label_names = {}
    if opts.kind == "labelled":
        feature = ds.features.get(opts.label_column)
        if type(feature).__name__ == "ClassLabel":  # integer ids with names: read the names
            label_names[opts.label_column] = list(feature.names)
    files = [f["filename"] for f in ds.cache_files]
    # The Ray tasks read whole Arrow files: refuse what the files do not hold as is (an in-memory dataset,
    # a split slice such as "train[:10%]", an index mapping left by select/shuffle).
    if not files or ds._indices is not None or sum(_arrow_rows(f) for f in files) != ds.num_rows:
        raise DataError(
            f"hf_split: {name!r} split {split!r} is not stored as whole Arrow files (an in-memory "
            "dataset, a slice or a selection); save it with save_to_disk and name that directory"
        )
    return {
        "source": "hf",
        "hf_name": name,
        "hf_split": split,
        "num_rows": ds.num_rows,
        "fingerprint": ds._fingerprint,
        "label_names": label_names,
        "files": [{"path": f, "bytes": os.path.getsize(f)} for f in files],
    }


def _arrow_rows(path: str) -> int:
    with pa.memory_map(path) as source:
        return pa.ipc.open_stream(source).read_all().num_rows  # memory-mapped: no copy


def _load(name: str, split: str) -> Any:
    import datasets  # imported here: only this source needs it, and it is slow to import

    if os.path.isdir(name) and any(os.path.isfile(os.path.join(name, m)) for m in _SAVED_MARKERS):
        saved = datasets.load_from_disk(name)
        if isinstance(saved, datasets.DatasetDict):
            if split not in saved:
                raise DataError(f"hf_split: {name} has splits {sorted(saved)}, not {split!r}")
            return saved[split]
        return saved
    files = sorted(glob.glob(name, recursive=True)) if not os.path.isdir(name) else []
    if files:
        suffix = os.path.splitext(files[0].removesuffix(".gz"))[1].lower()
        if suffix not in DATA_FILE_BUILDERS:
            raise DataError(
                f"hf_name: {files[0]}: no datasets builder for {suffix or 'files without a suffix'!r}; "
                f"use one of {sorted(DATA_FILE_BUILDERS)}"
            )
        builder, options = DATA_FILE_BUILDERS[suffix]
        return _call(
            name,
            split,
            lambda: datasets.load_dataset(
                builder, data_files={split: files}, split=split, **options
            ),
        )
    if os.path.isdir(name):  # a directory of data files: datasets infers the builder
        return _call(name, split, lambda: datasets.load_dataset(name, split=split))
    _require_hub(name)
    return _call(name, split, lambda: datasets.load_dataset(name, split=split))


def _call(name: str, split: str, load: Any) -> Any:
    try:
        return load()
    except DataError:
        raise
    except (
        Exception
    ) as e:  # datasets raises many types (FileNotFoundError, ValueError, DatasetNotFoundError...)
        lines = str(e).strip().splitlines() or [type(e).__name__]
        raise DataError(f"hf_name: cannot load {name!r} split {split!r}: {lines[0]}") from None


def _require_hub(name: str) -> None:
    """Fail in one line, at once, when `name` could only come from the Hub and the Hub is out of reach.

    Without this, datasets retries for ~20 s and then prints a multi-line ConnectionError.
    """
    from huggingface_hub import constants

    offline = constants.HF_HUB_OFFLINE or os.environ.get("HF_DATASETS_OFFLINE", "") in (
        "1",
        "ON",
        "YES",
        "TRUE",
    )
    host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    if not offline:
        try:
            socket.create_connection((host, 443), timeout=_HUB_TIMEOUT_S).close()
        except OSError:
            offline = True
    if offline:
        raise DataError(
            f"hf_name: {name!r} is not a local directory or file, and the Hugging Face Hub ({host}) "
            "cannot be reached (offline); run `datasets.load_dataset(...).save_to_disk(DIR)` "
            "where there is a network and set hf_name to DIR"
        )


def arrow_file_rows(
    path: str, opts: ReadOptions, label_names: dict[str, list[str]]
) -> Iterator[dict]:
    """Raw rows of one of a dataset's Arrow files (IPC stream format, as `datasets` writes them)."""
    columns = opts.columns("parquet") or {}
    try:
        source = pa.memory_map(path)
        reader = pa.ipc.open_stream(source)
    except (OSError, pa.ArrowException) as e:
        raise DataError(f"{path}: not a readable Arrow stream ({str(e).splitlines()[0]})") from None
    with source:
        names = arrow_columns(path, reader.schema, columns)
        for number, values, _ in arrow_records(iter(reader), names, label_names):
            yield make_row(path, number, values, 0, opts, columns)
