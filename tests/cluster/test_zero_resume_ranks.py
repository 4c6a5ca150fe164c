"""Exact resume of DeepSpeed ZeRO-1/2/3 runs, on two CPU ranks through Lightning's Trainer, Kiln's
strategies and Kiln's checkpoint code (the harness of tests/cluster/test_zero_nonfinite.py:
torch.multiprocessing ranks over gloo, no Ray).

For each stage a tiny GPT (dropout on, so each rank's RNG stream must come back too) trains K steps
uninterrupted, and again with a stop requested at step k (StopOnRequest, as on SIGTERM), which
checkpoints there; fresh processes resume that checkpoint (KilnCheckpointIO) and continue to K. The
two step-K checkpoints hold bitwise the same weights and consolidated optimizer state (fp32 master
weights, Adam moments, step counts, hyper-parameters) and scheduler. The consolidated state read
back from the engine right after the restore equals the saved one, on 2 ranks and on 1: the same
step-k checkpoints resumed by ONE rank (ZeRO-2 into ZeRO-2, ZeRO-3 into ZeRO-1) load and train on
with finite losses close to the 2-rank run's. The 1-rank runs leave out KilnCheckpoint, whose
per-rank RNG and loader state are the data pipeline's world-size question (cluster/resume.py)."""

from __future__ import annotations

import math
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import torch.multiprocessing as mp
from lightning.fabric.plugins.environments import TorchElasticEnvironment
from lightning.pytorch.callbacks import Callback
from rank_testlib import RequestStopAt
from torch import Tensor

from cluster.callbacks import KilnCheckpoint, KilnCheckpointIO, StopOnRequest
from cluster.jobs import ClusterConfig
from data_pipeline.configlib import from_preset
from pretrain.checkpoint import load_checkpoint, load_trainer_state
from pretrain.models.gpt import GPTConfig
from pretrain.module import GPTPretrainModule
from pretrain.optim import OptimConfig

pytest.importorskip("deepspeed")
WORLD, BATCH, PER_EPOCH = 2, 2, 4
K, STOP = 6, 3  # stopped mid-epoch; the rest crosses into the next epoch
STAGES = ("deepspeed_stage_1", "deepspeed_stage_2", "deepspeed_stage_3")
SHRINK = {"deepspeed_stage_2": "deepspeed_stage_2", "deepspeed_stage_3": "deepspeed_stage_1"}
# Dropout left on. n_embd=33: the biases and LayerNorms do not split evenly over 2 ranks (ZeRO-3
# pads the last rank's partition), as a real model's may not over 3 or 6.
CFG = from_preset(GPTConfig, "tiny", vocab_size=50, n_positions=16, n_embd=33, n_head=3)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RankLoader:
    """A resumable loader in miniature (ShardLoader's contract): PER_EPOCH batches per epoch, each a
    function of (epoch, index, rank), and a state of (epoch, batches served)."""

    def __init__(self, rank: int) -> None:
        self.rank, self.epoch, self.served = rank, 0, 0

    def __len__(self) -> int:
        return PER_EPOCH

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        if self.served >= len(self):
            self.epoch, self.served = self.epoch + 1, 0
        while self.served < len(self):
            g = torch.Generator().manual_seed(10_000 * self.epoch + 100 * self.served + self.rank)
            ids = (torch.randint(0, 45, (BATCH, 1), generator=g) + torch.arange(16)) % 45 + 5
            self.served += 1
            yield {"input_ids": ids, "labels": torch.roll(ids, -1, dims=1)}
        self.epoch, self.served = self.epoch + 1, 0

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "served": self.served}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.served = state["epoch"], state["served"]


class Recorder(Callback):
    """Each step's loss, and the consolidated optimizer state as the engine holds it when training
    starts (after a resume's restore)."""

    def __init__(self) -> None:
        self.losses: list[float] = []
        self.at_start: dict[str, Any] | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        from cluster.strategies import zero_optimizer_state

        self.at_start = zero_optimizer_state(
            pl_module.model, trainer.optimizers[0], trainer.global_rank
        )

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, *args: Any
    ) -> None:
        self.losses.append(float(outputs["loss"]))


def _fit(
    strategy: str,
    rank: int,
    world: int,
    root: Path,
    *,
    stop_at: int | None = None,
    resume_from: Path | None = None,
    kiln_checkpoint: bool = True,
) -> Recorder:
    from cluster.strategies import build_strategy

    torch.manual_seed(1234 if resume_from is None else 99)  # a resume must bring the weights back
    module = GPTPretrainModule(CFG, OptimConfig(lr=1e-3, warmup_steps=1), total_steps=K)
    loader = RankLoader(rank)
    recorder = Recorder()
    callbacks: list[Callback] = [recorder]
    if kiln_checkpoint:
        checkpoint = KilnCheckpoint(root, CFG, None, {}, None, every=0, keep_last=5, loader=loader)
        callbacks.append(checkpoint)
        if stop_at is not None:
            root.mkdir(parents=True, exist_ok=True)
            stop_file = root.parent / f"STOP-{root.name}"
            callbacks += [RequestStopAt(stop_file, stop_at), StopOnRequest(stop_file, checkpoint)]
    plugins: list[Any] = [TorchElasticEnvironment()]
    if resume_from is not None:
        plugins.append(KilnCheckpointIO())
    trainer = L.Trainer(
        max_steps=K,
        accelerator="cpu",
        devices=world,
        num_nodes=1,
        strategy=build_strategy(ClusterConfig(strategy=strategy), BATCH),
        plugins=plugins,
        precision="32-true",
        gradient_clip_val=1.0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        use_distributed_sampler=False,
        callbacks=callbacks,
    )
    torch.manual_seed(
        4321 + rank
    )  # the dropout stream; a resume must replace it with the saved one
    trainer.fit(module, loader, ckpt_path=None if resume_from is None else str(resume_from))
    return recorder


