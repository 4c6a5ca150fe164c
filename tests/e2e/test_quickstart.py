"""The quickstart path end to end at a smaller size: real Ray, 2 Ray Train workers, every stage, report.md."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from cluster.report import loss_drop

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.e2e

SMALL = [
    "data.sample_docs=120", "data.sample_pairs=2500", "data.sample_labelled=600", "data.vocab_size=1024",
    "bert.trainer.max_steps=40", "bert.trainer.val_every=20", "gpt.trainer.max_steps=40", "gpt.trainer.val_every=20",
    "translation.trainer.max_steps=250", "translation.trainer.val_every=125", "translation.decode.beam_size=2",
    "classification.trainer.max_steps=60", "classification.trainer.val_every=30",
    "bert.trainer.log_every=5", "gpt.trainer.log_every=5", "translation.trainer.log_every=10",
    "classification.trainer.log_every=5",
]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("quickstart") / "run"
    result = subprocess.run([sys.executable, "-m", "cluster", "quickstart", "--out", str(out), *SMALL], cwd=ROOT,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for stage in ("bert", "gpt", "translation", "classification"):
        assert f"[{stage}] step" in result.stdout, f"no progress lines from {stage}"
    return out


def test_report_and_artifacts(run: Path) -> None:
    report = (run / "report.md").read_text()
    for needle in ("BLEU", "copy the source", "majority class", "loss_curve.png", "Sample translations"):
        assert needle in report
    for stage in ("bert", "gpt", "translation", "classification"):
        assert (run / stage / "loss_curve.png").stat().st_size > 5_000
        assert list((run / stage / "checkpoints").glob("step-*/model.safetensors"))
        assert list((run / stage / "wandb").glob("offline-run-*")), f"no offline W&B run for {stage}"
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
    assert 0.0 <= cl["accuracy"] <= 1.0 and cl["examples"] > 0
