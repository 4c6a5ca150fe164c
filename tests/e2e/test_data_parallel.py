"""Data parallelism is only a way to compute the same step: 2 DDP workers with batch b end where 1 worker with
batch 2b ends, on a real Ray Train run.

Why this holds exactly (up to float summation order): the loader gives rank r the rows at positions r, r + W, ...
of one seeded permutation, so step k's two rank batches together are the single worker's batch k; GPT's packed
blocks have the same number of predicted tokens in every row, so the mean of the ranks' mean losses (what DDP's
gradient average computes) is the single worker's mean loss. Dropout is off (its RNG streams differ by rank).
BERT is not used: its MLM masks are drawn per (rank, batch), so the two setups mask different tokens by design.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from cluster.config import load_config
from cluster.jobs import PretrainJob
from cluster.launch import run_training
from cluster.report import read_series
from data_pipeline.config import DataConfig
from data_pipeline.prepare import prepare
from pretrain.checkpoint import load_checkpoint

pytestmark = pytest.mark.e2e
STEPS, BATCH = 6, 4
ATOL = 1e-5  # fp32 over 6 AdamW steps; measured max |diff| is reported in the assertion message


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("data") / "data"
    prepare(
        DataConfig(
            sample_docs=60,
            sample_pairs=10,
            sample_labelled=10,
            vocab_size=512,
            seq_len=32,
            tasks=["clm"],
        ),
        out,
    )
    return out


def _job(data_dir: Path, workers: int, batch: int) -> PretrainJob:
    return load_config(
        PretrainJob,
        None,
        [
            f"data_dir={data_dir}",
            "task=clm",
            "model.arch=gpt",
            "model.preset=tiny",
            "model.resid_pdrop=0.0",
            "model.embd_pdrop=0.0",
            "model.attn_pdrop=0.0",
            f"trainer.max_steps={STEPS}",
            "trainer.log_every=1",
            f"trainer.batch_size={batch}",
            "trainer.val_every=3",
            "trainer.limit_val_batches=1",
            "wandb.mode=disabled",
            f"cluster.num_workers={workers}",
            "optim.warmup_steps=2",
        ],
    )


def test_two_ddp_workers_equal_one_worker_with_twice_the_batch(
    data_dir: Path, tmp_path: Path
) -> None:
    one = run_training(_job(data_dir, 1, 2 * BATCH), tmp_path / "one", stage="one")
    two = run_training(_job(data_dir, 2, BATCH), tmp_path / "two", stage="two")
    want, got = (
        load_checkpoint(one.checkpoint).state_dict,
        load_checkpoint(two.checkpoint).state_dict,
    )
    assert got.keys() == want.keys()
    worst = max((got[k] - want[k]).abs().max().item() for k in want)
    assert worst < ATOL, f"max |w_2workers - w_1worker| = {worst:.3g}"
    # Rank 0 logs its own half-batch loss; the mean over ranks is not logged, so compare the validation loss,
    # which both runs compute on the same rows at the end.
    v1, v2 = read_series(one.metrics_csv)["val/loss"], read_series(two.metrics_csv)["val/loss"]
    assert abs(v1[-1][1] - v2[-1][1]) < 1e-4, (v1, v2)
