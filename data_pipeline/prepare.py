"""`prepare()`: source -> clean / de-dup / split -> tokenizer -> tokenize -> examples -> shards + manifests.

Ray Data reads, cleans and tokenizes, streaming block by block (`map_batches`, order preserved). With a
loaded tokenizer (`tokenizer_path`) that is one pass; a tokenizer trained here needs the cleaned text
first, so reading and tokenizing are two passes. The driver does what needs a global view: exact
de-duplication (first occurrence wins), counting every dropped row by reason, training the tokenizer,
and building examples (NSP draws its random B from any document of the split; causal-LM packing runs
across documents). It holds the kept rows of each kind as Arrow columns: token ids (4 bytes a token),
and the text only where the shards or the tokenizer trainer need it (docs/data.md). Everything is
written under a temporary directory beside `out_dir` that is renamed to `out_dir` only when complete.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import random
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray
import ray.data
from tokenizers import Tokenizer

from data_pipeline.clean import DROP_REASONS, SPLITS, TEXT_FIELDS, clean_batch, split_contiguously
from data_pipeline.config import DataConfig
from data_pipeline.errors import DataError
from data_pipeline.examples import BUILDERS, BuildParams
from data_pipeline.raystart import init_ray
from data_pipeline.shards import MANIFEST, refuse_non_empty, sha256_file, write_json, write_task
from data_pipeline.sources import BLOCK_CHARS, SOURCES, preflight
from data_pipeline.storage import Location, cache_root, check_writable, is_remote
from data_pipeline.tokenizer import (
    TARGET_TOKENIZER_FILE,
    load_tokenizer,
    special_token_ids,
    tokenize_batch,
    train_tokenizer,
    translation_tokenizers,
)

FORMAT = "kiln-data/1"
T = TypeVar("T")
_HELPER_COLUMNS = [
    "drop",
    "key",
    "error",
    "replaced",
]  # cleaning's bookkeeping, dropped on the driver


def prepare(
    cfg: DataConfig, out_dir: str | os.PathLike[str], progress: Callable[[str], None] | None = None
) -> dict:
    """Prepare every task of `cfg` into `out_dir` (which must not exist or be empty; a local path or a
    URI); returns the top manifest. A remote `out_dir` is prepared in a local staging directory and
    uploaded, every manifest after the shards it lists (no manifest, no prepared data)."""
    start = time.perf_counter()

    def say(message: str) -> None:  # each line says when its stage ended, so a slow stage shows
        if progress is not None:
            progress(f"{message} [{time.perf_counter() - start:.1f} s]")

    where: Location | Path = Location.of(out_dir) if is_remote(out_dir) else Path(out_dir)
    if isinstance(where, Location):
        manifest = _prepare_remote(cfg, where, say)
    else:
        manifest = _prepare_local(cfg, where, say)
    say(f"prepared {', '.join(cfg.tasks)} in {where}")
    return manifest


def _prepare_local(cfg: DataConfig, out_dir: Path, say: Callable[[str], None]) -> dict:
    refuse_non_empty(out_dir)
    # Before Ray starts and before anything is written: missing files, bad columns, an unreachable Hub, a
    # bad line anywhere in the input (the pre-flight parse) and a bad tokenizer fail at once.
    inputs = SOURCES[cfg.source].resolve(cfg)
    loaded = load_tokenizer(cfg.tokenizer_path) if cfg.tokenizer_path is not None else None
    target = (
        load_tokenizer(cfg.target_tokenizer_path, "target_tokenizer_path")
        if cfg.target_tokenizer_path is not None
        else None
    )
    if loaded is not None and target is not None:
        translation_tokenizers(loaded, target)  # the specials each side is framed with must exist
    checked = preflight(cfg, inputs)  # last: the one check whose time grows with the input
    if checked is not None:
        say(
            f"inputs: checked {'every line of' if checked['whole'] else 'the head of each of'} "
            f"{checked['files']} file(s), {checked['bytes'] / 1e6:.1f} MB"
        )
    tmp = out_dir.parent / f".tmp-{out_dir.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)  # a leftover of a crashed run of this same process id
    tmp.mkdir(parents=True)
    try:
        with _quiet_ray_data():
            manifest = _prepare_into(cfg, inputs, (loaded, target), tmp, say)
        if out_dir.exists():
            out_dir.rmdir()  # empty, checked above
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def _prepare_remote(cfg: DataConfig, out: Location, say: Callable[[str], None]) -> dict:
    """Prepare into a staging directory under the Kiln cache, then upload it: the shards and
    tokenizers first, each task's manifest after them, the top manifest last. An object store has
    no rename, so this order is what keeps a reader from seeing a manifest before its files."""
    # Read-only first: check_writable's probe object must not land in someone's data (on a
    # filer-backed store such as SeaweedFS it would even turn an object at `out` into a directory).
    if out.is_file() or out.list():
        raise DataError(
            f"{out}: output prefix exists and is not empty; choose a new one or remove it"
        )
    check_writable(out)  # bucket, credentials, endpoint: one line before any work
    staging = Path(tempfile.mkdtemp(prefix="prepare-", dir=_staging_root()))
    try:
        manifest = _prepare_local(cfg, staging / "data", say)
        last = [f"{task}/{MANIFEST}" for task in manifest["tasks"]] + [MANIFEST]
        out.upload(staging / "data", last=last)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    say(f"uploaded to {out}")
    return manifest


def _staging_root() -> Path:
    root = cache_root() / "staging"
    root.mkdir(parents=True, exist_ok=True)
    return root


def _prepare_into(
    cfg: DataConfig,
    inputs: dict,
    tokenizers: tuple[Tokenizer | None, Tokenizer | None],
    out: Path,
    say: Callable[[str], None],
) -> dict:
    """tokenizers: the loaded (source) tokenizer and the target one, each None when not given."""
    (loaded, target), kinds = tokenizers, cfg.row_kinds()
    tables, sources, dropped = {}, {}, {}
    if loaded is not None:  # one pass: read -> clean -> tokenize, de-duplicated on the driver
        tok, tok_info = (
            loaded,
            {"file": "tokenizer.json", "kind": "loaded", "loaded_from": cfg.tokenizer_path},
        )
        say(f"tokenizer: loaded {cfg.tokenizer_path} (vocabulary {tok.get_vocab_size()})")
    results = _concurrently(
        lambda k: _collect(_cleaned(cfg, k, inputs, loaded, target), cfg, k), kinds
    )
    for kind, (tables[kind], sources[kind], dropped[kind]) in zip(kinds, results, strict=True):
        say(
            f"{kind}: {sources[kind]['rows_read']} read, {sources[kind]['kept']} kept, "
            f"dropped {dropped[kind]}, splits {sources[kind]['splits']}"
        )
    if (
        loaded is None
    ):  # two passes: the tokenizer is trained on the cleaned, de-duplicated text in between
        tok, tok_info = _train(cfg, tables, say)
        tables = dict(
            zip(
                kinds,
                _concurrently(lambda k: _tokenize_table(tables[k], tok, k, cfg.tasks), kinds),
                strict=True,
            )
        )
    tok.save(str(out / "tokenizer.json"))
    tok_info["sha256"] = sha256_file(out / "tokenizer.json")
    special = special_token_ids(tok)
    labels = _label_names(cfg, inputs, tables["labelled"]) if "labelled" in tables else []
    params = BuildParams(
        cfg.seq_len, cfg.max_src_len, cfg.max_tgt_len, special, nsp_dupe_factor=cfg.nsp_dupe_factor
    )
    extra = {}
    if target is not None:
        params, extra = _with_target_tokenizer(cfg, params, tok, target, out)
        say(
            f"target tokenizer: loaded {cfg.target_tokenizer_path} (vocabulary {target.get_vocab_size()})"
        )
    tasks = {}
    for task in cfg.tasks:
        tasks[task] = _build_task(cfg, task, tables[BUILDERS[task].input_kind], params, labels, out)
        say(
            f"{task}: "
            + ", ".join(
                f"{s} {v['rows']} rows / {v['tokens']} tokens"
                for s, v in tasks[task]["splits"].items()
            )
        )
    manifest = {
        "format": FORMAT,
        "config": cfg.to_dict(),
        "seed": cfg.seed,
        "inputs": inputs,
        "sources": sources,
        "dropped": dropped,
        "tokenizer": tok_info,
        "special_tokens": special,
        "vocab_size": tok.get_vocab_size(),
        **extra,
        "tasks": tasks,
    }
    write_json(out / "manifest.json", manifest)
    return manifest


def _with_target_tokenizer(
    cfg: DataConfig, params: BuildParams, source: Tokenizer, target: Tokenizer, out: Path
) -> tuple[BuildParams, dict]:
    """Save the target tokenizer beside tokenizer.json; the manifest fields that record it and each side's framing."""
    target.save(str(out / TARGET_TOKENIZER_FILE))
    pair = translation_tokenizers(source, target)
    info = {
        "file": TARGET_TOKENIZER_FILE,
        "kind": "loaded",
        "loaded_from": cfg.target_tokenizer_path,
        "sha256": sha256_file(out / TARGET_TOKENIZER_FILE),
    }
    extra = {
        "target_tokenizer": info,
        "target_special_tokens": special_token_ids(target),
        "target_vocab_size": target.get_vocab_size(),
        "translation_specials": {"source": pair.src.to_dict(), "target": pair.tgt.to_dict()},
    }
    return dataclasses.replace(params, src_frame=pair.src, tgt_frame=pair.tgt), extra


