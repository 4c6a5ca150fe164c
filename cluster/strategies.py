"""Lightning strategies for Ray Train workers: DDP and DeepSpeed ZeRO-1/2/3, on GPUs and on CPUs.

Lightning's `DeepSpeedStrategy` refuses any accelerator but CUDA. DeepSpeed itself runs on CPUs (its CPU
accelerator over gloo), so `CPUCapableDeepSpeedStrategy` lifts the three CUDA-only assumptions:
1. `setup_environment` raises for non-CUDA accelerators → run DDP's environment setup instead;
2. `setup_distributed` validates CUDA device indices → skip that validation on CPU;
3. `deepspeed.initialize` is given `device_rank=root_device.index`, which is None on CPU and breaks
   DeepSpeed's `device_rank >= 0` check → pass the local rank.
On a GPU every override defers to the parent, so the CUDA path is Lightning's own.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
from lightning.fabric.utilities.seed import reset_seed
from lightning.pytorch.accelerators.cuda import CUDAAccelerator
from lightning.pytorch.strategies import DDPStrategy, Strategy
from ray.train.lightning import RayDDPStrategy, RayDeepSpeedStrategy

from cluster.jobs import ClusterConfig


class CPUCapableDeepSpeedStrategy(RayDeepSpeedStrategy):
    def _on_cuda(self) -> bool:
        return isinstance(self.accelerator, CUDAAccelerator)

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
    return isinstance(trainer.strategy, RayDeepSpeedStrategy)
