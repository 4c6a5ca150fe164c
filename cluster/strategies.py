"""Lightning strategies for Ray Train workers: DDP and DeepSpeed ZeRO-1/2/3, on GPUs and on CPUs.

Lightning's `DeepSpeedStrategy` refuses any accelerator but CUDA. DeepSpeed itself runs on CPUs (its CPU
accelerator over gloo), so `CPUCapableDeepSpeedStrategy` lifts the three CUDA-only assumptions:
1. `setup_environment` raises for non-CUDA accelerators → run DDP's environment setup instead;
2. `setup_distributed` validates CUDA device indices → skip that validation on CPU;
3. `deepspeed.initialize` is given `device_rank=root_device.index`, which is None on CPU and breaks
   DeepSpeed's `device_rank >= 0` check → pass the local rank.
On a GPU every override defers to the parent, so the CUDA path is Lightning's own.

It also gives `KilnModule` the loss to return for a step skipped on a non-finite loss
(`loss_for_skipped_step`): under DeepSpeed the engine, not Lightning, owns the backward and the
optimizer step, so the skip is the engine's.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.seed import reset_seed
from lightning.pytorch.accelerators.cuda import CUDAAccelerator
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, Strategy
from ray.train.lightning import RayDDPStrategy, RayDeepSpeedStrategy
from torch import Tensor

from cluster.jobs import ClusterConfig


class CPUCapableDeepSpeedStrategy(RayDeepSpeedStrategy):
    def _on_cuda(self) -> bool:
        return isinstance(self.accelerator, CUDAAccelerator)

    @property
    def root_device(self) -> torch.device:
        # On CPU there is one device; asking Ray Train for it would tie the strategy to a Ray Train
        # session (the tests run it in plain torch.multiprocessing ranks).
        return super().root_device if self._on_cuda() else torch.device("cpu")

    @staticmethod
    def loss_for_skipped_step(loss: Tensor) -> Tensor:
        """The loss `KilnModule.training_step` returns when every rank agreed to skip the step (a
        non-finite loss); supplying it tells the module that the engine, not Kiln, skips the step.

        As in the default (`KilnModule._skipped_step_loss`) its gradients are all NaN, so every rank
        runs the same backward and collectives. But under DeepSpeed Kiln cannot drop the gradients
        before the step as it does for DDP: the engine owns them (flat ZeRO partitions, reduced in
        backward hooks, accumulated over the window) and the step. Leaving out the backward or the
        step instead would desynchronise the engine's window (its micro-step count, the reductions
        at the window's end) from Lightning's global_step, and Lightning refuses a None loss under
        DeepSpeed. Lightning manual optimisation would change every module's training loop for one
        strategy, and clipping, accumulation and scheduling would become Kiln's to redo.
        So the engine skips it: before stepping, every ZeRO stage computes the global gradient norm
        (all-reduced over the ranks), finds it non-finite and takes the path it takes on an fp16
        overflow: the window's gradients are cleared and the optimizer is not stepped (parameters,
        fp32 master weights, Adam moments and step counts unchanged); `engine.skipped_steps` counts
        it. Lightning still counts the step (global_step, LR schedule), as under DDP.
        This relies on two DeepSpeed defaults, left unset in `_deepspeed` (setting them would break
        older DeepSpeed releases without the keys): `zero_optimization.compute_grad_norm` and, for
        bf16 under ZeRO-1/2, `bf16.check_grad_overflow`; tests/cluster/test_zero_nonfinite.py
        holds the installed DeepSpeed to that."""
        return loss * float("nan")

    def setup_environment(self) -> None:
        if self._on_cuda():
            super().setup_environment()
        else:
            DDPStrategy.setup_environment(self)

    def setup_distributed(self) -> None:
        if self._on_cuda():
            super().setup_distributed()
            return
        reset_seed()
        self.set_world_ranks()
        self._init_deepspeed_distributed()

    def _setup_model_and_optimizer(self, model: Any, optimizer: Any, lr_scheduler: Any = None) -> tuple[Any, Any]:
        if self._on_cuda():
            return super()._setup_model_and_optimizer(model, optimizer, lr_scheduler)
        import deepspeed

        params = filter(lambda p: p.requires_grad, model.parameters())
        engine, ds_optimizer, _, _ = deepspeed.initialize(
            args=argparse.Namespace(device_rank=self.local_rank),
            config=self.config,
            model=model,
            model_parameters=params,
            optimizer=optimizer,
            lr_scheduler=lr_scheduler,
            dist_init_required=False,
        )
        return engine, ds_optimizer


def _ddp(cfg: ClusterConfig, batch_size: int) -> Strategy:
    return RayDDPStrategy(find_unused_parameters=False)


def _deepspeed(stage: int) -> Callable[[ClusterConfig, int], Strategy]:
    def build(cfg: ClusterConfig, batch_size: int) -> Strategy:
        config = {
            "zero_optimization": {"stage": stage},
            "train_micro_batch_size_per_gpu": batch_size,
            # Our optimizer is torch AdamW (built by pretrain.optim), not one of DeepSpeed's own.
            "zero_allow_untested_optimizer": True,
        }
        if cfg.offload:
            config["zero_optimization"]["offload_optimizer"] = {"device": "cpu"}
            # DeepSpeed insists on its own CPU Adam (a compiled op) for offload unless told otherwise; torch AdamW
            # on the offloaded fp32 master weights is slower but needs no compiler on the machine.
            config["zero_force_ds_cpu_optimizer"] = False
            if stage == 3:
                config["zero_optimization"]["offload_param"] = {"device": "cpu"}
        return CPUCapableDeepSpeedStrategy(config=config)

    return build


STRATEGIES: dict[str, Callable[[ClusterConfig, int], Strategy]] = {
    "ddp": _ddp,
    "deepspeed_stage_1": _deepspeed(1),
    "deepspeed_stage_2": _deepspeed(2),
    "deepspeed_stage_3": _deepspeed(3),
}


def build_strategy(cfg: ClusterConfig, batch_size: int) -> Strategy:
    return STRATEGIES[cfg.strategy](cfg, batch_size)


def is_deepspeed(trainer: pl.Trainer) -> bool:
    return isinstance(trainer.strategy, DeepSpeedStrategy)
