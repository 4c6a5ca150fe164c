"""Elastic resume, whole run: 2 ranks, stopped mid-epoch, resumed on 1 rank, stopped mid-epoch
again, resumed on 2 ranks to the end of the loader's epoch. DDP and DeepSpeed ZeRO-2, through
Lightning's Trainer, Kiln's strategies, the real `ShardLoader` over a prepared clm data directory
(written with data_pipeline.shards, no Ray) and Kiln's resume path: KilnCheckpoint saves (a stop
requested as on SIGTERM, StopOnRequest), `resume_checkpoint` picks the newest, KilnCheckpointIO
hands `lightning_checkpoint` to `fit(ckpt_path=...)`, KilnCheckpoint.on_load_checkpoint reads
`rank_state`. Ranks are torch.multiprocessing processes over gloo (the harness of
tests/cluster/test_zero_nonfinite.py); each leg runs in fresh processes, so only the checkpoint
carries over.

Every rank records the sample_ids of each batch it trains on. Asserted:
- the three legs together train on every sample of the epoch exactly once, except the drop_last
  remainder docs/data.md states (R mod (M * batch) rows, R the rows of the last layout), and each
  rank's batches are the ones the loader alone serves for the same world-size changes;
- the loss continues: the change from the last loss before each resume to the first after it is
  no larger than the largest step-to-step change of an uninterrupted 2-rank run from step K1 on (plus
  LOSS_TOLERANCE; the legs train on other batch sizes, so their per-step losses are not the
  reference's), a band that excludes a restart from untrained weights by a factor of 2;
- the optimizer and schedule continue: AdamW's step count and the scheduler's position in the
  step-K2 checkpoint are K2 (they would be K2 - K1 had leg 2 started them afresh), 17 at the end.

Lightning's epoch length: Lightning counts an epoch as min(len(loader) before, after loading the
state). That cuts its epoch short when the workers GROW: leg 3's 2-rank loader has length 14 fresh
but 17 after loading (the 1-rank leg took more steps for the same rows), so Lightning ends its
epoch 0 after batch 14 and the loader serves its last 3 batches as Lightning's epoch 1. The run is
driven by steps to the loader's epoch end; the sample assertions show nothing is lost or repeated
across that boundary. (From then on trainer.current_epoch runs one ahead of the loader's epoch.)
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import torch.multiprocessing as mp
from lightning.fabric.plugins.environments import TorchElasticEnvironment
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DDPStrategy, Strategy
from rank_testlib import RequestStopAt

from cluster.callbacks import KilnCheckpoint, KilnCheckpointIO, StopOnRequest
from cluster.jobs import ClusterConfig
from cluster.resume import resume_checkpoint
from data_pipeline.configlib import from_preset
from data_pipeline.examples import BUILDERS
from data_pipeline.loader import ShardLoader, make_loader
from data_pipeline.shards import write_json, write_task
from data_pipeline.tokenizer import FIXED_SPECIAL_IDS
from pretrain.checkpoint import load_trainer_state
from pretrain.models.gpt import GPTConfig
from pretrain.module import GPTPretrainModule
from pretrain.optim import OptimConfig

pytest.importorskip("deepspeed")
ROWS, BATCH, SEQ_LEN, SEED = 59, 2, 16, 7
WORLDS = (2, 1, 2)  # the legs' world sizes
K1, K2 = 4, 10  # the steps legs 1 and 2 stop at, both mid-epoch
STRATEGIES = ("ddp", "deepspeed_stage_2")
# No dropout, so a loss depends on the weights and the batch only. The data (below) is one easy
# pattern, so batches are alike and the loss measures how far training has come.
CFG = from_preset(
    GPTConfig,
    "tiny",
    vocab_size=50,
    n_positions=SEQ_LEN,
    resid_pdrop=0.0,
    embd_pdrop=0.0,
    attn_pdrop=0.0,
)
OPTIM = OptimConfig(lr=3e-3, warmup_steps=1)
# The first loss after a resume minus the last before it, against the uninterrupted run's change
# over the same step. Measured (DDP and ZeRO-2 alike): 0.013 after the 2->1 resume (step 5), 0.020
# after the 1->2 one (step 11). The uninterrupted run's per-step changes are 0.04-0.28; untrained
# weights would jump by +0.66 and +1.25. Compared on changes, not levels: by step 10 the 1-rank leg
# (half the batch per step) trails the 2-rank run by 0.1 in loss, which is drift, not a resume.
LOSS_TOLERANCE = 0.05


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_clm_data(root: Path) -> Path:
    """A prepared clm data directory: ROWS blocks of SEQ_LEN + 1 tokens counting up from a seeded
    start (ids 7..49, wrapping), sample_id i for row i; several shards, as `kiln data prepare`
    lays them out."""
    gen = torch.Generator().manual_seed(0)
    starts = torch.randint(0, 43, (ROWS,), generator=gen).tolist()
    rows = [
        {"sample_id": i, "input_ids": [7 + (s + j) % 43 for j in range(SEQ_LEN + 1)]}
        for i, s in enumerate(starts)
    ]
    builder = BUILDERS["clm"]
    write_task(root / "clm", "clm", builder.schema, {"train": rows}, 16, builder.token_columns)
    write_json(
        root / "manifest.json",
        {
            "tasks": {"clm": {}},
            "special_tokens": FIXED_SPECIAL_IDS,
            "vocab_size": 50,
            "config": {"seq_len": SEQ_LEN},
        },
    )
    return root


def _loader(data: Path, rank: int, world: int) -> ShardLoader:
    return make_loader(data, "clm", "train", BATCH, rank=rank, world_size=world, seed=SEED)


def loader_only(data: Path) -> dict[str, Any]:
    """What the loader alone promises for these legs: each leg's batches, per step and rank (no
    Lightning, no model), the step the epoch ends at, and the rows its last layout began with."""
    states: list[dict] | None = None
    legs: list[list[list[list[int]]]] = []
    for world, stop in zip(WORLDS, (K1, K2, None), strict=True):
        loaders = [_loader(data, r, world) for r in range(world)]
        for lo in loaders:
            if states is not None:
                lo.load_state_dict(json.loads(json.dumps(states[0])))  # as trainer_state keeps it
        served = loaders[0].state_dict()["batches_served"]
        end = len(loaders[0]) if stop is None else stop
        iters = [iter(lo) for lo in loaders]
        legs.append([[next(it)["sample_id"].tolist() for it in iters] for _ in range(served, end)])
        last_layout_rows = sum(b - a for a, b in loaders[0].state_dict()["layout"]["remaining"])
        states = [lo.state_dict() for lo in loaders]
    return {"legs": legs, "end": end, "last_layout_rows": last_layout_rows}


class Recorder(Callback):
    """Per step: the sample_ids this rank trains on (read at on_train_batch_start), Lightning's
    epoch and batch index, and the loss."""

    def __init__(self) -> None:
        self.steps: list[dict[str, Any]] = []

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self.steps.append(
            {
                "step": trainer.global_step + 1,
                "ids": batch["sample_id"].tolist(),
                "epoch": trainer.current_epoch,
                "batch_idx": batch_idx,
            }
        )

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, *args: Any
    ) -> None:
        self.steps[-1]["loss"] = float(outputs["loss"])


def _strategy(name: str) -> Strategy:
    from cluster.strategies import build_strategy

    if name == "ddp":  # Kiln's is Ray's DDPStrategy, which only asks Ray Train for the device
        return DDPStrategy(find_unused_parameters=False)
    return build_strategy(ClusterConfig(strategy=name), BATCH)


def _fit(
    strategy: str, rank: int, world: int, data: Path, root: Path, end: int, stop_at: int | None
) -> list[dict[str, Any]]:
    """One leg of a run whose checkpoints live in `root`: resumes the newest one there, if any
    (trainer.resume=auto), and trains to step `end`, or stops (and checkpoints) at `stop_at`."""
    resume_from = resume_checkpoint(root, "auto") if root.is_dir() else None
    torch.manual_seed(1234 if resume_from is None else 99)  # a resume must bring the weights back
    module = GPTPretrainModule(CFG, OPTIM, total_steps=end)
    loader = _loader(data, rank, world)
    recorder = Recorder()
    checkpoint = KilnCheckpoint(root, CFG, None, {}, None, every=0, keep_last=5, loader=loader)
    callbacks: list[Callback] = [recorder, checkpoint]
    if stop_at is not None:
        stop_file = root.parent / f"STOP-{root.name}-{stop_at}"
        callbacks += [RequestStopAt(stop_file, stop_at), StopOnRequest(stop_file, checkpoint)]
    trainer = L.Trainer(
        max_steps=end,
        accelerator="cpu",
        devices=world,
        num_nodes=1,
        strategy=_strategy(strategy),
        plugins=[TorchElasticEnvironment(), *([KilnCheckpointIO()] if resume_from else [])],
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
    trainer.fit(module, loader, ckpt_path=None if resume_from is None else str(resume_from))
    return recorder.steps


def _rank(rank: int, world: int, port: int, out: Path, leg: int, end: int) -> None:
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
    data = out / "data"
    for strategy in STRATEGIES:
        run, stop = out / strategy, (K1, K2, None)[leg]
        run.mkdir(exist_ok=True)  # where a stop is requested
        results[strategy] = _fit(strategy, rank, world, data, run / "checkpoints", end, stop)
        if leg == 0:  # the uninterrupted run to compare the losses with, in the same processes
            results[f"{strategy}-full"] = _fit(strategy, rank, world, data, run / "full", end, None)
    (out / f"leg{leg}-rank{rank}.json").write_text(json.dumps(results))


def _spawn(out: Path, leg: int, end: int) -> list[dict[str, Any]]:
    world = WORLDS[leg]
    mp.spawn(_rank, args=(world, _free_port(), out, leg, end), nprocs=world, join=True)
    return [json.loads((out / f"leg{leg}-rank{r}.json").read_text()) for r in range(world)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("elastic-resume")
    promised = loader_only(make_clm_data(out / "data"))
    legs = [_spawn(out, leg, promised["end"]) for leg in range(len(WORLDS))]
    return {"out": out, "promised": promised, "legs": legs}


def _trained(runs: dict[str, Any], strategy: str) -> list[list[list[int]]]:
    """Per leg, per step, per rank: the sample_ids trained on (as recorded by the ranks)."""
    out = []
    for ranks in runs["legs"]:
        steps = [[s["ids"] for s in rank[strategy]] for rank in ranks]
        assert len({len(s) for s in steps}) == 1, "ranks trained different numbers of steps"
        out.append([list(step) for step in zip(*steps, strict=True)])
    return out


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_the_legs_train_on_every_sample_of_the_epoch_exactly_once(
    runs: dict[str, Any], strategy: str
) -> None:
    promised, trained = runs["promised"], _trained(runs, strategy)
    assert [len(leg) for leg in trained] == [K1, K2 - K1, promised["end"] - K2]
    # each rank's batches, step by step, are the ones the loader serves for these changes
    assert trained == promised["legs"]
    seen = [i for leg in trained for step in leg for ids in step for i in ids]
    assert len(seen) == len(set(seen)), "a sample was trained on twice"
    dropped = promised["last_layout_rows"] % (WORLDS[-1] * BATCH)  # docs/data.md's remainder
    assert dropped > 0 and len(seen) == ROWS - dropped and set(seen) <= set(range(ROWS))
    # Leg 3 ran to the loader's epoch end past Lightning's count (min of the lengths before and
    # after loading the state): its last batches fell in Lightning's next epoch.
    leg3 = runs["legs"][2][0][strategy]
    assert leg3[-1]["step"] == promised["end"]
    assert {s["epoch"] for s in leg3} == {0, 1}, [(s["epoch"], s["batch_idx"]) for s in leg3]


def _mean_losses(ranks: list[dict[str, Any]], key: str) -> dict[int, float]:
    """step -> the loss averaged over the ranks (what the optimizer's step followed)."""
    by_step: dict[int, list[float]] = {}
    for rank in ranks:
        for s in rank[key]:
            by_step.setdefault(s["step"], []).append(s["loss"])
    return {step: sum(v) / len(v) for step, v in by_step.items()}


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_the_loss_continues_after_each_resume(runs: dict[str, Any], strategy: str) -> None:
    full = _mean_losses(runs["legs"][0], f"{strategy}-full")
    resumed: dict[int, float] = {}
    for ranks in runs["legs"]:
        resumed |= _mean_losses(ranks, strategy)
    assert all(resumed[s] == full[s] for s in range(1, K1 + 1)), "leg 1 is the full run's start"
    # the reference's changes from the first resume step on (its first steps fall much faster)
    band = max(abs(full[s] - full[s - 1]) for s in range(K1 + 1, max(full) + 1)) + LOSS_TOLERANCE
    for step in (K1 + 1, K2 + 1):  # the first step after each resume, against the last before it
        jump = resumed[step] - resumed[step - 1]
        assert abs(jump) <= band, (step, jump, band)
        # The band cannot hold by accident: restarting from untrained weights (the full run's
        # step-1 loss) would jump far outside it.
        assert abs(full[1] - resumed[step - 1]) > 2 * band, (step, full[1], band, jump)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_the_optimizer_and_schedule_continue_across_worker_counts(
    runs: dict[str, Any], strategy: str
) -> None:
    root = runs["out"] / strategy / "checkpoints"
    for step in (K1, K2, runs["promised"]["end"]):
        state = load_trainer_state(root / f"step-{step:07d}")
        optimizer = state["optimizer"]
        if strategy == "ddp":  # torch's AdamW state_dict, every parameter's step
            counts = {float(p["step"]) for p in optimizer["state"].values()}
        else:  # ZeRO's consolidated state: a step per param group
            counts = {float(g["step"]) for g in optimizer["param_groups"]}
        assert counts == {step}, (step, counts)
        assert state["scheduler"]["last_epoch"] == step
        assert state["step"] == step
