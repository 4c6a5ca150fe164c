"""A non-finite loss under DDP and DeepSpeed ZeRO-1/2/3, on two CPU ranks through Lightning's
Trainer and Kiln's strategies (the harness of tests/cluster/test_zero3_init.py:
torch.multiprocessing ranks over gloo, no Ray).

One rank's loss is NaN at a step; every rank must skip that step alike: the parameters, the
optimizer's master weights, Adam moments and step counts after it are bitwise those before it, the
next finite step trains (and ZeRO's losses stay within TOLERANCE of DDP's, skips included),
`train/skipped_steps` counts the skips, and `max_nonfinite_steps` in a row stop the run with
NonFiniteLossError on every rank. With gradient accumulation, a NaN in one micro-batch skips its
whole window's step."""

from __future__ import annotations

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
from lightning.pytorch.strategies import DDPStrategy
from torch import Tensor

from cluster.jobs import ClusterConfig
from data_pipeline.configlib import from_preset
from pretrain.models.gpt import GPTConfig
from pretrain.module import GPTPretrainModule, NonFiniteLossError
from pretrain.optim import OptimConfig

pytest.importorskip("deepspeed")
WORLD = 2
STEPS = 6
BATCH = 2
# (call, rank) pairs whose loss is NaN: each skip is decided on ONE rank, so agreement is what is
# tested.
POISON = {(1, 0), (4, 1)}
SKIPPED = 2
STOP_POISON = {(1, 0), (2, 1), (3, 0)}  # 3 in a row, max_nonfinite_steps=3: it stops at call 3
ACCUMULATE = 2
ACCUMULATE_POISON = {(2, 1)}  # the first micro-batch of the second window (calls 2 and 3)
# ZeRO against DDP over the same steps: measured within one float32 ulp at losses of ~4 (the
# reduction order differs; see test_zero3_init.TOLERANCE); 5e-6 still catches a skipped step that
# changed anything.
TOLERANCE = 5e-6
CONFIGS = ("ddp", "deepspeed_stage_1", "deepspeed_stage_2", "deepspeed_stage_3")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PoisonedGPT(GPTPretrainModule):
    """A tiny GPT whose loss is NaN on this rank at the chosen (0-based) training calls; records
    its losses."""

    def __init__(self, poisoned: set[tuple[int, int]], rank: int) -> None:
        # No dropout: DDP and ZeRO draw their masks in different orders.
        cfg = from_preset(
            GPTConfig,
            "tiny",
            vocab_size=50,
            n_positions=16,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
        )
        super().__init__(cfg, OptimConfig(lr=1e-3, warmup_steps=0), total_steps=100)
        self.poisoned = {call for call, r in poisoned if r == rank}
        self.calls, self.losses = 0, []

    def compute(self, batch: dict[str, Tensor], stage: str) -> dict[str, Tensor]:
        out = super().compute(batch, stage)
        if stage == "train":
            if self.calls in self.poisoned:
                out["loss"] = out["loss"] * float("nan")
            self.losses.append(out["loss"].item())
            self.calls += 1
        return out


def _batches(rank: int) -> list[dict[str, Tensor]]:
    out = []
    for step in range(STEPS):
        g = torch.Generator().manual_seed(1000 * step + rank)
        ids = (torch.randint(0, 45, (BATCH, 1), generator=g) + torch.arange(16)) % 45 + 5
        out.append({"input_ids": ids, "labels": torch.roll(ids, -1, dims=1)})
    return out


