"""Tests that would catch a silent fallback from DeepSpeed ZeRO to DDP, on two CPU ranks through
Lightning's Trainer and Kiln's strategies (the harness of tests/cluster/test_zero_nonfinite.py:
torch.multiprocessing ranks over gloo, no Ray).

- Partitioning, read from the engine's optimizer (DeepSpeed 0.19's own attributes): at every ZeRO
  stage each rank's fp32 master weights and Adam moments hold 1/WORLD of the model's elements; at
  stage >= 2 no rank holds a whole gradient between the micro-batches of a window (ZeRO-1 and DDP
  do: the contrast that shows the reading can tell); at stage 3 each parameter's storage is empty
  outside a gather and its partition (`ds_tensor`) is 1/WORLD of it. The same readings under DDP
  are the whole model: the assertions fail there (`test_the_readings_see_ddp_whole`).
- `cluster.offload=true` at stages 2 and 3: the engine and its ZeRO optimizer run their offload
  code path (torch AdamW on the offloaded fp32 partitions; no DeepSpeedCPUAdam extension needed),
  and the losses equal the run without offload's within OFFLOAD_TOLERANCE.
- Gradient accumulation: 2 micro-batches of BATCH with accumulate_grad_batches=2 step as one
  batch of 2 x BATCH, under DDP and ZeRO-1/2/3 alike: the same pre-clip gradient norm per step and
  the same weights after STEPS steps, within TOLERANCE.
- Gradient clipping (Lightning's gradient_clip_val, which Kiln sets from OptimConfig.grad_clip and
  Lightning hands to DeepSpeed as `gradient_clipping`): with CLIP far below every step's gradient
  norm, ZeRO's clipped updates equal DDP's within TOLERANCE."""

from __future__ import annotations

import math
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
from pretrain.module import GPTPretrainModule
from pretrain.optim import OptimConfig

pytest.importorskip("deepspeed")
WORLD, BATCH, STEPS, ACCUMULATE = 2, 2, 3, 2
CLIP = 0.05  # every step's gradient norm is above it (asserted): clipping acts at every step
# n_embd=33: parameters whose sizes 2 ranks do not divide, as a real model's may not divide 3 or 6.
# vocab_size=3072: the token embedding (101,376 elements, 3/4 of the model) is above ZeRO-3's
# default stage3_param_persistence_threshold (1e5), under which a parameter stays whole on every
# rank by design; the batches use ids 5..49 only. No dropout: DDP and ZeRO run in other orders.
CFG = from_preset(
    GPTConfig,
    "tiny",
    vocab_size=3072,
    n_positions=16,
    n_embd=33,
    n_head=3,
    resid_pdrop=0.0,
    embd_pdrop=0.0,
    attn_pdrop=0.0,
)
STAGES = ("deepspeed_stage_1", "deepspeed_stage_2", "deepspeed_stage_3")
CONFIGS = ("ddp", *STAGES)
OFFLOADED = ("deepspeed_stage_2", "deepspeed_stage_3")
# ZeRO reduce-scatters into flat partitions where DDP all-reduces buckets, and one batch of 2 x
# BATCH sums its per-token terms in another order than two accumulated halves: the same arithmetic
# re-associated. Measured on the weights after STEPS AdamW steps (lr 1e-3): accumulated vs one
# batch 8.5e-7 (DDP, ZeRO-1) and 9.5e-7 (ZeRO-2/3), the same against DDP's one batch; clipped
# ZeRO-1/2/3 vs clipped DDP 1.2e-7 (losses bitwise equal), while the clip moves weights by 1.05e-3.
TOLERANCE = 1e-5
# Pre-clip gradient norms, relative: within one strategy accumulated vs one batch <= 7.2e-8; ZeRO's
# (DeepSpeed's own norm) vs torch's over DDP's gradients 1.4e-5, already at step 1 on the same
# weights (ZeRO-1 accumulated ends bitwise equal to DDP accumulated: the norm computation differs,
# not the gradient).
# A gradient scaled twice for the window is 2x off (measured: exactly half, before the fix).
NORM_TOLERANCE = 1e-4
# Measured: offload and no offload give bitwise equal losses and weights on CPU.
OFFLOAD_TOLERANCE = 1e-6


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _micro_batch(step: int, micro: int, rank: int) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(1000 * step + 10 * micro + rank)
    ids = (torch.randint(0, 45, (BATCH, 1), generator=g) + torch.arange(16)) % 45 + 5
    return {"input_ids": ids, "labels": torch.roll(ids, -1, dims=1)}