def _concurrently(fn: Callable[[str], T], kinds: list[str]) -> list[T]:
    """fn over the row kinds, each kind's Ray Data execution in its own driver thread.

    Each execution spends much of its time waiting (task start-up, scheduling); overlapping them saves
    seconds on the sample. Results come back in `kinds` order, and so does the first error.
    """
    with ThreadPoolExecutor(max_workers=len(kinds)) as pool:
        futures = [pool.submit(fn, kind) for kind in kinds]
        return [f.result() for f in futures]


@contextlib.contextmanager
def _quiet_ray_data() -> Iterator[None]:
    """Start Ray if needed; keep Ray Data's bars and per-dataset log lines out of the user's terminal."""
    init_ray(log_to_driver=False)
    ctx = ray.data.DataContext.get_current()
    saved = (
        ctx.enable_progress_bars,
        ctx.execution_options.preserve_order,
        ctx.target_max_block_size,
    )
    logger = logging.getLogger("ray.data")
    level = logger.level
    ctx.enable_progress_bars, ctx.execution_options.preserve_order = (
        False,
        True,
    )  # deterministic output order
    # Ray Data merges what a task yields into blocks of up to 128 MiB: a file of less than that would stay
    # one block, tokenized by one task. Blocks of about BLOCK_CHARS spread it over the cores.
    ctx.target_max_block_size = BLOCK_CHARS
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        (
            ctx.enable_progress_bars,
            ctx.execution_options.preserve_order,
            ctx.target_max_block_size,
        ) = saved
        logger.setLevel(level)