def _optimizer_state(trainer: L.Trainer) -> dict[str, Tensor]:
    """Everything a step changes: the module's parameters (this rank's ZeRO-3 partition), the
    optimizer's own parameters (ZeRO's fp32 master partitions) and its state (Adam moments, step
    counts)."""
    optimizer = trainer.optimizers[0]
    inner = getattr(optimizer, "optimizer", optimizer)  # a ZeRO optimizer wraps the torch AdamW
    snap = {}
    for i, p in enumerate(trainer.lightning_module.model.parameters()):
        snap[f"param.{i}"] = getattr(p, "ds_tensor", p).detach().clone()
    for g, group in enumerate(inner.param_groups):
        for i, p in enumerate(group["params"]):
            snap[f"master.{g}.{i}"] = p.detach().clone()
            for key, value in inner.state.get(p, {}).items():
                snap[f"state.{g}.{i}.{key}"] = torch.as_tensor(value).detach().clone()
    return snap


class Snapshots(Callback):
    """The optimizer state before the first step and after every step."""

    def __init__(self) -> None:
        self.states: list[dict[str, Tensor]] = []

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        if not self.states:
            self.states.append(_optimizer_state(trainer))

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        self.states.append(_optimizer_state(trainer))


def _strategy(name: str) -> Any:
    from cluster.strategies import build_strategy

    if name == "ddp":  # Kiln's is Ray's DDPStrategy, which only asks Ray Train for the device
        return DDPStrategy(find_unused_parameters=False)
    return build_strategy(ClusterConfig(strategy=name), BATCH)


def _fit(
    name: str, rank: int, poisoned: set[tuple[int, int]], limit: int = 5, accumulate: int = 1
) -> tuple[PoisonedGPT, L.Trainer, Snapshots]:
    torch.manual_seed(1234)
    module = PoisonedGPT(poisoned, rank)
    module.max_nonfinite_steps = limit
    snapshots = Snapshots()
    trainer = L.Trainer(
        max_steps=STEPS // accumulate,
        accumulate_grad_batches=accumulate,
        accelerator="cpu",
        devices=WORLD,
        num_nodes=1,
        strategy=_strategy(name),
        plugins=[TorchElasticEnvironment()],
        precision="32-true",
        gradient_clip_val=1.0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        use_distributed_sampler=False,
        callbacks=[snapshots],
    )
    trainer.fit(module, torch.utils.data.DataLoader(_batches(rank), batch_size=None))
    return module, trainer, snapshots