def _rank(rank: int, world: int, port: int, out: Path, phase: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world),
        GROUP_RANK="0",
    )
    torch.set_num_threads(1)
    results: dict[str, Any] = {}
    for stage in STAGES:
        run = out / stage
        if phase == "first":
            results[stage] = {
                "full": _fit(stage, rank, world, run / "full").losses,
                "stopped": _fit(stage, rank, world, run / "part", stop_at=STOP).losses,
            }
        elif phase == "resume":
            got = _fit(stage, rank, world, run / "part", resume_from=_step_dir(run / "part", STOP))
            results[stage] = {"losses": got.losses, "at_start": got.at_start}
        elif stage in SHRINK:  # one rank instead of two
            got = _fit(
                SHRINK[stage],
                rank,
                world,
                run / "shrink",
                kiln_checkpoint=False,
                resume_from=_step_dir(run / "part", STOP),
            )
            results[stage] = {"losses": got.losses, "at_start": got.at_start}
    torch.save(results, out / f"{phase}-rank-{rank}.pt")


def _step_dir(root: Path, step: int) -> Path:
    return root / f"step-{step:07d}"


def _spawn(out: Path, phase: str, world: int) -> list[dict[str, Any]]:
    mp.spawn(_rank, args=(world, _free_port(), out, phase), nprocs=world, join=True)
    return [torch.load(out / f"{phase}-rank-{r}.pt", weights_only=True) for r in range(world)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("zero-resume")
    # Each phase in fresh processes: nothing but the checkpoint carries over to the resumed runs.
    return {
        "out": out,
        **{
            phase: _spawn(out, phase, world)
            for phase, world in (("first", WORLD), ("resume", WORLD), ("shrink", 1))
        },
    }


def _assert_same(a: Any, b: Any, where: str) -> None:
    """Bitwise equal, recursively through dicts, lists and tensors."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), f"{where}: keys differ"
        for key in a:
            _assert_same(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), f"{where}: lengths differ"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, Tensor):
        assert isinstance(b, Tensor) and a.dtype == b.dtype and torch.equal(a, b), (
            f"{where} differs"
        )
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


@pytest.mark.parametrize("stage", STAGES)
def test_a_stopped_and_resumed_zero_run_ends_bitwise_equal_to_an_uninterrupted_one(
    runs: dict[str, Any], stage: str
) -> None:
    run = runs["out"] / stage
    stopped = _step_dir(run / "part", STOP)
    assert [len(r[stage]["stopped"]) for r in runs["first"]] == [STOP, STOP]
    saved = load_trainer_state(stopped)["optimizer"]
    assert saved["format"] == "kiln-zero-consolidated"
    assert {k for p in saved["params"].values() for k in p} == {"fp32", "exp_avg", "exp_avg_sq"}
    assert [float(g["step"]) for g in saved["param_groups"]] == [STOP] * len(saved["param_groups"])
    # What the engine holds once the restore is done: the saved state, exactly.
    _assert_same(runs["resume"][0][stage]["at_start"], saved, f"{stage} restored")
    want, got = _step_dir(run / "full", K), _step_dir(run / "part", K)
    _assert_same(load_checkpoint(got).state_dict, load_checkpoint(want).state_dict, "weights")
    want_state, got_state = load_trainer_state(want), load_trainer_state(got)
    for key in ("optimizer", "scheduler", "step", "loader"):
        _assert_same(got_state[key], want_state[key], f"{stage} trainer_state[{key!r}]")
    for rank in range(WORLD):  # the same losses, step by step, on every rank
        first, resumed = runs["first"][rank][stage], runs["resume"][rank][stage]["losses"]
        assert first["stopped"] + resumed == first["full"], (stage, rank)


@pytest.mark.parametrize("stage", sorted(SHRINK))
def test_a_zero_checkpoint_of_two_ranks_resumes_on_one(runs: dict[str, Any], stage: str) -> None:
    saved = load_trainer_state(_step_dir(runs["out"] / stage / "part", STOP))["optimizer"]
    got = runs["shrink"][0][stage]
    _assert_same(got["at_start"], saved, f"{stage} restored into {SHRINK[stage]} on 1 rank")
    # Rank 0's batches, now stepped alone: not the 2-rank updates, but the same training continued.
    two_ranks = runs["first"][0][stage]["full"][STOP:]
    assert len(got["losses"]) == K - STOP and all(math.isfinite(x) for x in got["losses"])
    assert all(abs(a - b) < 0.1 * b for a, b in zip(got["losses"], two_ranks, strict=True)), (
        got["losses"],
        two_ranks,
    )
