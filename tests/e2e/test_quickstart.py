"""The quickstart path end to end at a smaller size: real Ray, 2 Ray Train workers, every stage, report.md."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from e2e_testlib import CONSOLE_NOISE

from cluster.report import loss_drop

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.e2e

SMALL = [
    "data.sample_docs=120",
    "data.sample_pairs=2500",
    "data.sample_labelled=600",
    "data.vocab_size=1024",
    "bert.trainer.max_steps=200",
    "bert.trainer.val_every=100",
    "gpt.trainer.max_steps=40",
    "gpt.trainer.val_every=20",
    "translation.trainer.max_steps=150",
    "translation.trainer.val_every=75",
    "translation.decode.beam_size=2",
    "classification.trainer.max_steps=60",
    "classification.trainer.val_every=30",
    "bert.trainer.log_every=5",
    "gpt.trainer.log_every=5",
    "translation.trainer.log_every=10",
    "classification.trainer.log_every=5",
]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("quickstart") / "run"
    result = subprocess.run(
        [sys.executable, "-m", "cluster", "quickstart", "--out", str(out), *SMALL],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for stage in ("bert", "gpt", "translation", "classification"):
        assert f"[{stage}] step" in result.stdout, f"no progress lines from {stage}"
    # captured without a TTY: nothing of Ray's or W&B's internals, no escape codes (issue 13)
    console = result.stdout + result.stderr
    for noise in CONSOLE_NOISE:
        assert noise not in console, f"{noise!r} on the console:\n{console[-3000:]}"
    return out


def test_report_and_artifacts(run: Path) -> None:
    report = (run / "report.md").read_text()
    for needle in (
        "BLEU",
        "copy the source",
        "commonest label",
        "loss_curve.png",
        "Sample translations",
    ):
        assert needle in report
    for stage in ("bert", "gpt", "translation", "classification"):
        assert (run / stage / "loss_curve.png").stat().st_size > 5_000
        assert list((run / stage / "checkpoints").glob("step-*/model.safetensors"))
        assert list((run / stage / "wandb").glob("offline-run-*")), (
            f"no offline W&B run for {stage}"
        )
    data = json.loads((run / "data" / "manifest.json").read_text())
    assert set(data["tasks"]) == {"mlm_nsp", "clm", "translation", "classification"}


def test_losses_fall_and_transfer_beats_baselines(run: Path) -> None:
    for stage in ("bert", "gpt", "translation", "classification"):
        first, last = loss_drop(run / stage / "metrics.csv")
        assert last < first, f"{stage}: loss did not fall ({first:.3f} → {last:.3f})"
    summary = json.loads((run / "summary.json").read_text())["evaluation"]
    tr = summary["translation"]
    assert tr["bleu"] > tr["copy_source_bleu"] + 5, tr
    cl = summary["classification"]
    assert cl["examples"] >= 20, cl
    # No constant answer scores more than the test split's commonest-label rate, so beating it
    # (and uniform chance) means the classifier reads the text. The bag-of-words baseline is not
    # asserted: at this size (~540 training texts, 60 steps) it is likely the stronger, and on ~30
    # test texts one text is 3 points; the full quickstart reports that comparison (README).
    for floor in ("split_majority_rate", "uniform_chance", "majority_class_accuracy"):
        assert cl["accuracy"] > cl[floor], (floor, cl)
    assert 0.0 <= cl["bow_accuracy"] <= 1.0, cl


def test_bert_beats_its_chance_levels(run: Path) -> None:
    bert = json.loads((run / "summary.json").read_text())["pretraining"]["bert"]
    # MLM on validation: well above always guessing the commonest token (0.11 vs 0.03 at 250 steps).
    # NSP is not asserted at this size: its training loss stays at ln 2 for ~350 steps and was 0.646
    # at 500 (2026-12-04), too close to chance for a test; the objective's wiring is unit-tested
    # (tests/pretrain/test_objectives.py) and the full quickstart reports NSP against its chance rate.
    assert bert["mlm_acc"] > 1.5 * bert["unigram_accuracy"], bert
    assert 0.0 <= bert["nsp_acc"] <= 1.0 and 0.0 < bert["nsp_chance"] < 1.0, bert
    report = (run / "report.md").read_text()
    assert "unigram guess" in report and "bag-of-words" in report