def _same(a: dict[str, Tensor], b: dict[str, Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _skip_run(name: str, rank: int) -> dict[str, Any]:
    module, trainer, snap = _fit(name, rank, POISON)
    states = snap.states  # states[i]: before call i; states[i + 1]: after it
    skipped_calls = sorted({call for call, _ in POISON})
    engine = trainer.strategy.model
    inner = getattr(trainer.optimizers[0], "optimizer", trainer.optimizers[0])
    return {
        "losses": module.losses,
        "skipped_steps": module.skipped_steps,
        "logged_skipped_steps": float(trainer.callback_metrics["train/skipped_steps"]),
        "global_step": trainer.global_step,
        "engine_skipped": getattr(engine, "skipped_steps", None),  # DeepSpeed's own count
        "adam_steps": sorted({int(torch.as_tensor(s["step"])) for s in inner.state.values()}),
        "unchanged_by_skip": [_same(states[c], states[c + 1]) for c in skipped_calls],
        "changed_by_finite": [
            not _same(states[c], states[c + 1]) for c in range(STEPS) if c not in skipped_calls
        ],
        "finite": all(torch.isfinite(v.float()).all() for v in states[-1].values()),
    }


def _accumulation_run(name: str, rank: int) -> dict[str, Any]:
    module, trainer, snap = _fit(name, rank, ACCUMULATE_POISON, accumulate=ACCUMULATE)
    states = snap.states  # states[2]: before the poisoned window; states[4]: after it
    inner = getattr(trainer.optimizers[0], "optimizer", trainer.optimizers[0])
    return {
        "skipped_steps": module.skipped_steps,
        "global_step": trainer.global_step,
        "engine_skipped": getattr(trainer.strategy.model, "skipped_steps", None),
        "adam_steps": sorted({int(torch.as_tensor(s["step"])) for s in inner.state.values()}),
        "window_unchanged": _same(states[2], states[4]),
        "windows_trained": [not _same(states[0], states[2]), not _same(states[4], states[6])],
    }


def _stop_run(name: str, rank: int) -> str:
    try:
        _fit(name, rank, STOP_POISON, limit=3)
    except NonFiniteLossError as err:
        return str(err)
    return "no error"


def _rank(rank: int, port: int, out: Path) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(WORLD),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(WORLD),
        GROUP_RANK="0",
    )
    torch.set_num_threads(1)
    results = {
        name: {
            "skip": _skip_run(name, rank),
            "stop": _stop_run(name, rank),
            "accumulate": _accumulation_run(name, rank),
        }
        for name in CONFIGS
    }
    torch.save(results, out / f"rank-{rank}.pt")


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    out = tmp_path_factory.mktemp("nonfinite")
    mp.spawn(_rank, args=(_free_port(), out), nprocs=WORLD, join=True)
    return [torch.load(out / f"rank-{rank}.pt", weights_only=True) for rank in range(WORLD)]


@pytest.mark.parametrize("name", CONFIGS)
def test_a_non_finite_loss_on_one_rank_skips_the_step_on_every_rank(
    results: list[dict[str, Any]], name: str
) -> None:
    for rank, per_rank in enumerate(results):
        got, where = per_rank[name]["skip"], f"{name}, rank {rank}"
        assert got["skipped_steps"] == SKIPPED and got["logged_skipped_steps"] == SKIPPED, where
        assert got["global_step"] == STEPS, where  # Lightning counts a skipped step, as under DDP
        # Parameters, master weights, Adam moments and step counts: bitwise as before the skip.
        assert all(got["unchanged_by_skip"]), where
        assert all(got["changed_by_finite"]), where  # every finite step trains, after a skip too
        assert got["adam_steps"] == [STEPS - SKIPPED], where  # AdamW stepped on finite steps only
        assert got["finite"], where
        if name != "ddp":  # DeepSpeed itself skipped them (its overflow path)
            assert got["engine_skipped"] == SKIPPED, where


@pytest.mark.parametrize("name", CONFIGS[1:])
def test_zero_trains_through_skips_like_ddp(results: list[dict[str, Any]], name: str) -> None:
    for rank, per_rank in enumerate(results):
        zero, ddp = per_rank[name]["skip"]["losses"], per_rank["ddp"]["skip"]["losses"]
        # NaN != NaN: the poisoned calls drop out.
        finite = [(a, b) for a, b in zip(zero, ddp, strict=True) if b == b]
        assert len(finite) == STEPS - sum(1 for _, r in POISON if r == rank)
        worst = max(abs(a - b) for a, b in finite)
        assert worst <= TOLERANCE, f"{name}, rank {rank}: losses up to {worst:.2e} from DDP's"


@pytest.mark.parametrize("name", CONFIGS)
def test_a_non_finite_micro_batch_skips_its_accumulation_window(
    results: list[dict[str, Any]], name: str
) -> None:
    for rank, per_rank in enumerate(results):
        got, where = per_rank[name]["accumulate"], f"{name}, rank {rank}"
        assert got["skipped_steps"] == 1 and got["global_step"] == STEPS // ACCUMULATE, where
        # The window's finite micro-batch is dropped too: no step on a partial window.
        assert got["window_unchanged"] and all(got["windows_trained"]), where
        assert got["adam_steps"] == [STEPS // ACCUMULATE - 1], where
        if name != "ddp":
            assert got["engine_skipped"] == 1, where


@pytest.mark.parametrize("name", CONFIGS)
def test_consecutive_non_finite_losses_stop_every_rank(
    results: list[dict[str, Any]], name: str
) -> None:
    expected = "3 consecutive steps had a non-finite loss (last at step 3)"
    for per_rank in results:
        assert expected in per_rank[name]["stop"], name
