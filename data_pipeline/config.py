"""`DataConfig`: the flat, typed settings of `kiln data prepare`, checked before any work starts.

The bottom of the data pipeline: it imports only `configlib` (no Ray, torch, sources or readers),
and the modules that read data take their names from here (`SOURCE_KINDS` for sources.py,
`TASK_INPUTS` for examples.py).
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Literal

from data_pipeline.configlib import check_fields
from data_pipeline.errors import DataError
from data_pipeline.sample import MAX_SAMPLE_PAIRS

Source = Literal["sample", "text", "parallel", "labelled", "hf"]  # docs/data.md
Task = Literal["mlm_nsp", "clm", "translation", "classification"]
TokenizerKind = Literal[
    "bpe", "plain_bpe", "wordpiece", "wordpiece_uncased", "char"
]  # tokenizer.TOKENIZER_KINDS
TextUnit = Literal["file", "line", "block"]  # a document per file, non-blank line, blank-line block
EncodingErrors = Literal["strict", "replace"]
# hash: each row's split from its content and the seed (order-free); contiguous: the kept rows in input
# order cut into train | validation | test ranges (clean.split_contiguously, as kiln lm-baseline's split_path)
SplitMode = Literal["hash", "contiguous"]
# The row kinds each source can supply ("documents" {text}, "pairs" {src, tgt}, "labelled" {text,
# label}), and the one each task's example builder consumes.
SOURCE_KINDS: dict[str, tuple[str, ...]] = {
    "sample": ("documents", "pairs", "labelled"),
    "text": ("documents",),
    "parallel": ("pairs",),
    "labelled": ("labelled",),
    "hf": ("documents", "pairs", "labelled"),
}
TASK_INPUTS: dict[str, str] = {
    "mlm_nsp": "documents",
    "clm": "documents",
    "translation": "pairs",
    "classification": "labelled",
}


@dataclass
class DataConfig:
    """Everything `prepare()` needs; the defaults build the built-in sample for the ~10-minute quickstart."""

    source: Source = "sample"
    # text: files/dirs/globs (.gz ok) of plain text, or .jsonl/.csv/.tsv/.parquet with a text_column;
    # parallel: two line-aligned files (src, tgt), or .tsv (2 columns, or src_column/tgt_column by header name,
    # or by 0-based index into header-less lines), .csv/.jsonl/.parquet with src_column/tgt_column;
    # labelled: .tsv (header)/.csv/.jsonl/.parquet.
    paths: list[str] = field(default_factory=list, metadata={"path": "path"})
    text_unit: TextUnit = "block"  # plain text: how documents are cut
    wikitext_headings: bool = (
        False  # a " = Title = " line also starts a document (WikiText's articles)
    )
    # WikiText's tokenised text ("the game 's score , 1 @,@ 000 .") back to running text ("the game's score,
    # 1,000."), so a byte-level BPE sees punctuation as ordinary text has it (readers.detokenize_wikitext)
    wikitext_detokenize: bool = False
    encoding_errors: EncodingErrors = "strict"  # replace: bad bytes become U+FFFD, counted
    text_column: str = "text"
    label_column: str = "label"
    # parallel data in named columns, or (int) in columns 0, 1, ... of a header-less TSV such as Tatoeba's
    # english<TAB>other<TAB>attribution (None: two positional TSV columns)
    src_column: str | int | None = None
    tgt_column: str | int | None = None
    labels: list[str] | None = (
        None  # the label set, in id order; a label outside it is an error. None: inferred
    )
    # source hf: a save_to_disk directory, data files (path or glob), or a Hub name
    hf_name: str | None = field(default=None, metadata={"path": "local_or_name"})
    hf_split: str = "train"
    seed: int = 0
    # Sizes of the built-in sample. Documents are capped at what the Python install bundles
    # (about 160 on CPython 3.11: every pydoc topic plus the longer module docstrings).
    sample_docs: int = 1000
    sample_pairs: int = 6000
    sample_labelled: int = 1500
    tokenizer: TokenizerKind = "bpe"  # bpe: byte-level, like GPT-2; plain_bpe: over characters
    # load tokenizer.json / vocab.txt / vocab.json+merges.txt instead of training
    tokenizer_path: str | None = field(default=None, metadata={"path": "path"})
    # translation only: targets get their own vocabulary (e.g. a GPT-2 release's, with a BERT's as tokenizer_path),
    # saved as target_tokenizer.json; each side is framed with its own specials (docs/design.md)
    target_tokenizer_path: str | None = field(default=None, metadata={"path": "path"})
    vocab_size: int = 4096
    tasks: list[Task] = field(default_factory=lambda: list(TASK_INPUTS))
    # mlm_nsp: cut each document into segment pairs this many times, with fresh random cuts and
    # negatives each pass (BERT's dupe_factor); > 1 keeps a small corpus's pairs from being memorised
    nsp_dupe_factor: int = 1
    seq_len: int = 64  # mlm_nsp rows hold at most seq_len tokens; clm blocks seq_len + 1; classification seq_len
    max_src_len: int = 64  # translation pairs longer than this (in tokens, with [EOS]) are dropped
    max_tgt_len: int = 64  # ... and with [BOS] and [EOS]
    # Exact duplicates (same cleaned text fields) are dropped, the first occurrence kept. Off for text whose
    # repeats are content, e.g. tiny-shakespeare's speaker lines ("First Citizen:") with text_unit: line.
    dedupe: bool = True
    split: SplitMode = "hash"
    validation_fraction: float = 0.05
    # hash split: translation and classification only, documents get train/validation. contiguous split:
    # every kind; documents' test range is held out (no task writes it), as lm-baseline's test lines.
    test_fraction: float = 0.05
    shard_rows: int = 4096
    min_chars: int = (
        1  # rows with a text field shorter than this are dropped (counted as too_short)
    )
    max_chars: int = 100_000  # ... longer than this (too_long); the longest pydoc topic is ~63k

    def __post_init__(self) -> None:
        check_fields(self, where="", error=DataError)  # types and choices, as a recipe's
        self._check_names()
        self._check_numbers()

    def _check_names(self) -> None:
        if not self.tasks:
            raise DataError("tasks: at least one task is needed")
        for task in self.tasks:
            needs, supplies = TASK_INPUTS[task], SOURCE_KINDS[self.source]
            if needs not in supplies:
                raise DataError(
                    f"tasks: source {self.source!r} supplies {list(supplies)}, "
                    f"but task {task!r} needs {needs}"
                )
        if len(set(self.tasks)) != len(self.tasks):
            raise DataError(f"tasks: duplicate entries in {self.tasks}")
        self._check_inputs()

    def _check_inputs(self) -> None:
        if self.wikitext_headings and self.text_unit == "line":
            raise DataError(
                "wikitext_headings: has no effect with text_unit 'line'; use 'file' (articles) or 'block'"
            )
        if self.wikitext_detokenize and self.source != "text":
            raise DataError(
                f"wikitext_detokenize: rewrites documents read from paths (source 'text'), not source "
                f"{self.source!r}"
            )
        if self.source in ("sample", "hf") and self.paths:
            raise DataError(
                f"paths: source {self.source!r} reads no paths"
                + ("; name the dataset with hf_name" if self.source == "hf" else "")
            )
        if self.source not in ("sample", "hf") and not self.paths:
            raise DataError(f"paths: source {self.source!r} needs at least one path")
        if (self.source == "hf") != (self.hf_name is not None):
            raise DataError(
                "hf_name: "
                + (
                    "source 'hf' needs hf_name"
                    if self.source == "hf"
                    else f"only source 'hf' reads hf_name (source is {self.source!r})"
                )
            )
        for key in (
            "text_column",
            "label_column",
            "src_column",
            "tgt_column",
            "hf_name",
            "hf_split",
        ):
            if getattr(self, key) == "":
                raise DataError(f"{key}: must not be empty")
        if (self.src_column is None) != (self.tgt_column is None):
            raise DataError("src_column: set both src_column and tgt_column, or neither")
        self._check_column_indices()
        self._check_target_tokenizer()
        if self.labels is not None:
            self.labels = [
                " ".join(label.split()) for label in self.labels
            ]  # as cleaning normalises labels
            if not self.labels or "" in self.labels or len(set(self.labels)) != len(self.labels):
                raise DataError(f"labels: need distinct non-empty labels, got {self.labels}")
            if "labelled" not in self.row_kinds():
                raise DataError("labels: only the classification task reads labels")

    def _check_column_indices(self) -> None:
        indices = [isinstance(c, int) for c in (self.src_column, self.tgt_column)]
        if not any(indices):
            return
        pair = f"{self.src_column!r} and {self.tgt_column!r}"
        if not all(indices):
            raise DataError(
                f"src_column: give both columns as header names or both as 0-based indices, got {pair}"
            )
        if min(self.src_column, self.tgt_column) < 0 or self.src_column == self.tgt_column:  # type: ignore[type-var]
            raise DataError(f"src_column: column indices count from 0 and must differ, got {pair}")
        if self.source != "parallel":
            raise DataError(
                f"src_column: column indices are for header-less tab-separated files (source "
                f"'parallel'); name the columns of source {self.source!r}"
            )

    def _check_target_tokenizer(self) -> None:
        if self.target_tokenizer_path is None:
            return
        if self.tasks != ["translation"]:
            raise DataError(
                f"target_tokenizer_path: only the translation task has a target side (tasks are "
                f"{self.tasks}); prepare the other tasks in a separate run"
            )
        if self.tokenizer_path is None:
            raise DataError(
                "target_tokenizer_path: needs tokenizer_path too (the source side's vocabulary, e.g. "
                "the BERT release the encoder comes from)"
            )

    def row_kinds(self) -> list[str]:
        """The source row kinds the tasks need, in task order."""
        return list(dict.fromkeys(TASK_INPUTS[task] for task in self.tasks))

    def _check_numbers(self) -> None:
        minimum = {
            "sample_docs": 2,
            "sample_pairs": 1,
            "sample_labelled": 1,
            "shard_rows": 1,
            "min_chars": 0,
            "seq_len": 8,
            "max_src_len": 2,
            "max_tgt_len": 3,
            "seed": 0,
            "nsp_dupe_factor": 1,
        }
        for key, low in minimum.items():
            if getattr(self, key) < low:
                raise DataError(f"{key}: must be >= {low}, got {getattr(self, key)}")
        if self.sample_pairs > MAX_SAMPLE_PAIRS:
            raise DataError(
                f"sample_pairs: the built-in sample has {MAX_SAMPLE_PAIRS} distinct pairs, "
                f"asked for {self.sample_pairs}"
            )
        if self.max_chars < max(self.min_chars, 1):
            raise DataError(
                f"max_chars: must be >= min_chars ({self.min_chars}) and >= 1, got {self.max_chars}"
            )
        # Byte-level BPE starts from 256 byte symbols; the others need room for an alphabet.
        low_vocab = 7 + 256 if self.tokenizer == "bpe" else 64
        if self.tokenizer_path is None and self.vocab_size < low_vocab:
            raise DataError(
                f"vocab_size: tokenizer {self.tokenizer!r} needs >= {low_vocab}, got {self.vocab_size}"
            )
        for key in ("validation_fraction", "test_fraction"):
            if not 0.0 <= getattr(self, key) < 1.0:
                raise DataError(f"{key}: must be in [0, 1), got {getattr(self, key)}")
        if self.validation_fraction + self.test_fraction >= 1.0:
            raise DataError(
                "validation_fraction: validation_fraction + test_fraction must be < 1 "
                f"(got {self.validation_fraction} + {self.test_fraction})"
            )

    def to_dict(self) -> dict[str, typing.Any]:
        """JSON-ready copy (recorded in the top-level manifest)."""
        return dataclasses.asdict(self)