def _cleaned(
    cfg: DataConfig, kind: str, inputs: dict, tok: Tokenizer | None, target: Tokenizer | None = None
) -> ray.data.Dataset:
    """Raw rows of `kind`, cleaned and marked (`drop`, `key`, `split`) in Ray, and tokenized if `tok` is given
    (translation targets with `target` when given)."""
    test_fraction = (
        0.0 if kind == "documents" else cfg.test_fraction
    )  # documents: train/validation only
    ds = (
        SOURCES[cfg.source]
        .read(cfg, kind, inputs)
        .map_batches(
            clean_batch,
            batch_format="pyarrow",
            batch_size=None,
            fn_kwargs={
                "kind": kind,
                "min_chars": cfg.min_chars,
                "max_chars": cfg.max_chars,
                "seed": cfg.seed,
                "validation_fraction": cfg.validation_fraction,
                "test_fraction": test_fraction,
            },
        )
    )
    return ds if tok is None else _tokenized(ds, tok, kind, cfg.tasks, target)


def _tokenized(
    ds: ray.data.Dataset,
    tok: Tokenizer,
    kind: str,
    tasks: list[str],
    target: Tokenizer | None = None,
) -> ray.data.Dataset:
    return ds.map_batches(
        tokenize_batch,
        batch_format="pyarrow",
        batch_size=None,
        fn_kwargs={
            "tokenizer_json": tok.to_str(),
            "kind": kind,
            "segments": "mlm_nsp" in tasks,
            "whole": "clm" in tasks,
            "target_tokenizer_json": target.to_str() if target is not None else None,
        },
    )