def _batches(rank: int, accumulate: int) -> list[dict[str, Tensor]]:
    """Per step, ACCUMULATE micro-batches of BATCH (accumulate > 1) or one batch of both (== 1)."""
    out = []
    for step in range(STEPS):
        micro = [_micro_batch(step, m, rank) for m in range(ACCUMULATE)]
        if accumulate > 1:
            out += micro
        else:
            out.append({key: torch.cat([b[key] for b in micro]) for key in micro[0]})
    return out


def _params(trainer: L.Trainer) -> list[Tensor]:
    return [p for p in trainer.lightning_module.model.parameters() if p.requires_grad]


def _master(optimizer: Any) -> list[Tensor]:
    """The fp32 master weights this rank's optimizer steps: ZeRO's flat partitions (ZeRO-3 keeps
    them outside the torch optimizer's param groups), else the torch optimizer's parameters."""
    if hasattr(optimizer, "fp32_partitioned_groups_flat"):  # ZeRO-3
        return list(optimizer.fp32_partitioned_groups_flat)
    if hasattr(optimizer, "single_partition_of_fp32_groups"):  # ZeRO-1/2
        return list(optimizer.single_partition_of_fp32_groups)
    return [p for group in optimizer.param_groups for p in group["params"]]


def _zero_gradients(optimizer: Any) -> int:
    """Elements of the reduced gradient a ZeRO optimizer holds for its step (at a window's end)."""
    if hasattr(optimizer, "grad_partitions_flat_buffer"):  # ZeRO-3
        return optimizer.grad_partitions_flat_buffer.numel()
    store = getattr(optimizer, "averaged_gradients", {})  # ZeRO-1/2: per group, tensor lists
    return sum(t.numel() for tensors in store.values() if tensors for t in tensors)


def _reading(trainer: L.Trainer) -> dict[str, int]:
    """Elements held on this rank, by kind, against the model's total."""
    optimizer = trainer.optimizers[0]
    inner = getattr(optimizer, "optimizer", optimizer)  # ZeRO wraps the torch AdamW
    params = _params(trainer)
    return {
        "total": sum(getattr(p, "ds_numel", p.numel()) for p in params),
        "master": sum(t.numel() for t in _master(optimizer)),
        "moments": sum(
            s["exp_avg"].numel() + s["exp_avg_sq"].numel()
            for s in inner.state.values()
            if "exp_avg" in s
        ),
        "param_grads": sum(p.grad.numel() for p in params if p.grad is not None)
        + sum(p.grad_accum.numel() for p in params if getattr(p, "grad_accum", None) is not None),
        "zero_grads": _zero_gradients(optimizer),
        # ZeRO-3: a parameter's storage is empty outside a gather, but for the persistent ones
        "param_data": sum(p.numel() for p in params if not getattr(p, "ds_persist", False)),
        "persistent": sum(p.ds_numel for p in params if getattr(p, "ds_persist", False)),
        "partitions": sum(p.ds_tensor.numel() for p in params if hasattr(p, "ds_tensor")),
        "padding": len(params),  # at most one element per parameter
    }


