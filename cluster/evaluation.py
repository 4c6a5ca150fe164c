"""Scoring fine-tuned checkpoints, next to the trivial baselines they must beat: on a prepared
split (`kiln evaluate --data DIR --split`), or on raw files tokenised with the checkpoint's own
tokenizer(s) (`--input` for classifiers, `--src --ref` for translation; finetune/predict.py
reads them)."""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import torch

from cluster.jobs import DecodeConfig
from data_pipeline.errors import DataDirError, DataError
from data_pipeline.shards import read_manifest as read_data_manifest
from data_pipeline.shards import read_split as read_shards
from data_pipeline.storage import Location, is_remote
from data_pipeline.tokenizer import TranslationTokenizers, load_translation_tokenizers
from finetune import predict
from finetune.evaluate import accuracy, macro_f1, majority_class_accuracy, mcc
from finetune.models import CLASSIFICATION_ARCHES, TRANSLATION_ARCHES, load_finetuned
from finetune.translate import evaluate_translation, translate_texts
from pretrain.checkpoint import CheckpointError, LoadedCheckpoint, fetch_checkpoint


def read_split(task_dir: Path | str, split: str, columns: list[str]) -> dict[str, list[Any]]:
    """Columns of one split of a prepared task directory: a local one's shards as they lie, a
    remote one's (a URI) as its manifest lists them, each checked against its sha256."""
    if is_remote(task_dir):
        return _read_remote_split(task_dir, split, columns)
    task_dir = Path(task_dir)
    files = sorted((task_dir / split).glob("*.parquet"))
    if not files:
        raise DataDirError(f"{task_dir / split}: no shards (is this a prepared data directory?)")
    tables = [pq.read_table(f, columns=columns) for f in files]
    return {c: [v for t in tables for v in t.column(c).to_pylist()] for c in columns}


def _read_remote_split(task_dir: str, split: str, columns: list[str]) -> dict[str, list[Any]]:
    task = Location.of(task_dir)
    if split not in read_data_manifest(task.text).get("splits", {}):
        raise DataDirError(f"{task / split}: no shards (is this a prepared data directory?)")
    table = read_shards(task.text, split, columns)
    return {c: table.column(c).to_pylist() for c in columns}


def task_dir(data_dir: Path | str, task: str) -> Path | str:
    """A task directory of a prepared data directory: a local path, or a URI read in place."""
    if is_remote(data_dir):
        return (Location.of(data_dir) / task).text
    return Path(data_dir) / task


def recipe_decode(
    decode: DecodeConfig, loaded: LoadedCheckpoint, keys: tuple[str, ...]
) -> DecodeConfig:
    """`decode` with the fields `keys` (those the user left unset) taken from the fine-tuning job's
    own `decode`, which the checkpoint's manifest records: a recipe's tuned length penalty keeps
    applying when its checkpoint is scored again. Checkpoints without a job config keep `decode`."""
    recorded = (loaded.job_config or {}).get("decode") or {}
    return dataclasses.replace(decode, **{k: recorded[k] for k in keys if k in recorded})


def evaluate_checkpoint(
    checkpoint: Path | str,
    data_dir: Path | str,
    split: str,
    decode: DecodeConfig,
    out_dir: Path | None = None,
    from_recipe: tuple[str, ...] = (),
) -> dict[str, Any]:
    """from_recipe: DecodeConfig fields read from the checkpoint's job config (`recipe_decode`)."""
    # A checkpoint on object storage is read from a verified local copy (the cache); data there
    # is read in place, only the splits scored, each shard checked against its sha256.
    checkpoint = fetch_checkpoint(checkpoint)
    loaded = load_finetuned(checkpoint)
    arch = loaded.model_config.arch
    model = loaded.model.eval()
    if arch in TRANSLATION_ARCHES:
        data = read_split(task_dir(data_dir, "translation"), split, ["src_text", "tgt_text"])
        srcs, refs = data["src_text"], data["tgt_text"]
        decode = recipe_decode(decode, loaded, from_recipe)
        metrics, rows = _translation(model, Path(checkpoint), srcs, refs, decode)
    elif arch in CLASSIFICATION_ARCHES:
        metrics, rows = _classification(model, data_dir, split)
    else:
        raise CheckpointError(
            f"{checkpoint}: a '{arch}' checkpoint is not a fine-tuned model; nothing to evaluate"
        )
    _write_results(out_dir, metrics, rows)
    return metrics


def evaluate_labelled_file(
    checkpoint: Path,
    path: Path,
    text_column: str = "text",
    label_column: str = "label",
    out_dir: Path | None = None,
) -> dict[str, Any]:
    """A classifier scored on a raw labelled TSV / CSV / JSONL / Parquet file (an official dev
    set), read with the checkpoint's tokenizer and label set: the metrics and predictions of a
    prepared split of those rows, and the baselines that need no training split."""
    classifier = _classifier_for(Path(checkpoint))
    rows = predict.read_labelled(Path(path), text_column, label_column, classifier.label_names)
    texts = [r.text for r in rows]
    labels = [classifier.label_names.index(str(r.label)) for r in rows]
    probs = classifier.probabilities(texts)
    metrics = _classification_metrics(probs, labels)
    metrics.update(
        split_majority_rate=max(Counter(labels).values()) / len(labels),
        uniform_chance=1.0 / len(classifier.label_names),
    )
    _write_results(
        out_dir, metrics, _classification_rows(texts, labels, probs, classifier.label_names)
    )
    return metrics


