"""A requeue with another number of workers, through Ray Train and `run_training` as `kiln pretrain`
runs it: 2 workers stop at step K with a checkpoint; the same --out is resumed with
cluster.num_workers=1 to step N, then with 2 again to step M. Each resume continues the step count,
the optimizer and the data position: the final loader state is the one Kiln's loader promises for
those world-size changes (tests/cluster/test_elastic_resume.py proves, without Ray, that this
layout trains on every sample of the epoch exactly once), and the loss goes on from where it was."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cluster.config import load_config
from cluster.jobs import PretrainJob
from cluster.launch import run_training
from cluster.report import read_series
from data_pipeline.config import DataConfig
from data_pipeline.loader import make_loader
from data_pipeline.prepare import prepare
from pretrain.checkpoint import load_trainer_state

pytestmark = pytest.mark.e2e
K, N, M = 3, 7, 10
BATCH, SEED = 4, 0


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("data") / "data"
    prepare(DataConfig(sample_docs=80, vocab_size=512, seq_len=32, tasks=["clm"]), out)
    return out


def _job(data_dir: Path, steps: int, workers: int, *extra: str) -> PretrainJob:
    return load_config(
        PretrainJob,
        None,
        [
            f"data_dir={data_dir}",
            "task=clm",
            "model.arch=gpt",
            "model.preset=tiny",
            f"trainer.max_steps={steps}",
            f"trainer.batch_size={BATCH}",
            "trainer.log_every=1",
            "trainer.val_every=100000",
            "trainer.checkpoint_every=100000",
            "wandb.mode=disabled",
            "optim.warmup_steps=2",
            "optim.schedule=constant",
            f"cluster.num_workers={workers}",
            f"trainer.seed={SEED}",
            *extra,
        ],
    )


def _promised_loader_state(data_dir: Path) -> dict:
    """The loader state after K steps on 2 ranks, N - K on 1 and M - N on 2 (rank 0's copy; every
    rank's is identical)."""
    state = None
    for world, steps in ((2, K), (1, N - K), (2, M - N)):
        loaders = [
            make_loader(data_dir, "clm", "train", BATCH, rank=r, world_size=world, seed=SEED)
            for r in range(world)
        ]
        for loader in loaders:
            if state is not None:
                loader.load_state_dict(json.loads(json.dumps(state)))
        for it in [iter(lo) for lo in loaders]:
            for _ in range(steps):
                next(it)
        state = loaders[0].state_dict()
    return state


def test_a_requeue_on_other_worker_counts_continues_the_run(data_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    legs = [(K, 2), (N, 1), (M, 2)]
    results = []
    for i, (steps, workers) in enumerate(legs):
        extra = ["trainer.resume=auto"] if i else []
        results.append(run_training(_job(data_dir, steps, workers, *extra), out, stage=f"leg{i}"))
        summary = json.loads((out / "train_summary.json").read_text())
        assert summary["steps"] == steps, summary
        if i:  # each leg continued the one before, from its final checkpoint
            assert summary["resumed_from"] == str(results[i - 1].checkpoint), summary

    final = load_trainer_state(results[-1].checkpoint)
    loader, promised = final["loader"], _promised_loader_state(data_dir)
    assert loader["world_size"] == 2 and loader["epoch"] == 0  # both resumes were mid-epoch
    # The first two legs trained on rows [0, 40) of the epoch's order, once each; the third leg's
    # layout is the rest of the epoch after them, on 2 ranks.
    assert promised["layout"]["remaining"][0][0] == K * 2 * BATCH + (N - K) * BATCH
    assert loader["layout"] == promised["layout"]
    assert loader["batches_served"] == promised["batches_served"]
    # One curve, one row per step: nothing trained twice, no step skipped.
    series = read_series(results[-1].metrics_csv)["train/loss"]
    assert [s for s, _ in series] == list(range(M))
    losses = [v for _, v in series]
    jumps = [abs(b - a) for a, b in zip(losses, losses[1:], strict=False)]
    at_resume = [jumps[K - 1], jumps[N - 1]]  # step K-1 -> K and N-1 -> N
    elsewhere = [j for i, j in enumerate(jumps) if i not in (K - 1, N - 1)]
    assert max(at_resume) <= 2 * max(elsewhere) + 0.05, (losses, K, N)
