"""Every run leaves a metrics.csv that ends with its last step's row (issue 13: a run shorter than
trainer.log_every died in plot_curves on a missing metrics.csv), and the loss curve copes with a few rows.

The Lightning runs here are the launcher's logging without Ray: Kiln's loggers (cluster.tracking.build_loggers)
and the LogLastStep callback that train_worker adds, on a one-process Trainer."""

from __future__ import annotations

import csv
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from matplotlib.axes import Axes

from cluster.callbacks import LogLastStep
from cluster.jobs import WandbConfig
from cluster.report import plot_curves, read_series
from cluster.resume import restore_metrics, stash_metrics
from cluster.tracking import build_loggers
from pretrain.models.bert import BertConfig
from pretrain.module import BertPretrainModule
from pretrain.optim import OptimConfig

V, B, T = 40, 2, 8
CFG = BertConfig(
    vocab_size=V,
    hidden_size=16,
    num_hidden_layers=1,
    num_attention_heads=2,
    intermediate_size=32,
    max_position_embeddings=T,
)


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _batch(i: int) -> dict[str, torch.Tensor]:
    ids = torch.randint(5, V, (B, T), generator=torch.Generator().manual_seed(i))
    labels = torch.full_like(ids, -100)
    labels[:, 3] = ids[:, 3]
    return {
        "input_ids": ids,
        "token_type_ids": torch.zeros_like(ids),
        "attention_mask": torch.ones_like(ids),
        "mlm_labels": labels,
        "next_sentence_label": torch.tensor([0, 1]),
        "sample_id": torch.arange(B),
    }


def _fit(
    out: Path, max_steps: int, log_every: int, accumulate: int = 1, last_step: bool = True
) -> pl.Trainer:
    module = BertPretrainModule(CFG, OptimConfig(warmup_steps=1), max_steps)
    module.peak_flops = 1e9  # so that train/mfu is logged, as the launcher's workers do
    trainer = pl.Trainer(
        max_steps=max_steps,
        accelerator="cpu",
        devices=1,
        log_every_n_steps=log_every,
        accumulate_grad_batches=accumulate,
        logger=build_loggers(WandbConfig(mode="disabled"), out, "test", {}),
        callbacks=[LogLastStep()] if last_step else [],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        default_root_dir=str(out),
    )
    batches = [_batch(i) for i in range(max_steps * accumulate)]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*")
        trainer.fit(module, torch.utils.data.DataLoader(batches, batch_size=None))
    return trainer


def _rows(file: Path) -> list[dict[str, str]]:
    with open(file, newline="") as f:
        return list(csv.DictReader(f))


def test_run_shorter_than_log_every_still_writes_its_last_step(tmp_path: Path) -> None:
    """configs/tiny-bert.yaml logs every 20 steps; trainer.max_steps=4 must still leave the 4th step's row."""
    trainer = _fit(tmp_path, max_steps=4, log_every=20)
    rows = _rows(tmp_path / "metrics.csv")
    assert [int(r["step"]) for r in rows] == [3]  # Lightning numbers step k's row k - 1
    for key in ("train/loss", "train/tokens_per_s", "train/mfu", "train/lr"):
        assert rows[0][key] != "", (
            key
        )  # the module's own on_train_batch_end values of that step too
    assert trainer.log_every_n_steps == 20  # put back after fit


def test_without_the_callback_nothing_was_written(tmp_path: Path) -> None:
    """The defect itself, so that the test above stays meaningful if Lightning changes its logging rule."""
    _fit(tmp_path, max_steps=4, log_every=20, last_step=False)
    assert not (tmp_path / "metrics.csv").exists()


@pytest.mark.parametrize(
    ("max_steps", "log_every", "accumulate", "steps"),
    [
        (7, 3, 1, [2, 5, 6]),  # the regular rows, then the last step's
        (6, 3, 1, [2, 5]),  # the last step is a regular row already: not written twice
        (3, 5, 2, [2]),  # with gradient accumulation: after the last optimizer step, once
    ],
)
def test_last_step_row_next_to_the_regular_ones(
    tmp_path: Path, max_steps: int, log_every: int, accumulate: int, steps: list[int]
) -> None:
    _fit(tmp_path, max_steps=max_steps, log_every=log_every, accumulate=accumulate)
    assert [int(r["step"]) for r in _rows(tmp_path / "metrics.csv")] == steps


def test_restore_always_leaves_a_metrics_csv(tmp_path: Path) -> None:
    """A resume of a run already at max_steps logs nothing: metrics.csv is the stashed rows; with none, a header."""
    restore_metrics(tmp_path)  # nothing logged, nothing stashed
    assert (tmp_path / "metrics.csv").read_text().strip() == "epoch,step"
    assert read_series(tmp_path / "metrics.csv") == {}
    (tmp_path / "metrics.csv").write_text("epoch,step,train/loss\n0,3,2.5\n")
    stash_metrics(tmp_path, 4)
    restore_metrics(tmp_path)  # the resumed run logged no row
    assert read_series(tmp_path / "metrics.csv") == {"train/loss": [(3, 2.5)]}
    assert not (tmp_path / ".metrics-before-resume.csv").exists()


def _record_plots(monkeypatch: pytest.MonkeyPatch) -> list[tuple[Any, ...]]:
    calls: list[tuple[Any, ...]] = []
    plot = Axes.plot

    def recording(self: Axes, *args: Any, **kwargs: Any) -> Any:
        calls.append(args)
        return plot(self, *args, **kwargs)

    monkeypatch.setattr(Axes, "plot", recording)
    return calls


def test_plot_of_a_single_row_draws_a_marker(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = _record_plots(monkeypatch)
    csv_file = tmp_path / "metrics.csv"
    csv_file.write_text("epoch,step,train/loss\n0,3,2.5\n")
    png = plot_curves(csv_file, tmp_path / "loss.png", "t")
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert calls == [((3,), (2.5,), "o-")]  # a "-" line through one point draws nothing


def test_plot_without_loss_rows_is_a_png_and_no_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = _record_plots(monkeypatch)
    restore_metrics(tmp_path)  # header only
    with warnings.catch_warnings():
        warnings.simplefilter(
            "error"
        )  # matplotlib's "No artists with labels found to put in legend"
        png = plot_curves(tmp_path / "metrics.csv", tmp_path / "loss.png", "t")
    assert png.read_bytes()[:4] == b"\x89PNG" and calls == []