def evaluate_parallel_files(
    checkpoint: Path,
    src: Path,
    ref: Path,
    decode: DecodeConfig,
    out_dir: Path | None = None,
    from_recipe: tuple[str, ...] = (),
) -> dict[str, Any]:
    """A translation model scored on two line-aligned raw files (sources, references), through its
    own source and target tokenizers: the metrics and predictions of a prepared split of them.
    from_recipe as `evaluate_checkpoint`."""
    loaded = load_finetuned(Path(checkpoint))
    arch = loaded.model_config.arch
    if arch not in TRANSLATION_ARCHES:
        raise CheckpointError(
            f"{checkpoint}: a '{arch}' checkpoint does not translate; score a "
            "classifier with --input FILE"
        )
    srcs, refs = predict.read_parallel(Path(src), Path(ref))
    decode = recipe_decode(decode, loaded, from_recipe)
    metrics, rows = _translation(loaded.model.eval(), Path(checkpoint), srcs, refs, decode)
    _write_results(out_dir, metrics, rows)
    return metrics


def _classifier_for(checkpoint: Path) -> predict.TextClassifier:
    """finetune.predict.load_classifier, naming the flags to use for a translation checkpoint."""
    loaded = load_finetuned(checkpoint)
    arch = loaded.model_config.arch
    if arch in TRANSLATION_ARCHES:
        raise CheckpointError(
            f"{checkpoint}: a '{arch}' checkpoint translates; score it with --src FILE --ref FILE"
        )
    return predict.classifier_from(loaded)


def _write_results(out_dir: Path | None, metrics: dict[str, Any], rows: list[dict]) -> None:
    if out_dir is None:
        return
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    (out_dir / "predictions.jsonl").write_text(lines)


def _translation(
    model: torch.nn.Module, checkpoint: Path, srcs: list[str], refs: list[str], decode: DecodeConfig
) -> tuple[dict[str, Any], list[dict]]:
    tokenizer = checkpoint_tokenizers(checkpoint)
    scores, hyps = evaluate_translation(
        model,
        tokenizer,
        srcs,
        refs,
        beam_size=decode.beam_size,
        length_penalty=decode.length_penalty,
        alpha=decode.alpha,
        max_len=decode.max_len,
        batch_size=decode.batch_size,
    )
    exact = sum(h == r for h, r in zip(hyps, refs, strict=True)) / max(len(refs), 1)
    metrics = {
        **scores,
        "exact_match": exact,
        "sentences": len(refs),
        "beam_size": decode.beam_size,
        "length_penalty": decode.length_penalty,
        "alpha": decode.alpha,
    }
    rows = [
        {"source": s, "reference": r, "hypothesis": h}
        for s, r, h in zip(srcs, refs, hyps, strict=True)
    ]
    return metrics, rows


def _classification(
    model: torch.nn.Module, data_dir: Path | str, split: str
) -> tuple[dict[str, Any], list[dict]]:
    where = task_dir(data_dir, "classification")
    data = read_split(where, split, ["input_ids", "label", "text"])
    # padded and masked as the training collator does: the data's [PAD] id and the row lengths
    # (a real token may have id 0, as "!" in GPT-2's vocabulary)
    pad_id = int(read_data_manifest(data_dir)["special_tokens"]["[PAD]"])
    probs = predict.class_probabilities(model, data["input_ids"], pad_id)
    labels = data["label"]
    names = model.config.label_names or [str(i) for i in range(model.config.num_labels)]
    metrics = _classification_metrics(probs, labels)
    metrics.update(classification_baselines(where, split, model.config.num_labels))
    return metrics, _classification_rows(data["text"], labels, probs, names)


def classification_baselines(task_dir: Path | str, split: str, num_labels: int) -> dict[str, float]:
    """What a classifier's accuracy on `split` of a prepared classification task is set against:

    majority_class_accuracy  the training split's most frequent label, always answered
    split_majority_rate      the share of `split`'s own most frequent label (no constant answer
                             scores more)
    uniform_chance           1 / number of labels
    bow_accuracy, bow_macro_f1  a bag-of-words logistic regression trained on the training split
    """
    train = read_split(task_dir, "train", ["text", "label"])
    test = read_split(task_dir, split, ["text", "label"])
    counts = Counter(test["label"])
    bow = bow_logistic_regression(
        train["text"], train["label"], _validation_rows(task_dir), test["text"]
    )
    return {
        "majority_class_accuracy": majority_class_accuracy(train["label"], test["label"]),
        "split_majority_rate": max(counts.values()) / len(test["label"]),
        "uniform_chance": 1.0 / num_labels,
        "bow_accuracy": accuracy(bow, test["label"], num_labels),
        "bow_macro_f1": macro_f1(bow, test["label"], num_labels),
    }