def _collect(
    ds: ray.data.Dataset, cfg: DataConfig, kind: str
) -> tuple[pa.Table, dict, dict[str, int]]:
    """On the driver: raise parse errors, count drops by reason, keep first occurrences (unless
    `dedupe` is off); with `split: contiguous` the kept rows, in input order, are cut into train |
    validation | test ranges here (Ray Data preserves the order: `_quiet_ray_data`)."""
    dropped: Counter[str] = Counter({reason: 0 for reason in DROP_REASONS})
    seen: set[str] = set()
    tables, read, replaced = [], 0, 0
    for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
        errors = [e for e in batch.column("error").to_pylist() if e]
        if errors:
            raise DataError(errors[0])
        keep = []
        for reason, key in zip(
            batch.column("drop").to_pylist(), batch.column("key").to_pylist(), strict=True
        ):
            reason = reason or ("duplicate" if cfg.dedupe and key in seen else "")
            seen.add(key)
            if reason:
                dropped[reason] += 1
            keep.append(not reason)
        read += batch.num_rows
        replaced += int(pc.sum(batch.column("replaced")).as_py() or 0)
        tables.append(batch.filter(pa.array(keep, pa.bool_())).drop_columns(_HELPER_COLUMNS))
    if read == 0:
        raise DataError(
            f"paths: source {cfg.source!r} gave no {kind} rows from {cfg.paths or cfg.hf_name}"
        )
    table = pa.concat_tables(tables)
    if table.num_rows == 0:
        raise DataError(
            f"min_chars: all {read} {kind} rows were dropped ({dict(dropped)}); check the input, "
            "min_chars and max_chars"
        )
    if cfg.split == "contiguous":
        table = split_contiguously(table, cfg.validation_fraction, cfg.test_fraction, kind)
    splits = Counter(table.column("split").to_pylist())
    info = {
        "rows_read": read,
        "kept": table.num_rows,
        "splits": {s: splits.get(s, 0) for s in SPLITS},
        "encoding_errors_replaced": replaced,
    }
    return table, info, dict(dropped)


def _tokenize_table(table: pa.Table, tok: Tokenizer, kind: str, tasks: list[str]) -> pa.Table:
    """The second pass: kept rows back through Ray for tokenizing, in blocks of about BLOCK_CHARS characters."""
    chars = np.cumsum(
        sum(
            pc.utf8_length(table.column(n)).to_numpy(zero_copy_only=False)
            for n in TEXT_FIELDS[kind]
        )
    )
    cuts = sorted(
        {
            0,
            table.num_rows,
            *(
                int(c)
                for c in np.searchsorted(
                    chars, np.arange(BLOCK_CHARS, chars[-1], BLOCK_CHARS), side="right"
                )
            ),
        }
    )
    ds = ray.data.from_arrow([table.slice(a, b - a) for a, b in zip(cuts, cuts[1:], strict=False)])
    return pa.concat_tables(
        _tokenized(ds, tok, kind, tasks).iter_batches(batch_format="pyarrow", batch_size=None)
    )