class Recorder(Callback):
    """Each step's pre-clip gradient norm, partition readings between the micro-batches of a
    window, at its end before the step and after the step, and every micro-batch's loss."""

    def __init__(self) -> None:
        self.norms: list[float] = []
        self.between: list[dict[str, int]] = []
        self.before_step: list[dict[str, int]] = []
        self.after: list[dict[str, int]] = []
        self.losses: list[float] = []

    def on_before_optimizer_step(self, trainer: L.Trainer, *args: Any) -> None:
        engine = trainer.strategy.model
        if not hasattr(engine, "get_global_grad_norm"):  # DDP: Lightning clips after this hook
            grads = [p.grad for p in _params(trainer) if p.grad is not None]
            self.norms.append(
                float(
                    torch.linalg.vector_norm(
                        torch.stack([torch.linalg.vector_norm(g) for g in grads])
                    )
                )
            )
        # Lightning calls this after every micro-batch's backward under DeepSpeed (the engine
        # accumulates), once per window under DDP.
        if not hasattr(engine, "is_gradient_accumulation_boundary") or (
            engine.is_gradient_accumulation_boundary()
        ):
            self.before_step.append(_reading(trainer))

    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        self.losses.append(float(outputs["loss"]))
        engine = trainer.strategy.model
        if (batch_idx + 1) % trainer.accumulate_grad_batches:
            self.between.append(_reading(trainer))
            return
        self.after.append(_reading(trainer))
        if hasattr(engine, "get_global_grad_norm"):  # DeepSpeed's, computed before it clips
            self.norms.append(float(engine.get_global_grad_norm()))


def _strategy(name: str, offload: bool) -> Any:
    from cluster.strategies import build_strategy

    if name == "ddp":  # Kiln's is Ray's DDPStrategy, which only asks Ray Train for the device
        return DDPStrategy(find_unused_parameters=False)
    return build_strategy(ClusterConfig(strategy=name, offload=offload), BATCH)


def _gathered(trainer: L.Trainer) -> Tensor:
    """Every parameter, whole and flattened, in the model's order (ZeRO-3 gathers them)."""
    import deepspeed

    params = _params(trainer)
    with deepspeed.zero.GatheredParameters(
        params, modifier_rank=None, enabled=hasattr(params[0], "ds_id")
    ):
        return torch.cat([p.detach().flatten().clone() for p in params])


def _fit(
    name: str, rank: int, *, accumulate: int, clip: float | None, offload: bool = False
) -> dict[str, Any]:
    torch.manual_seed(1234)
    module = GPTPretrainModule(CFG, OptimConfig(lr=1e-3, warmup_steps=0), total_steps=100)
    recorder = Recorder()
    trainer = L.Trainer(
        max_steps=STEPS,
        accumulate_grad_batches=accumulate,
        accelerator="cpu",
        devices=WORLD,
        num_nodes=1,
        strategy=_strategy(name, offload),
        plugins=[TorchElasticEnvironment()],
        precision="32-true",
        gradient_clip_val=clip,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        use_distributed_sampler=False,
        callbacks=[recorder],
    )
    loader = torch.utils.data.DataLoader(_batches(rank, accumulate), batch_size=None)
    trainer.fit(module, loader)
    return {
        "norms": recorder.norms,
        "losses": recorder.losses,
        "between": recorder.between,
        "before_step": recorder.before_step,
        "after": recorder.after,
        "weights": _gathered(trainer),
        "global_step": trainer.global_step,
        "engine": _engine_report(trainer),
    }


def _engine_report(trainer: L.Trainer) -> dict[str, Any] | None:
    """The ZeRO stage and offload as the engine, and the ZeRO optimizer whose code paths branch on
    them, report them (None under DDP)."""
    engine, optimizer = trainer.strategy.model, trainer.optimizers[0]
    if not hasattr(engine, "zero_optimization_stage"):
        return None
    return {
        "stage": engine.zero_optimization_stage(),
        "cpu_offload": engine.zero_cpu_offload(),
        "offload_param": engine.zero_offload_param() is not None,
        "optimizer_offload": bool(
            getattr(optimizer, "cpu_offload", False)  # ZeRO-1/2
            or getattr(optimizer, "offload_optimizer", False)
        ),  # 3
        "optimizer_param_offload": bool(getattr(optimizer, "offload_param", False)),
    }


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
    results: dict[str, Any] = {}
    for name in CONFIGS:
        results[name] = {
            "accumulated": _fit(name, rank, accumulate=ACCUMULATE, clip=None),
            "one_batch": _fit(name, rank, accumulate=1, clip=None),
            "clipped": _fit(name, rank, accumulate=1, clip=CLIP),
        }
    for name in OFFLOADED:
        results[name]["offload"] = _fit(name, rank, accumulate=ACCUMULATE, clip=None, offload=True)
    torch.save(results, out / f"rank-{rank}.pt")


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    out = tmp_path_factory.mktemp("zero-partitioning")
    mp.spawn(_rank, args=(_free_port(), out), nprocs=WORLD, join=True)
    return [torch.load(out / f"rank-{rank}.pt", weights_only=True) for rank in range(WORLD)]


