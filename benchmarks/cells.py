"""A grid of independent fine-tuning cells, run a few at a time in their own processes and cached, and the verdict
that says whether one initialisation beat the other by more than the seeds' spread.

Shared by benchmarks/pretraining_pays.py (BERT -> SST-2) and benchmarks/decoder_pays.py (GPT -> Multi30k).
"""

from __future__ import annotations

import dataclasses
import json
import statistics
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any


def run_cells(
    cells: Sequence[Any], run: Callable[..., dict], extra: Sequence[Any], jobs: int, cache: Path
) -> list[dict]:
    """Every cell's row (`run(cell, *extra)`), running only the cells not already in `cache` (one JSON row per
    line holding the cell's fields), `jobs` at once, so a grid cut short continues where it stopped.

    Cells are frozen dataclasses of one type; `run` must be importable by a spawned process (module level). A
    cached row that lacks a field added to the cell since takes its default (and is filled in with it)."""
    if not cells:
        return []
    kind = type(cells[0])

    def key(row: dict) -> Any:
        return kind(**{k: row[k] for k in kind.__dataclass_fields__ if k in row})

    done = {}
    if cache.is_file():
        for row in map(json.loads, cache.read_text().splitlines()):
            cell = key(row)
            done[cell] = {**dataclasses.asdict(cell), **row}
    todo = [c for c in cells if c not in done]
    print(f"{len(cells)} cells ({len(cells) - len(todo)} cached), {jobs} at once", flush=True)
    with ProcessPoolExecutor(jobs, mp_context=get_context("spawn")) as pool:
        for row in pool.map(run, todo, *([value] * len(todo) for value in extra)):
            with cache.open("a") as f:
                f.write(json.dumps(row) + "\n")
            done[key(row)] = row
    return [done[c] for c in cells]


def verdict(chosen: dict[str, list[dict]], key: str, unit: str, scale: float = 1.0) -> str:
    """Who wins on `key` (two initialisations, first minus second), and whether by more than the seeds' spread:
    every seed of the winner above every seed of the other."""
    (a_name, a_rows), (b_name, b_rows) = chosen.items()
    a, b = ([scale * r[key] for r in rows] for rows in (a_rows, b_rows))
    gap = statistics.mean(a) - statistics.mean(b)
    if min(a) > max(b):
        return f"{a_name}, by {gap:.1f} {unit}; every seed above every {b_name} seed"
    if min(b) > max(a):
        return f"{b_name}, by {-gap:.1f} {unit}; every seed above every {a_name} seed"
    return f"neither: the seeds overlap ({a_name} - {b_name} = {gap:+.1f} {unit})"


def train_cell(job: Any, cell: Any, fresh: bool) -> tuple[Any, dict]:
    """Train `job` in this process for `cell.steps` steps (re-initialised first when `fresh`); the trained model
    and the cell's row so far: its fields, steps done, every step's loss, minutes and the load at the start."""
    import math
    import os
    import time

    from benchmarks.translation_quality import train_for

    load, losses, start = os.getloadavg()[0], [], time.monotonic()
    model, steps, _ = train_for(
        job, math.inf, max_steps=cell.steps, fresh_weights=fresh, losses=losses, log_every=10**9
    )
    minutes = (time.monotonic() - start) / 60
    row = {**dataclasses.asdict(cell), "done": steps, "losses": losses, "minutes": minutes}
    return model, {**row, "load": load}


def plot_grid(
    chosen: dict[str, dict[str, list[dict]]],
    path: Path,
    titles: Callable[[str], str],
    metric: tuple[str, float, str],
    legend: Callable[[str, list[dict]], str] = lambda init, rows: init,
) -> None:
    """One panel of training-loss curves per budget (`titles(budget)`), every seed a line, and one of the
    metric per seed (dots) and its mean (bar). metric: (row key, scale, axis label)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    budgets, colours = list(chosen), ("tab:blue", "tab:orange")
    inits = list(chosen[budgets[0]])
    fig, axes = plt.subplots(1, len(budgets) + 1, figsize=(5 * (len(budgets) + 1), 4))
    for ax, budget in zip(axes[:-1], budgets, strict=True):
        for init, colour in zip(inits, colours, strict=True):
            for r in chosen[budget][init]:
                curve = [
                    statistics.mean(r["losses"][max(0, i - 19) : i + 1])
                    for i in range(len(r["losses"]))
                ]
                ax.plot(range(1, len(curve) + 1), curve, color=colour, alpha=0.7)
            ax.plot([], [], color=colour, label=legend(init, chosen[budget][init]))
        ax.set(title=titles(budget), xlabel="step", ylabel="train loss (20-step mean)")
        ax.legend()
    key, scale, label = metric
    ax = axes[-1]
    for j, budget in enumerate(budgets):
        for k, (init, colour) in enumerate(zip(inits, colours, strict=True)):
            values = [scale * r[key] for r in chosen[budget][init]]
            x = j + (k - 0.5) * 0.3
            ax.scatter(
                [x] * len(values), values, color=colour, zorder=3, label=init if j == 0 else None
            )
            ax.hlines(statistics.mean(values), x - 0.1, x + 0.1, color=colour)
    ax.set_xticks(range(len(budgets)), [titles(b) for b in budgets], fontsize=8)
    ax.set(title=f"{label} (dots: seeds; bar: mean)", ylabel=label)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
