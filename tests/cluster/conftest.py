"""One real 2-worker `kiln pretrain` run shared by the tests that inspect what a run writes: W&B offline
(test_wandb_offline.py) and no secret in any file (test_secrets.py). One run, not one each: a Ray Train job costs
~25-45 s of the suite's budget, and both tests read the same kind of run."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from run_testlib import ROOT, OfflineRun, canary, prepare_tiny_data


@pytest.fixture(scope="session")
def offline_run(tmp_path_factory: pytest.TempPathFactory) -> OfflineRun:
    """`kiln pretrain` of configs/tiny-bert.yaml for 4 steps on 2 workers, W&B offline (the recipe's mode: the
    environment's WANDB_MODE is removed), a checkpoint every 2 steps, a canary WANDB_API_KEY and HF_TOKEN set."""
    root = tmp_path_factory.mktemp("offline-run")
    data, out = root / "data", root / "run"
    prepare_tiny_data(data)
    key, token = canary(), canary()
    env = {**os.environ, "WANDB_API_KEY": key, "HF_TOKEN": token, "TOKENIZERS_PARALLELISM": "false"}
    env.pop("WANDB_MODE", None)
    overrides = [
        f"data_dir={data}",
        "trainer.max_steps=4",
        "trainer.log_every=1",
        "trainer.batch_size=8",
        "trainer.val_every=2",
        "trainer.limit_val_batches=1",
        "trainer.checkpoint_every=2",
        "cluster.num_workers=2",
    ]
    result = subprocess.run(
        [sys.executable, "-m", "cluster", "pretrain", "--config", "configs/tiny-bert.yaml"]
        + [*overrides, "--out", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return OfflineRun(data, out, result, (key, token))