def _about_a_share(held: int, reading: dict[str, int], per_element: int = 1) -> bool:
    """`held` is this rank's 1/WORLD share of the model (per_element tensors of it), padding
    allowed: never the whole, never nothing."""
    share = reading["total"] / WORLD
    return share - reading["padding"] <= held / per_element <= share + reading["padding"]


@pytest.mark.parametrize("name", STAGES)
def test_each_rank_holds_its_share_of_the_optimizer_state(
    results: list[dict[str, Any]], name: str
) -> None:
    shares = []
    for rank, per_rank in enumerate(results):
        run = per_rank[name]["accumulated"]
        assert run["engine"]["stage"] == int(name[-1]), (name, rank)
        for reading in run["after"]:
            assert _about_a_share(reading["master"], reading), (name, rank, reading)
            assert _about_a_share(reading["moments"], reading, per_element=2), (name, rank, reading)
        shares.append(run["after"][-1]["master"])
    # The ranks' shares cover the model once: partitions, not copies.
    total = results[0][name]["accumulated"]["after"][-1]["total"]
    assert (
        total
        <= sum(shares)
        <= total + WORLD * results[0][name]["accumulated"]["after"][-1]["padding"]
    )


@pytest.mark.parametrize("name", STAGES)
def test_from_stage_2_no_rank_holds_a_whole_gradient(
    results: list[dict[str, Any]], name: str
) -> None:
    for rank, per_rank in enumerate(results):
        run, where = per_rank[name]["accumulated"], (name, rank)
        assert len(run["between"]) == len(run["before_step"]) == STEPS, where
        for reading in run["between"]:  # after a window's first micro-batch
            if name == "deepspeed_stage_1":  # stage 1 partitions only the optimizer state
                assert reading["param_grads"] == reading["total"], (where, reading)
            else:  # reduced into partitions in the backward: none left on the parameters
                assert reading["param_grads"] == 0, (where, reading)
        for reading in run["before_step"]:  # the window's reduced gradient, before the step
            assert reading["param_grads"] == 0, (where, reading)
            assert _about_a_share(reading["zero_grads"], reading), (where, reading)


def test_stage_3_partitions_the_parameters(results: list[dict[str, Any]]) -> None:
    for rank, per_rank in enumerate(results):
        run = per_rank["deepspeed_stage_3"]["accumulated"]
        for reading in run["between"] + run["before_step"] + run["after"]:
            # Most of the model is above the persistence threshold, and that part is empty on
            # every rank outside a gather; every parameter's partition is 1/WORLD of it.
            assert reading["persistent"] < reading["total"] / 4, (rank, reading)
            assert reading["param_data"] == 0, (rank, reading)
            assert _about_a_share(reading["partitions"], reading), (rank, reading)
        for name in ("deepspeed_stage_1", "deepspeed_stage_2"):  # whole parameters on each rank
            reading = per_rank[name]["accumulated"]["after"][-1]
            assert reading["param_data"] == reading["total"] and reading["partitions"] == 0


def test_the_readings_see_ddp_whole(results: list[dict[str, Any]]) -> None:
    """The negative control: a run that fell back to DDP fails every assertion above."""
    for per_rank in results:
        run = per_rank["ddp"]["accumulated"]
        assert run["engine"] is None
        for reading in run["after"]:
            total = reading["total"]
            assert reading["master"] == total and reading["moments"] == 2 * total, reading
            assert not _about_a_share(reading["master"], reading)
            assert reading["param_data"] == total and reading["partitions"] == 0, reading
        for reading in run["between"] + run["before_step"]:
            assert reading["param_grads"] == reading["total"] and reading["zero_grads"] == 0


