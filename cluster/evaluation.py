"""Scoring fine-tuned checkpoints on prepared splits, next to the trivial baselines they must beat."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import torch

from cluster.jobs import DecodeConfig
from data_pipeline.errors import DataError
from data_pipeline.tokenizer import TranslationTokenizers, load_translation_tokenizers
from finetune.evaluate import accuracy, macro_f1, majority_class_accuracy, mcc
from finetune.models import CLASSIFICATION_ARCHES, TRANSLATION_ARCHES, load_finetuned
from finetune.translate import evaluate_translation, translate_texts
from pretrain.checkpoint import CheckpointError


def read_split(task_dir: Path, split: str, columns: list[str]) -> dict[str, list[Any]]:
    files = sorted((task_dir / split).glob("*.parquet"))
    if not files:
        raise CheckpointError(f"{task_dir / split}: no shards (is this a prepared data directory?)")
    tables = [pq.read_table(f, columns=columns) for f in files]
    return {c: [v for t in tables for v in t.column(c).to_pylist()] for c in columns}


def evaluate_checkpoint(checkpoint: Path, data_dir: Path, split: str, decode: DecodeConfig,
                        out_dir: Path | None = None) -> dict[str, Any]:
    loaded = load_finetuned(Path(checkpoint))
    arch = loaded.model_config.arch
    model = loaded.model.eval()
    if arch in TRANSLATION_ARCHES:
        metrics, rows = _translation(model, Path(checkpoint), Path(data_dir), split, decode)
    elif arch in CLASSIFICATION_ARCHES:
        metrics, rows = _classification(model, Path(data_dir), split)
    else:
        raise CheckpointError(f"{checkpoint}: a '{arch}' checkpoint is not a fine-tuned model; nothing to evaluate")
    if out_dir is not None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
        (out_dir / "predictions.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return metrics


def _translation(model: torch.nn.Module, checkpoint: Path, data_dir: Path, split: str,
                 decode: DecodeConfig) -> tuple[dict[str, Any], list[dict]]:
    tokenizer = checkpoint_tokenizers(checkpoint)
    data = read_split(data_dir / "translation", split, ["src_text", "tgt_text"])
    srcs, refs = data["src_text"], data["tgt_text"]
    scores, hyps = evaluate_translation(model, tokenizer, srcs, refs, beam_size=decode.beam_size,
                                        length_penalty=decode.length_penalty, alpha=decode.alpha,
                                        max_len=decode.max_len, batch_size=decode.batch_size)
    exact = sum(h == r for h, r in zip(hyps, refs, strict=True)) / max(len(refs), 1)
    metrics = {**scores, "exact_match": exact, "sentences": len(refs), "beam_size": decode.beam_size}
    rows = [{"source": s, "reference": r, "hypothesis": h} for s, r, h in zip(srcs, refs, hyps, strict=True)]
    return metrics, rows


@torch.no_grad()
def _classification(model: torch.nn.Module, data_dir: Path, split: str) -> tuple[dict[str, Any], list[dict]]:
    task_dir = data_dir / "classification"
    data = read_split(task_dir, split, ["input_ids", "label", "text"])
    train_labels = read_split(task_dir, "train", ["label"])["label"]
    num_labels = model.config.num_labels
    preds: list[int] = []
    for start in range(0, len(data["input_ids"]), 64):
        rows = data["input_ids"][start : start + 64]
        width = max(len(r) for r in rows)
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
        preds += model(ids, (ids != 0).long()).argmax(-1).tolist()
    labels = data["label"]
    names = model.config.label_names or [str(i) for i in range(num_labels)]
    metrics = {
        "accuracy": accuracy(preds, labels, num_labels),
        "macro_f1": macro_f1(preds, labels, num_labels),
        "mcc": mcc(preds, labels, num_labels),
        "majority_class_accuracy": majority_class_accuracy(train_labels, labels),
        "examples": len(labels),
    }
    triples = zip(data["text"], labels, preds, strict=True)
    rows = [{"text": t, "label": names[y], "predicted": names[p]} for t, y, p in triples]
    return metrics, rows


def checkpoint_tokenizers(checkpoint: Path) -> TranslationTokenizers:
    """A translation checkpoint's source and target tokenizers (one shared one, unless it carries
    target_tokenizer.json); a missing or unreadable file is a CheckpointError naming it."""
    try:
        return load_translation_tokenizers(Path(checkpoint))
    except DataError as e:
        raise CheckpointError(str(e)) from None


def translation_model(checkpoint: Path) -> tuple[torch.nn.Module, TranslationTokenizers]:
    """(model in eval mode, its tokenizers) of a checkpoint whose model can translate; clear errors otherwise."""
    loaded = load_finetuned(Path(checkpoint))
    if loaded.model_config.arch not in TRANSLATION_ARCHES:
        raise CheckpointError(f"{checkpoint}: a '{loaded.model_config.arch}' checkpoint cannot translate")
    return loaded.model.eval(), checkpoint_tokenizers(checkpoint)


def translate_lines(checkpoint: Path, lines: list[str], beam: int, alpha: float, max_len: int) -> list[str]:
    model, tokenizer = translation_model(checkpoint)
    return translate_texts(model, tokenizer, lines, beam_size=beam, length_penalty="gnmt", alpha=alpha,
                           max_len=max_len)
