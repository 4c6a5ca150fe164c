"""Loss-curve PNGs from a run's metrics.csv, and the quickstart's report.md."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import matplotlib

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
    series = read_series(metrics_csv)
    fig, ax = plt.subplots(figsize=(7, 4))
    for key, style in (("train/loss", "-"), ("val/loss", "o-")):
        if key in series:
            steps, values = zip(*series[key], strict=True)
            ax.plot(steps, values, style, label=key, markersize=4)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
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
