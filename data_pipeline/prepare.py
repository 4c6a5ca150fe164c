"""`prepare()`: source -> clean / de-dup / split -> tokenizer -> tokenize -> examples -> shards + manifests.

Ray Data reads, cleans and tokenizes (`map_batches`, order preserved). The driver does what needs a
global view: exact de-duplication (first occurrence wins), counting every dropped row by reason,
training the tokenizer, and building examples (NSP draws its random B from any document of the split;
causal-LM packing runs across documents). Everything is written under a temporary directory beside
`out_dir` that is renamed to `out_dir` only when complete.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import shutil
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from importlib import metadata
from pathlib import Path
from typing import Any, TypeVar

import pyarrow as pa
import pyarrow.compute as pc
import ray
import ray.data
from tokenizers import Tokenizer

from data_pipeline.clean import DROP_REASONS, SPLITS, TEXT_FIELDS, clean_batch
from data_pipeline.config import DataConfig
from data_pipeline.errors import DataError
from data_pipeline.examples import BUILDERS, BuildParams
from data_pipeline.shards import refuse_non_empty, sha256_file, write_json, write_task
from data_pipeline.sources import SOURCES, expand_paths
from data_pipeline.tokenizer import load_tokenizer, special_token_ids, tokenize_batch, train_tokenizer

FORMAT = "kiln-data/1"
T = TypeVar("T")
_BLOCK_ROWS = 2048  # rows per Ray block when tokenizing: a few blocks per core on the sample


def prepare(cfg: DataConfig, out_dir: str | os.PathLike[str],
            progress: Callable[[str], None] | None = None) -> dict:
    """Prepare every task of `cfg` into `out_dir` (which must not exist or be empty); returns the top manifest."""
    out_dir = Path(out_dir)
    refuse_non_empty(out_dir)
    say = progress or (lambda msg: None)
    start = time.perf_counter()
    tmp = out_dir.parent / f".tmp-{out_dir.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)  # a leftover of a crashed run of this same process id
    tmp.mkdir(parents=True)
    try:
        with _quiet_ray_data():
            manifest = _prepare_into(cfg, tmp, say)
        if out_dir.exists():
            out_dir.rmdir()  # empty, checked above
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    say(f"prepared {', '.join(cfg.tasks)} in {out_dir} in {time.perf_counter() - start:.1f} s")
    return manifest


def _prepare_into(cfg: DataConfig, out: Path, say: Callable[[str], None]) -> dict:
    kinds = list(dict.fromkeys(BUILDERS[t].input_kind for t in cfg.tasks))
    kept: dict[str, pa.Table] = {}
    sources: dict[str, Any] = {}
    dropped: dict[str, dict[str, int]] = {}
    for kind, result in zip(kinds, _concurrently(lambda k: _read_and_clean(cfg, k), kinds), strict=True):
        kept[kind], sources[kind], dropped[kind] = result
        say(f"{kind}: {sources[kind]['rows_read']} read, {sources[kind]['kept']} kept, "
            f"dropped {dropped[kind]}, splits {sources[kind]['splits']}")
    tok, tok_info = _get_tokenizer(cfg, kept, say)
    tok.save(str(out / "tokenizer.json"))
    tok_info["sha256"] = sha256_file(out / "tokenizer.json")
    special = special_token_ids(tok)
    labels = _label_names(kept["labelled"]) if "labelled" in kept else []
    tokenized = dict(zip(kinds, _concurrently(lambda k: _tokenize(kept[k], tok, k, cfg.tasks), kinds), strict=True))
    params = BuildParams(cfg.seq_len, cfg.max_src_len, cfg.max_tgt_len, special)
    tasks = {}
    for task in cfg.tasks:
        tasks[task] = _build_task(cfg, task, tokenized[BUILDERS[task].input_kind], params, labels, out)
        say(f"{task}: " + ", ".join(f"{s} {v['rows']} rows / {v['tokens']} tokens"
                                    for s, v in tasks[task]["splits"].items()))
    manifest = {"format": FORMAT, "config": cfg.to_dict(), "seed": cfg.seed, "inputs": _inputs(cfg),
                "sources": sources, "dropped": dropped, "tokenizer": tok_info, "special_tokens": special,
                "vocab_size": tok.get_vocab_size(), "tasks": tasks}
    write_json(out / "manifest.json", manifest)
    return manifest


def _inputs(cfg: DataConfig) -> dict:
    """Provenance: the files read (with sha256), or the versions the built-in sample depends on."""
    if cfg.source == "sample":
        return {"source": "sample", "python": sys.version.split()[0], "num2words": metadata.version("num2words")}
    files = [{"path": p, "bytes": os.path.getsize(p), "sha256": sha256_file(p)} for p in expand_paths(cfg.paths)]
    return {"source": cfg.source, "files": files}


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
    if not ray.is_initialized():
        ray.init(include_dashboard=False, log_to_driver=False)
    ctx = ray.data.DataContext.get_current()
    saved = ctx.enable_progress_bars, ctx.execution_options.preserve_order
    logger = logging.getLogger("ray.data")
    level = logger.level
    ctx.enable_progress_bars, ctx.execution_options.preserve_order = False, True  # deterministic output order
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        ctx.enable_progress_bars, ctx.execution_options.preserve_order = saved
        logger.setLevel(level)


def _read_and_clean(cfg: DataConfig, kind: str) -> tuple[pa.Table, dict, dict[str, int]]:
    """Read + clean in Ray; on the driver: raise parse errors, count drops, keep first occurrences."""
    test_fraction = 0.0 if kind == "documents" else cfg.test_fraction  # documents: train/validation only
    ds = SOURCES[cfg.source].read(cfg, kind).map_batches(
        clean_batch, batch_format="pyarrow", batch_size=None, fn_kwargs={
            "kind": kind, "min_chars": cfg.min_chars, "max_chars": cfg.max_chars, "seed": cfg.seed,
            "validation_fraction": cfg.validation_fraction, "test_fraction": test_fraction})
    dropped: Counter[str] = Counter({reason: 0 for reason in DROP_REASONS})
    seen: set[str] = set()
    tables, read = [], 0
    for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
        errors = [e for e in batch.column("error").to_pylist() if e]
        if errors:
            raise DataError(errors[0])
        keep = []
        for reason, key in zip(batch.column("drop").to_pylist(), batch.column("key").to_pylist(), strict=True):
            reason = reason or ("duplicate" if key in seen else "")
            seen.add(key)
            if reason:
                dropped[reason] += 1
            keep.append(not reason)
        read += batch.num_rows
        tables.append(batch.filter(pa.array(keep, pa.bool_())).drop_columns(["drop", "key", "error"]))
    if read == 0:
        raise DataError(f"paths: source {cfg.source!r} gave no {kind} rows from {cfg.paths}")
    table = pa.concat_tables(tables)
    if table.num_rows == 0:
        raise DataError(f"min_chars: all {read} {kind} rows were dropped ({dict(dropped)}); check the input, "
                        "min_chars and max_chars")
    splits = Counter(table.column("split").to_pylist())
    info = {"rows_read": read, "kept": table.num_rows, "splits": {s: splits.get(s, 0) for s in SPLITS}}
    return table, info, dict(dropped)


def _get_tokenizer(cfg: DataConfig, kept: dict[str, pa.Table], say: Callable[[str], None]) -> tuple[Tokenizer, dict]:
    start = time.perf_counter()
    if cfg.tokenizer_path is not None:
        tok = load_tokenizer(cfg.tokenizer_path)
        say(f"tokenizer: loaded {cfg.tokenizer_path} (vocabulary {tok.get_vocab_size()})")
        return tok, {"file": "tokenizer.json", "kind": "loaded", "loaded_from": cfg.tokenizer_path}

    def train_texts() -> Iterator[str]:
        # Train split only: validation and test text stays unseen, even by the vocabulary.
        for kind, table in kept.items():
            train = table.filter(pc.equal(table.column("split"), "train"))
            for name in TEXT_FIELDS[kind]:
                yield from train.column(name).to_pylist()

    tok = train_tokenizer(cfg.tokenizer, train_texts(), cfg.vocab_size)
    say(f"tokenizer: trained {cfg.tokenizer}, vocabulary {tok.get_vocab_size()} in {time.perf_counter() - start:.1f} s")
    return tok, {"file": "tokenizer.json", "kind": cfg.tokenizer, "loaded_from": None}


def _label_names(table: pa.Table) -> list[str]:
    """Sorted label strings; numerically when every label is an integer ("2" < "10")."""
    names = set(table.column("label").to_pylist())
    if all(n.lstrip("-").isdigit() for n in names):
        return sorted(names, key=int)
    return sorted(names)


def _tokenize(table: pa.Table, tok: Tokenizer, kind: str, tasks: list[str]) -> dict[str, list[dict]]:
    """Tokenize in Ray (order preserved); returns the rows of each split as dicts."""
    blocks = [table.slice(i, _BLOCK_ROWS) for i in range(0, table.num_rows, _BLOCK_ROWS)]
    ds = ray.data.from_arrow(blocks).map_batches(tokenize_batch, batch_format="pyarrow", batch_size=None, fn_kwargs={
        "tokenizer_json": tok.to_str(), "kind": kind, "segments": "mlm_nsp" in tasks, "whole": "clm" in tasks})
    rows: dict[str, list[dict]] = {split: [] for split in SPLITS}
    for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
        for row in batch.to_pylist():
            rows[row["split"]].append(row)
    return rows


def _build_task(cfg: DataConfig, task: str, rows: dict[str, list[dict]], params: BuildParams, labels: list[str],
                out: Path) -> dict:
    builder = BUILDERS[task]
    label_ids = {name: i for i, name in enumerate(labels)}
    splits, counters, next_id = {}, {}, 0
    for split in builder.splits:
        inputs = rows[split]
        if task == "classification":
            inputs = [{**r, "label": label_ids[r["label"]]} for r in inputs]
        try:
            examples, counters[split] = builder.build(inputs, params, random.Random(f"{cfg.seed}-{task}-{split}"))
        except DataError as e:
            raise DataError(f"{e} (split {split!r}: raise validation_fraction or add input)") from None
        if split == "train" and not examples:
            raise DataError(f"seq_len: task {task} got no train examples from {len(inputs)} inputs "
                            f"({counters[split]}); check seq_len, max_src_len and max_tgt_len")
        for example in examples:
            example["sample_id"], next_id = next_id, next_id + 1  # unique across the splits of the task
        splits[split] = examples
    extra: dict[str, Any] = {"seq_len": cfg.seq_len, "counters": counters}
    if task == "translation":
        extra.update(max_src_len=cfg.max_src_len, max_tgt_len=cfg.max_tgt_len)
    if task == "classification":
        extra.update(labels=labels, label_counts={
            s: {labels[y]: n for y, n in sorted(Counter(r["label"] for r in ex).items())} for s, ex in splits.items()})
    manifest = write_task(out / task, task, builder.schema, splits, cfg.shard_rows, builder.token_columns, extra)
    return {"manifest": f"{task}/manifest.json", "sha256": sha256_file(out / task / "manifest.json"),
            "splits": {s: {"rows": v["rows"], "tokens": v["tokens"]} for s, v in manifest["splits"].items()}}