@pytest.mark.parametrize("name", OFFLOADED)
def test_offload_runs_its_own_path_and_trains_as_without_it(
    results: list[dict[str, Any]], name: str
) -> None:
    for rank, per_rank in enumerate(results):
        offloaded, plain = per_rank[name]["offload"], per_rank[name]["accumulated"]
        assert offloaded["engine"]["cpu_offload"] and offloaded["engine"]["optimizer_offload"]
        assert not plain["engine"]["cpu_offload"] and not plain["engine"]["optimizer_offload"]
        stage_3 = name == "deepspeed_stage_3"
        assert offloaded["engine"]["offload_param"] == stage_3
        assert offloaded["engine"]["optimizer_param_offload"] == stage_3
        assert offloaded["global_step"] == STEPS
        for reading in offloaded["after"]:  # still partitioned
            assert _about_a_share(reading["master"], reading), (name, rank, reading)
        worst = max(abs(a - b) for a, b in zip(offloaded["losses"], plain["losses"], strict=True))
        assert worst <= OFFLOAD_TOLERANCE, f"{name}, rank {rank}: losses {worst:.2e} apart"
        assert torch.allclose(
            offloaded["weights"], plain["weights"], rtol=0, atol=OFFLOAD_TOLERANCE
        ), name


def _worst(a: list[float] | Tensor, b: list[float] | Tensor) -> float:
    return float(torch.max(torch.abs(torch.as_tensor(a) - torch.as_tensor(b))))


@pytest.mark.parametrize("name", CONFIGS)
def test_two_micro_batches_accumulated_step_as_one_batch_of_both(
    results: list[dict[str, Any]], name: str
) -> None:
    for rank, per_rank in enumerate(results):
        accumulated, one_batch = per_rank[name]["accumulated"], per_rank[name]["one_batch"]
        ddp = per_rank["ddp"]["one_batch"]
        assert accumulated["global_step"] == one_batch["global_step"] == STEPS, name
        assert len(accumulated["norms"]) == len(one_batch["norms"]) == STEPS, name
        # The gradient each step sees: scaled once for the window, not twice (a loss divided by
        # both Lightning and the engine halved the norm before cluster/strategies.py's `backward`).
        scale = NORM_TOLERANCE * max(ddp["norms"])
        assert _worst(accumulated["norms"], one_batch["norms"]) <= scale, (
            name,
            rank,
            accumulated["norms"],
            one_batch["norms"],
        )
        assert _worst(accumulated["norms"], ddp["norms"]) <= scale, (name, rank)
        assert _worst(accumulated["weights"], one_batch["weights"]) <= TOLERANCE, (name, rank)
        assert _worst(accumulated["weights"], ddp["weights"]) <= TOLERANCE, (name, rank)


@pytest.mark.parametrize("name", STAGES)
def test_zero_clips_like_ddp(results: list[dict[str, Any]], name: str) -> None:
    for rank, per_rank in enumerate(results):
        zero, ddp = per_rank[name]["clipped"], per_rank["ddp"]["clipped"]
        assert min(ddp["norms"]) > CLIP and min(zero["norms"]) > CLIP  # clipping acts every step
        assert _worst(zero["norms"], ddp["norms"]) <= NORM_TOLERANCE * max(ddp["norms"]), name
        assert _worst(zero["losses"], ddp["losses"]) <= TOLERANCE, (name, rank)
        assert _worst(zero["weights"], ddp["weights"]) <= TOLERANCE, (name, rank)
        # ... and the clip changed the update: unclipped, the same batches train elsewhere.
        assert _worst(zero["weights"], per_rank[name]["one_batch"]["weights"]) > 10 * TOLERANCE
        assert math.isfinite(zero["losses"][-1])
