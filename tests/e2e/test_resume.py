"""Exact resume on a real Ray Train run: 2 CPU workers, DDP, the tiny BERT with its dropout on (0.1), so every rank's
RNG stream has to come back too. A run stopped at step K and resumed to N ends with weights bitwise equal to an
uninterrupted N-step run, and logs the same losses; saves "killed midway" are never resumed from. Preemption (SIGTERM
to `kiln pretrain`: every rank stops at one step with a checkpoint, exit code 75, and resuming continues) is run once,
with everything on S3, in test_object_storage.py; ZeRO's in test_zero_resume.py, `kiln jobs stop`'s in
tests/cluster/test_local_cluster.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cluster.config import load_config
from cluster.jobs import PretrainJob
from cluster.launch import run_training
from cluster.report import read_series
from data_pipeline.config import DataConfig
from data_pipeline.prepare import prepare
from pretrain.checkpoint import load_checkpoint

pytestmark = pytest.mark.e2e
K, N = 4, 8


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("data") / "data"
    prepare(
        DataConfig(
            sample_docs=60, sample_pairs=10, sample_labelled=10, vocab_size=512, tasks=["mlm_nsp"]
        ),
        out,
    )
    return out


def _job(data_dir: Path, max_steps: int, *extra: str) -> PretrainJob:
    return load_config(
        PretrainJob,
        None,
        [
            f"data_dir={data_dir}",
            "model.preset=tiny",
            f"trainer.max_steps={max_steps}",
            "trainer.log_every=1",
            "trainer.batch_size=8",
            "trainer.val_every=3",
            "trainer.limit_val_batches=2",
            "wandb.mode=disabled",
            # Warmup then constant: the K-step run's schedule is the N-step run's on their common steps (a decaying
            # schedule is shaped by max_steps, so a run stopped by max_steps=K would have had other learning rates).
            "optim.warmup_steps=2",
            "optim.schedule=constant",
            *extra,
        ],
    )


def test_stopped_and_resumed_run_equals_uninterrupted_run(data_dir: Path, tmp_path: Path) -> None:
    full = run_training(_job(data_dir, N), tmp_path / "full", stage="full")

    out = tmp_path / "resumed"
    first = run_training(_job(data_dir, K, "trainer.checkpoint_every=2"), out, stage="first")
    assert first.checkpoint.name == f"step-{K:07d}"
    # Saves killed midway: one never renamed from .tmp-*, one (newer-looking) whose manifest was never written.
    checkpoints = out / "checkpoints"
    (checkpoints / ".tmp-step-0000006").mkdir()
    (checkpoints / ".tmp-step-0000006" / "model.safetensors").write_bytes(b"half a file")
    (checkpoints / "step-0000007").mkdir()
    (checkpoints / "step-0000007" / "model.safetensors").write_bytes(
        (first.checkpoint / "model.safetensors").read_bytes()
    )
    resumed = run_training(_job(data_dir, N, "trainer.resume=auto"), out, stage="resumed")

    assert json.loads((out / "train_summary.json").read_text())["steps"] == N
    want, got = (
        load_checkpoint(full.checkpoint).state_dict,
        load_checkpoint(resumed.checkpoint).state_dict,
    )
    assert got.keys() == want.keys()
    assert [k for k in want if not torch.equal(got[k], want[k])] == []  # bitwise, every tensor
    # metrics.csv holds the first run's rows up to K and the resumed run's after: the very same curves.
    full_series, resumed_series = read_series(full.metrics_csv), read_series(resumed.metrics_csv)
    assert [s for s, _ in resumed_series["train/loss"]] == list(range(N))
    for key in ("train/loss", "val/loss", "val/mlm_acc"):
        assert resumed_series[key] == full_series[key], key
    assert "train/mfu" in full_series and all(0 < v < 2 for _, v in full_series["train/mfu"])