def _validation_rows(task_dir: Path | str) -> tuple[list[str], list[int]] | None:
    try:
        rows = read_split(task_dir, "validation", ["text", "label"])
    except DataDirError:  # validation_fraction 0: no shards
        return None
    return (rows["text"], rows["label"]) if rows["label"] else None


_BOW_C_GRID = (0.1, 1.0, 10.0, 100.0)  # the bag-of-words regularisation, chosen on validation


def bow_logistic_regression(
    train_texts: list[str],
    train_labels: list[int],
    validation: tuple[list[str], list[int]] | None,
    texts: list[str],
) -> list[int]:
    """Labels for `texts` from scikit-learn's logistic regression on TF-IDF word unigrams and
    bigrams, trained on (train_texts, train_labels); its regularisation C is the best of a small
    grid on `validation` (C=1 without one), so the baseline is tuned as the model it is compared
    with is (on validation)."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    def fit(c: float) -> Any:
        model = make_pipeline(
            TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True),
            LogisticRegression(C=c, max_iter=2000),
        )
        return model.fit(train_texts, train_labels)

    best = 1.0
    if validation is not None:
        scores = {c: (fit(c).predict(validation[0]) == validation[1]).mean() for c in _BOW_C_GRID}
        best = max(_BOW_C_GRID, key=lambda c: (scores[c], -c))  # ties: the stronger regularisation
    return [int(y) for y in fit(best).predict(texts)]


def _classification_metrics(probs: torch.Tensor, labels: list[int]) -> dict[str, Any]:
    """accuracy, macro-F1 and MCC of the most probable labels; `examples` scored."""
    num_labels = probs.size(1)
    preds = probs.argmax(dim=-1).tolist()
    return {
        "accuracy": accuracy(preds, labels, num_labels),
        "macro_f1": macro_f1(preds, labels, num_labels),
        "mcc": mcc(preds, labels, num_labels),
        "examples": len(labels),
    }


def _classification_rows(
    texts: list[str], labels: list[int], probs: torch.Tensor, names: list[str]
) -> list[dict[str, Any]]:
    """predictions.jsonl: text, gold label, predicted label and its probability (`confidence`)."""
    best, index = probs.max(dim=-1)
    return [
        {"text": t, "label": names[y], "predicted": names[int(p)], "confidence": float(c)}
        for t, y, p, c in zip(texts, labels, index, best, strict=True)
    ]


def checkpoint_tokenizers(checkpoint: Path) -> TranslationTokenizers:
    """A translation checkpoint's source and target tokenizers (one shared one, unless it carries
    target_tokenizer.json); a missing or unreadable file is a CheckpointError naming it."""
    try:
        return load_translation_tokenizers(Path(checkpoint))
    except DataError as e:
        raise CheckpointError(str(e)) from None


def translation_model(checkpoint: Path) -> tuple[torch.nn.Module, TranslationTokenizers]:
    """(model in eval mode, its tokenizers) of a checkpoint whose model can translate; clear errors otherwise."""
    model, tokenizers, _ = translation_decoder(checkpoint, "gnmt", 0.6)
    return model, tokenizers


def translation_decoder(
    checkpoint: Path, length_penalty: str | None, alpha: float | None
) -> tuple[torch.nn.Module, TranslationTokenizers, DecodeConfig]:
    """`translation_model` and the length penalty to decode with: `length_penalty` and `alpha` as
    given, those left unset (None) from the checkpoint's recipe `decode` (`recipe_decode`, as
    `kiln evaluate` scores it), else DecodeConfig's defaults."""
    loaded = load_finetuned(Path(checkpoint))
    if loaded.model_config.arch not in TRANSLATION_ARCHES:
        raise CheckpointError(
            f"{checkpoint}: a '{loaded.model_config.arch}' checkpoint cannot translate"
        )
    given, unset = decode_given(length_penalty, alpha)
    decode = recipe_decode(given, loaded, unset)
    return loaded.model.eval(), checkpoint_tokenizers(checkpoint), decode


def decode_given(
    length_penalty: str | None, alpha: float | None, **fixed: Any
) -> tuple[DecodeConfig, tuple[str, ...]]:
    """A command's DecodeConfig from its flags, and the fields the user left unset (None), which
    `recipe_decode` then takes from the checkpoint's recipe."""
    given = {"length_penalty": length_penalty, "alpha": alpha}
    decode = DecodeConfig(**fixed, **{k: v for k, v in given.items() if v is not None})
    return decode, tuple(k for k, v in given.items() if v is None)


def translate_lines(
    checkpoint: Path,
    lines: list[str],
    beam: int,
    alpha: float | None,
    max_len: int,
    length_penalty: str | None = None,
) -> list[str]:
    """`kiln translate`: alpha / length_penalty None are the checkpoint's recipe settings."""
    model, tokenizer, decode = translation_decoder(checkpoint, length_penalty, alpha)
    return translate_texts(
        model,
        tokenizer,
        lines,
        beam_size=beam,
        length_penalty=decode.length_penalty,
        alpha=decode.alpha,
        max_len=max_len,
    )
