"""Preemption, worker loss and exact resume of DeepSpeed ZeRO runs through the real Ray path, on 2
CPU workers, the tiny BERT with its dropout on. ZeRO-2: SIGTERM to `kiln pretrain` stops it at some
step with a checkpoint (exit 75); the same command with trainer.resume=auto continues it to the end.
ZeRO-3: one worker SIGKILLed after the first checkpoint; Ray Train restarts the group
(cluster.max_failures=1), which continues from that checkpoint. Both end with a model.safetensors
bitwise that of an uninterrupted run. The same for ZeRO-1/2/3 without Ray, to the Adam moments:
tests/cluster/test_zero_resume_ranks.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from e2e_testlib import sigterm_after_step

from cluster.config import load_config
from cluster.jobs import PretrainJob
from cluster.launch import run_training
from cluster.preemption import EXIT_PREEMPTED
from data_pipeline.config import DataConfig
from data_pipeline.prepare import prepare
from pretrain.checkpoint import load_checkpoint, load_trainer_state, verify_checkpoint

pytestmark = pytest.mark.e2e
N = 40  # long enough that the SIGTERM (sent after step 2) lands well before the end
ROOT = Path(__file__).resolve().parents[2]


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


def _overrides(data_dir: Path, *extra: str) -> list[str]:
    return [
        f"data_dir={data_dir}",
        "model.preset=tiny",
        f"trainer.max_steps={N}",
        "trainer.log_every=1",
        "trainer.batch_size=8",
        "trainer.val_every=1000",
        "wandb.mode=disabled",
        "optim.warmup_steps=2",
        "cluster.strategy=deepspeed_stage_2",
        *extra,
    ]


def test_a_preempted_zero_run_resumes_bitwise(data_dir: Path, tmp_path: Path) -> None:
    full = run_training(
        load_config(PretrainJob, None, _overrides(data_dir)), tmp_path / "full", stage="full"
    )

    out, lines = tmp_path / "preempted", []
    proc = subprocess.Popen(
        [sys.executable, "-m", "cluster", "pretrain", *_overrides(data_dir), "--out", str(out)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    reader = threading.Thread(target=sigterm_after_step, args=(proc, 2, lines), daemon=True)
    reader.start()
    try:
        code = proc.wait(timeout=300)
    finally:
        proc.kill()
    reader.join(timeout=10)
    assert code == EXIT_PREEMPTED, "".join(lines)[-3000:]
    summary = json.loads((out / "train_summary.json").read_text())
    step = summary["steps"]
    assert (
        summary["preempted"] and summary["stopped_at_per_rank"] == [step, step] and 2 <= step < N
    ), summary
    stopped = Path(summary["checkpoint"])
    verify_checkpoint(stopped)
    assert load_trainer_state(stopped)["optimizer"]["format"] == "kiln-zero-consolidated"

    resumed = run_training(
        load_config(PretrainJob, None, _overrides(data_dir, "trainer.resume=auto")),
        out,
        stage="resumed",
    )
    summary = json.loads((out / "train_summary.json").read_text())
    assert (
        summary["resumed_from"] == str(stopped)
        and summary["steps"] == N
        and not summary["preempted"]
    )
    want, got = (
        load_checkpoint(full.checkpoint).state_dict,
        load_checkpoint(resumed.checkpoint).state_dict,
    )
    assert got.keys() == want.keys()
    assert [k for k in want if not torch.equal(got[k], want[k])] == []  # bitwise, every tensor


def _kill_one_worker_after(checkpoint: Path, killed: list[int], stop: threading.Event) -> None:
    """SIGKILLs one Ray Train worker once `checkpoint` is complete
    (tests/e2e/test_worker_loss.py)."""
    while not stop.is_set():
        if checkpoint.is_dir():
            out = subprocess.run(
                ["ps", "-eo", "pid=,args="], capture_output=True, text=True, check=True
            ).stdout
            workers = [
                int(line.split()[0]) for line in out.splitlines() if "ray::RayTrainWorker" in line
            ]
            if workers:
                os.kill(workers[-1], signal.SIGKILL)
                killed.append(workers[-1])
                return
        time.sleep(0.05)


def test_a_zero3_worker_group_restarted_after_a_worker_loss_continues_bitwise(
    data_dir: Path, tmp_path: Path
) -> None:
    steps, every = 16, 4
    overrides = _overrides(
        data_dir,
        f"trainer.max_steps={steps}",
        f"trainer.checkpoint_every={every}",
        "trainer.keep_last=10",
        "cluster.strategy=deepspeed_stage_3",
    )
    full = run_training(load_config(PretrainJob, None, overrides), tmp_path / "full", stage="full")
    out, killed, stop = tmp_path / "killed", [], threading.Event()
    killer = threading.Thread(
        target=_kill_one_worker_after,
        args=(out / "checkpoints" / f"step-{every:07d}", killed, stop),
        daemon=True,
    )
    killer.start()
    try:
        survived = run_training(
            load_config(PretrainJob, None, [*overrides, "cluster.max_failures=1"]),
            out,
            stage="killed",
        )
    finally:
        stop.set()
        killer.join(timeout=5)
    assert killed, "no worker was killed: the run ended before its first checkpoint was seen"
    # The restarted group continued from a checkpoint of this run (starting over would also end
    # equal: same seed).
    resumed_from = json.loads((out / "train_summary.json").read_text())["resumed_from"]
    assert resumed_from is not None and int(Path(resumed_from).name.split("-")[1]) >= every
    want, got = (
        load_checkpoint(full.checkpoint).state_dict,
        load_checkpoint(survived.checkpoint).state_dict,
    )
    assert survived.checkpoint.name == f"step-{steps:07d}" and got.keys() == want.keys()
    assert [k for k in want if not torch.equal(got[k], want[k])] == []  # bitwise, every tensor
