"""Classifying raw text with a fine-tuned classifier (`kiln predict`, `kiln evaluate --input`).

From the checkpoint alone, a text goes through what `kiln data prepare` and training did to it:
cleaned as data_pipeline.clean cleans it, tokenised with the checkpoint's own tokenizer.json,
framed `[CLS] text [SEP]` with the text cut to the data's seq_len - 2 tokens, and batched by the
training collator: padded with the tokenizer's [PAD] and masked by the lengths, never by reading
the ids back (in a GPT-2 vocabulary id 0 is "!").

Input files are parsed by data_pipeline.readers, so a bad one fails with the data pipeline's
one-line messages ("path:line: ..."); the keys those messages name are the command-line flags.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import torch
from tokenizers import Tokenizer
from torch import Tensor, nn

from data_pipeline import readers
from data_pipeline.clean import clean_text
from data_pipeline.collators import ClassificationCollator
from data_pipeline.errors import DataError
from data_pipeline.tokenizer import load_tokenizer, special_token_ids
from finetune.models import CLASSIFICATION_ARCHES, load_finetuned
from pretrain.checkpoint import CheckpointError, LoadedCheckpoint

BATCH_SIZE = 64
STDIN = "<stdin>"


@dataclass(frozen=True)
class TextRow:
    """One input text: its line (or row) number, the cleaned text, and its gold label if any."""

    line: int
    text: str
    label: str | None = None


# ------------------------------------------------------------------------------------ the model


@dataclass(frozen=True)
class TextClassifier:
    """A classifier with what it needs to read raw text as its training data was read."""

    model: nn.Module
    tokenizer: Tokenizer
    label_names: list[str]
    cls_id: int
    sep_id: int
    pad_id: int
    max_text_tokens: int | None  # tokens of text kept per row (seq_len - 2); None: no limit

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        """`[CLS] text [SEP]` per text, as data_pipeline.examples.build_classification frames it."""
        encoded = self.tokenizer.encode_batch(list(texts), add_special_tokens=False)
        keep = self.max_text_tokens
        return [
            [self.cls_id, *(e.ids if keep is None else e.ids[:keep]), self.sep_id] for e in encoded
        ]

    def probabilities(self, texts: Sequence[str], batch_size: int = BATCH_SIZE) -> Tensor:
        """(N, num_labels) softmax over the labels for cleaned texts."""
        return class_probabilities(self.model, self.encode(texts), self.pad_id, batch_size)


@torch.no_grad()
def class_probabilities(
    model: nn.Module, rows: Sequence[list[int]], pad_id: int, batch_size: int = BATCH_SIZE
) -> Tensor:
    """(N, num_labels) softmax for `[CLS] text [SEP]` id rows, batched by the training collator
    (padding with `pad_id`, the mask from the lengths). The model runs in eval mode and is
    returned to its previous mode."""
    collate = ClassificationCollator(pad_id)
    generator = torch.Generator()  # the collator's signature; classification draws nothing
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    chunks: list[Tensor] = []
    try:
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            batch = collate(
                [
                    {"input_ids": list(r), "label": 0, "sample_id": start + i}
                    for i, r in enumerate(chunk)
                ],
                generator,
            )
            ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
            chunks.append(model(ids, mask).float().softmax(dim=-1).cpu())  # (B, num_labels)
    finally:
        model.train(was_training)
    return torch.cat(chunks) if chunks else torch.zeros(0, model.config.num_labels)


def load_classifier(checkpoint: Path) -> TextClassifier:
    """A fine-tuned classifier with its tokenizer, label names and text length; clear errors
    for any other checkpoint."""
    return classifier_from(load_finetuned(Path(checkpoint)))


def classifier_from(loaded: LoadedCheckpoint) -> TextClassifier:
    """load_classifier for a checkpoint already loaded (load_finetuned)."""
    checkpoint, arch = loaded.path, loaded.model_config.arch
    if arch not in CLASSIFICATION_ARCHES:
        raise CheckpointError(
            f"{checkpoint}: a '{arch}' checkpoint is not a classifier "
            f"(fine-tuned {', '.join(CLASSIFICATION_ARCHES)})"
        )
    if loaded.tokenizer_file is None:
        raise CheckpointError(
            f"{checkpoint / 'tokenizer.json'}: missing; a classifier needs the "
            "tokenizer it was trained with"
        )
    tokenizer = load_tokenizer(loaded.tokenizer_file)  # unreadable: a DataError naming the file
    special = special_token_ids(tokenizer)  # load_tokenizer adds any special token it lacks
    config = loaded.model_config
    names = list(config.label_names) or [str(i) for i in range(config.num_labels)]
    return TextClassifier(
        loaded.model.eval(),
        tokenizer,
        names,
        special["[CLS]"],
        special["[SEP]"],
        special["[PAD]"],
        _text_budget(loaded),
    )


def _text_budget(loaded: LoadedCheckpoint) -> int | None:
    """Text tokens per row: the seq_len of the data the checkpoint was trained on (its manifest
    records that data manifest's path and sha256) less [CLS] and [SEP]; when that data is gone or
    changed, what the model's positions allow; None for a model without positions (biLSTM)."""
    seq_len = _data_seq_len(loaded.manifest.get("data_manifest") or {})
    if seq_len is None:
        config = loaded.model_config
        encoder, decoder = getattr(config, "encoder", None), getattr(config, "decoder", None)
        seq_len = getattr(encoder, "max_position_embeddings", None) or getattr(
            decoder, "n_positions", None
        )
    return None if seq_len is None else max(int(seq_len) - 2, 1)


def _data_seq_len(info: dict[str, Any]) -> int | None:
    try:
        data = Path(info["path"]).read_bytes()
        if hashlib.sha256(data).hexdigest() != info.get("sha256"):
            return None
        return int(json.loads(data)["config"]["seq_len"])
    except (KeyError, TypeError, ValueError, OSError):
        return None


# ------------------------------------------------------------------------------------ inputs


def read_texts(path: Path | None, column: str | None, stdin: TextIO | None = None) -> list[TextRow]:
    """Texts to classify: every non-blank line of a plain-text file (or of `stdin` when `path`
    is None), or the `column` of a TSV / CSV / JSONL / Parquet file (default "text"); cleaned
    as data preparation cleans them."""
    if path is None:
        if column is not None:
            raise DataError(
                f"{STDIN}: --column needs a .tsv, .csv, .jsonl or .parquet --input; "
                "stdin is read as plain text, one text per line"
            )
        text = (stdin.read() if stdin is not None else "").removeprefix("\ufeff")
        return _non_blank(STDIN, enumerate(text.split("\n"), start=1))
    where, fmt = str(path), readers.file_format(str(path))
    if fmt == "text":
        if column is not None:
            raise DataError(
                f"{where}: --column {column!r} needs a .tsv, .csv, .jsonl or .parquet "
                "file; a plain-text file is one text per line"
            )
        return _non_blank(where, ((n, line) for n, line, _ in readers.iter_lines(where)))
    columns: dict[str, str | int] = {"--column": column or "text"}
    opts = readers.ReadOptions("documents")
    return _non_blank(
        where,
        (
            (n, readers.make_row(where, n, values, bad, opts, columns)["text"])
            for n, values, bad in readers.records(where, fmt, columns)
        ),
    )


def _non_blank(where: str, lines: Iterable[tuple[int, str]]) -> list[TextRow]:
    rows = [
        TextRow(n, text) for n, line in lines if (text := clean_text(line, keep_newlines=False))
    ]
    if not rows:
        raise DataError(f"{where}: no text to classify (every line is blank)")
    return rows


def read_labelled(
    path: Path, text_column: str, label_column: str, label_names: Sequence[str]
) -> list[TextRow]:
    """Labelled rows of a TSV / CSV / JSONL / Parquet file, every label one the checkpoint knows;
    texts cleaned as data preparation cleans them, blank ones skipped (preparation drops them)."""
    where = str(path)
    columns: dict[str, str | int] = {"--text-column": text_column, "--label-column": label_column}
    out = []
    for number, values, bad in readers.records(where, readers.file_format(where), columns):
        row = readers.make_row(where, number, values, bad, readers.ReadOptions("labelled"), columns)
        if row["label"] not in label_names:
            raise DataError(
                f"{where}:{number}: label {row['label']!r} is not one of the "
                f"checkpoint's labels {list(label_names)}"
            )
        text = clean_text(row["text"], keep_newlines=False)
        if text:
            out.append(TextRow(number, text, row["label"]))
    if not out:
        raise DataError(f"{where}: no labelled text to score (every text is blank)")
    return out


def read_parallel(src: Path, ref: Path) -> tuple[list[str], list[str]]:
    """Sources and references of two line-aligned files, cleaned as data preparation cleans
    pairs; lines blank on both sides are skipped."""
    srcs, refs = [], []
    for pair in readers.aligned_pairs(str(src), str(ref), readers.ReadOptions("pairs")):
        srcs.append(clean_text(pair["src"], keep_newlines=False))
        refs.append(clean_text(pair["tgt"], keep_newlines=False))
    return srcs, refs


# ------------------------------------------------------------------------------------ output


def prediction_records(classifier: TextClassifier, rows: Sequence[TextRow]) -> list[dict[str, Any]]:
    """One record per row: line, text, label (the most probable) and every label's probability."""
    probs = classifier.probabilities([r.text for r in rows])
    names = classifier.label_names
    return [
        {
            "line": row.line,
            "text": row.text,
            "label": names[int(p.argmax())],
            "probabilities": dict(zip(names, p.tolist(), strict=True)),
        }
        for row, p in zip(rows, probs, strict=True)
    ]


def format_predictions(rows: Sequence[dict[str, Any]], names: Sequence[str], fmt: str) -> str:
    """ "tsv": a header `line text label prob_<name>...`, then a line per row (cleaned text holds
    no tab or newline); "jsonl": one JSON object per row."""
    if fmt == "jsonl":
        return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    lines = ["\t".join(["line", "text", "label", *(f"prob_{n}" for n in names)])]
    for r in rows:
        probs = [f"{r['probabilities'][n]:.6f}" for n in names]
        lines.append("\t".join([str(r["line"]), r["text"], r["label"], *probs]))
    return "".join(f"{line}\n" for line in lines)