def _train(
    cfg: DataConfig, kept: dict[str, pa.Table], say: Callable[[str], None]
) -> tuple[Tokenizer, dict]:
    start = time.perf_counter()

    def train_texts() -> Iterator[str]:
        # Train split only: validation and test text stays unseen, even by the vocabulary.
        for kind, table in kept.items():
            train = table.filter(pc.equal(table.column("split"), "train"))
            for name in TEXT_FIELDS[kind]:
                yield from train.column(name).to_pylist()

    tok = train_tokenizer(cfg.tokenizer, train_texts(), cfg.vocab_size)
    say(
        f"tokenizer: trained {cfg.tokenizer}, vocabulary {tok.get_vocab_size()} in {time.perf_counter() - start:.1f} s"
    )
    return tok, {"file": "tokenizer.json", "kind": cfg.tokenizer, "loaded_from": None}


def _label_names(cfg: DataConfig, inputs: dict, table: pa.Table) -> list[str]:
    """The label set in id order: given (`labels`), a Hugging Face ClassLabel's names, or inferred.

    Inferred labels are sorted, numerically when every label is an integer ("2" < "10").
    """
    found = set(table.column("label").to_pylist())
    given = cfg.labels or inputs.get("label_names", {}).get(cfg.label_column)
    if given:
        outside = found - set(given)
        if outside:  # the file readers check this per line; this catches the other sources
            origin = table.column("origin")[
                table.column("label").to_pylist().index(min(outside))
            ].as_py()
            raise DataError(
                f"{origin}: label {min(outside)!r} is not one of the given labels {given} (labels)"
            )
        return list(given)
    if all(n.lstrip("-").isdigit() for n in found):
        return sorted(found, key=int)
    return sorted(found)


def _build_task(
    cfg: DataConfig, task: str, table: pa.Table, params: BuildParams, labels: list[str], out: Path
) -> dict:
    builder = BUILDERS[task]
    if task == "classification":
        table = table.set_column(
            table.column_names.index("label"),
            "label",
            pc.index_in(table.column("label"), value_set=pa.array(labels)),
        )
    splits, counters, next_id = {}, {}, 0
    for split in builder.splits:
        inputs = table.filter(pc.equal(table.column("split"), split))
        try:
            examples, counters[split] = builder.build(
                inputs, params, random.Random(f"{cfg.seed}-{task}-{split}")
            )
        except DataError as e:
            raise DataError(
                f"{e} (split {split!r}: raise validation_fraction or add input)"
            ) from None
        if split == "train" and examples.num_rows == 0:
            raise DataError(
                f"seq_len: task {task} got no train examples from {inputs.num_rows} inputs "
                f"({counters[split]}); check seq_len, max_src_len and max_tgt_len"
            )
        # sample_id: unique across the splits of the task
        ids = pa.array(np.arange(next_id, next_id + examples.num_rows, dtype=np.int64))
        splits[split], next_id = (
            examples.add_column(0, "sample_id", ids),
            next_id + examples.num_rows,
        )
    extra: dict[str, Any] = {"seq_len": cfg.seq_len, "counters": counters}
    if task == "translation":
        extra.update(max_src_len=cfg.max_src_len, max_tgt_len=cfg.max_tgt_len)
    if task == "classification":
        extra.update(
            labels=labels,
            label_counts={
                s: {
                    labels[y]: n for y, n in sorted(Counter(ex.column("label").to_pylist()).items())
                }
                for s, ex in splits.items()
            },
        )
    manifest = write_task(
        out / task, task, builder.schema, splits, cfg.shard_rows, builder.token_columns, extra
    )
    return {
        "manifest": f"{task}/manifest.json",
        "sha256": sha256_file(out / task / "manifest.json"),
        "splits": {
            s: {"rows": v["rows"], "tokens": v["tokens"]} for s, v in manifest["splits"].items()
        },
    }
