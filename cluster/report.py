"""Loss-curve PNGs from a run's metrics.csv, the chance levels BERT's metrics are read
against, and the quickstart's report.md helpers."""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tokenizers import Tokenizer

matplotlib.use("Agg")  # no display on training machines
import matplotlib.pyplot as plt  # noqa: E402


def read_series(metrics_csv: Path) -> dict[str, list[tuple[int, float]]]:
    """{metric: [(step, value), ...]} from Lightning's CSVLogger file (rows have gaps where a metric is absent)."""
    series: dict[str, list[tuple[int, float]]] = {}
    with open(metrics_csv, newline="") as f:
        for row in csv.DictReader(f):
            step = int(float(row.get("step") or 0))
            for key, text in row.items():
                if key in ("step", "epoch") or text in ("", None):
                    continue
                value = float(text)
                if math.isfinite(value):
                    series.setdefault(key, []).append((step, value))
    return series


def plot_curves(metrics_csv: Path, png: Path, title: str) -> Path:
    """train/loss and val/loss against step. Copes with short runs: a series of one point is drawn as a marker
    (a line through one point is invisible), and a file without loss rows gives a PNG that says so."""
    series = read_series(metrics_csv)
    fig, ax = plt.subplots(figsize=(7, 4))
    plotted = [key for key in ("train/loss", "val/loss") if series.get(key)]
    for key in plotted:
        steps, values = zip(*series[key], strict=True)
        style = "o-" if key == "val/loss" or len(steps) == 1 else "-"
        ax.plot(steps, values, style, label=key, markersize=4)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if plotted:
        ax.legend()
    else:  # matplotlib warns about a legend without lines
        ax.text(0.5, 0.5, "no loss logged", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png


def loss_drop(metrics_csv: Path, key: str = "train/loss", window: int = 5) -> tuple[float, float]:
    """Mean of the first and of the last `window` logged values of `key`."""
    values = [v for _, v in read_series(metrics_csv).get(key, [])]
    if not values:
        return float("nan"), float("nan")
    window = max(1, min(window, len(values) // 2))  # the two windows never overlap
    return sum(values[:window]) / window, sum(values[-window:]) / window


def last_value(metrics_csv: Path, key: str) -> float:
    values = read_series(metrics_csv).get(key, [])
    return values[-1][1] if values else float("nan")


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


@dataclass(frozen=True)
class PretrainChance:
    """What BERT's validation metrics are set against, computed from the prepared mlm_nsp shards."""

    unigram_token: str  # the training split's most frequent maskable token
    unigram_accuracy: float  # MLM accuracy of always predicting it (validation split)
    nsp_chance: float  # NSP accuracy of always answering the validation split's commoner label
    nsp_pairs: int = 0  # validation segment pairs: how far chance's accuracy wanders by luck


def pretrain_chance(data_dir: Path) -> PretrainChance:
    """MLM's unigram guess and NSP's chance level on a prepared data directory's mlm_nsp task.

    The collator masks real non-special tokens uniformly, so a model that always predicts token t
    scores t's share of the validation split's non-special tokens: what an MLM reaches that uses no
    context at all.
    """
    data_dir = Path(data_dir)
    manifest = json.loads((data_dir / "manifest.json").read_text())
    special = np.array(sorted(manifest["special_tokens"].values()))
    size = int(manifest["vocab_size"])
    train_counts = _token_counts(data_dir / "mlm_nsp" / "train", special, size)
    val_counts = _token_counts(data_dir / "mlm_nsp" / "validation", special, size)
    top = int(train_counts.argmax())
    labels = _column(data_dir / "mlm_nsp" / "validation", "next_sentence_label")
    positive = float(labels.mean()) if len(labels) else 0.5
    name = Tokenizer.from_file(str(data_dir / "tokenizer.json")).decode([top]).strip() or str(top)
    guess = float(val_counts[top] / max(val_counts.sum(), 1))
    return PretrainChance(
        unigram_token=name,
        unigram_accuracy=guess,
        nsp_chance=max(positive, 1.0 - positive),
        nsp_pairs=len(labels),
    )


def _column(split_dir: Path, column: str) -> np.ndarray:
    tables = [pq.read_table(f, columns=[column]) for f in sorted(split_dir.glob("*.parquet"))]
    arrays = [t.column(column).combine_chunks() for t in tables]
    flat = [pc.list_flatten(a) if pa.types.is_list(a.type) else a for a in arrays]
    if not flat:
        return np.array([])
    return np.concatenate([a.to_numpy(zero_copy_only=False) for a in flat])


def _token_counts(split_dir: Path, special: np.ndarray, size: int) -> np.ndarray:
    counts = np.bincount(_column(split_dir, "input_ids").astype(np.int64), minlength=size)
    counts[special] = 0  # never masked: [CLS], [SEP], [PAD], ...
    return counts
