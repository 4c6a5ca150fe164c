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
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.seed import reset_seed
from lightning.pytorch.accelerators.cuda import CUDAAccelerator
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, Strategy
from lightning.pytorch.trainer.states import TrainerFn
from ray.train.lightning import RayDDPStrategy, RayDeepSpeedStrategy
from torch import Tensor, nn

from cluster.jobs import ClusterConfig
from pretrain.checkpoint import MANIFEST_FILE, CheckpointError


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

    def backward(self, closure_loss: Tensor, optimizer: Any, *args: Any, **kwargs: Any) -> Tensor:
        # Lightning's closure has already divided each micro-batch's loss by accumulate_grad_batches;
        # the engine would divide it again by gradient_accumulation_steps (the same number), so an
        # accumulated step's gradient was 1/k of DDP's (tests/cluster/test_zero_partitioning.py).
        kwargs.setdefault("scale_wrt_gas", False)
        return super().backward(closure_loss, optimizer, *args, **kwargs)

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

    def _setup_model_and_optimizer(
        self, model: Any, optimizer: Any, lr_scheduler: Any = None
    ) -> tuple[Any, Any]:
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

    def load_checkpoint(
        self, checkpoint_path: Any, weights_only: bool | None = None
    ) -> dict[str, Any]:
        # A Kiln checkpoint directory is read by the checkpoint IO plugin (KilnCheckpointIO), as
        # under DDP; Lightning's DeepSpeed strategy would hand it to the engine as DeepSpeed's own
        # format.
        if (Path(checkpoint_path) / MANIFEST_FILE).is_file():
            return Strategy.load_checkpoint(self, checkpoint_path, weights_only=weights_only)
        return super().load_checkpoint(checkpoint_path, weights_only=weights_only)

    def load_model_state_dict(self, checkpoint: Mapping[str, Any], strict: bool = True) -> None:
        """Resuming from a Kiln checkpoint (cluster/resume.py, step 5): the weights, then the
        consolidated optimizer state, into the engine Lightning built in `setup` (the restore runs
        after it: `restore_checkpoint_after_setup`) and before the first resumed step. Lightning
        leaves the optimizer to DeepSpeed (`lightning_restore_optimizer` is False), so it is
        restored here; the scheduler and the loops Lightning restores itself."""
        if "kiln_path" not in checkpoint:
            super().load_model_state_dict(checkpoint, strict=strict)
            return
        module = self.lightning_module
        if self.zero_stage_3:  # each module's partitions gathered in turn, loaded, re-partitioned
            self._restore_zero_state(checkpoint, strict=strict)
        else:
            module.load_state_dict(checkpoint["state_dict"], strict=strict)
        if module.trainer.state.fn == TrainerFn.FITTING:
            restore_zero_optimizer_state(
                module.model,
                self.optimizers[0],
                checkpoint["optimizer_states"][0],
                checkpoint["kiln_path"],
            )


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


# ---------------------------------------------------------------- consolidated ZeRO optimizer state
# What a ZeRO checkpoint's trainer_state["optimizer"] holds (cluster/resume.py): per parameter (by
# its name in the model) the full fp32 master weight and Adam moments, and per param group its
# hyper-parameters and AdamW's step count. Gathered whole, it does not depend on the stage or on
# the number of ranks that wrote it, so it restores into any ZeRO stage and any world size.
ZERO_OPTIMIZER_FORMAT = "kiln-zero-consolidated"


def zero_optimizer_state(model: nn.Module, optimizer: Any, rank: int) -> dict[str, Any] | None:
    """The ZeRO `optimizer`'s state, consolidated, on rank 0 (None elsewhere). A collective: every
    rank gathers one parameter at a time (DeepSpeed's safe_get_full_* API, every stage), so only
    rank 0 ever holds more than one full parameter's state."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    inner = optimizer.optimizer  # the torch AdamW stepping ZeRO's flat fp32 partitions
    keys = _moment_keys(inner)
    if keys:
        _link_state_fragments(optimizer)
    params: dict[str, dict[str, Tensor]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        entry = {"fp32": safe_get_full_fp32_param(param)}
        entry.update({key: safe_get_full_optimizer_state(param, key) for key in keys})
        if rank == 0:
            params[name] = {key: value.detach().cpu().clone() for key, value in entry.items()}
    if rank != 0:
        return None
    return {
        "format": ZERO_OPTIMIZER_FORMAT,
        "params": params,
        "param_groups": [
            _group_state(optimizer, g, group) for g, group in enumerate(inner.param_groups)
        ],
    }


def _moment_keys(inner: torch.optim.Optimizer) -> list[str]:
    """AdamW's per-element state (exp_avg, exp_avg_sq; amsgrad's max too): the tensors shaped like
    a flat partition. Empty before the first optimizer step (torch creates the state lazily)."""
    first = next(iter(inner.state.values()), {})
    return sorted(k for k, v in first.items() if torch.is_tensor(v) and v.dim() > 0)


def _link_state_fragments(optimizer: Any) -> None:
    """ZeRO-1/2 point each parameter at its fragment of the optimizer state (what
    safe_*_optimizer_state reads and writes) once, right after stepping the FIRST param group, when
    the others have no state yet: their parameters then have none ("exp_avg not found in optimizer
    state fragment", DeepSpeed 0.19). Link every group again, with DeepSpeed's own routine, once all
    have state. (ZeRO-3 looks its state up at each call.)"""
    if hasattr(optimizer, "_hp_optimizer_states_linked"):
        optimizer._hp_optimizer_states_linked = False
        optimizer._lazy_init_hp_params_optimizer_state()


def _flat_partitions(optimizer: Any) -> list[tuple[int, Tensor]]:
    """(param group index, flat fp32 partition) for each partition the ZeRO `optimizer` steps on
    this rank. ZeRO-3 keeps its sub-groups' partitions outside the torch optimizer's param groups,
    which hold them only while stepping."""
    if hasattr(optimizer, "fp32_partitioned_groups_flat"):  # ZeRO-3
        return [
            (optimizer.sub_group_to_group_id[i], flat)
            for i, flat in enumerate(optimizer.fp32_partitioned_groups_flat)
        ]
    groups = optimizer.optimizer.param_groups
    return [(g, flat) for g, group in enumerate(groups) for flat in group["params"]]


def _group_state(optimizer: Any, index: int, group: dict[str, Any]) -> dict[str, Any]:
    """A param group's hyper-parameters (lr, betas, weight decay ...) and its step count: AdamW
    keeps `step` per flat partition, and a group's partitions always step together (None: not
    yet)."""
    state = optimizer.optimizer.state
    steps = [
        state[flat]["step"]
        for g, flat in _flat_partitions(optimizer)
        if g == index and "step" in state.get(flat, {})
    ]
    if len({float(step) for step in steps}) > 1:
        raise RuntimeError(f"ZeRO param group {index}: partitions at different steps {steps}")
    saved = {key: value for key, value in group.items() if key != "params"}
    saved["step"] = steps[0].detach().cpu().clone() if steps else None
    return saved


def restore_zero_optimizer_state(
    model: nn.Module, optimizer: Any, saved: dict[str, Any], where: str
) -> None:
    """Put `zero_optimizer_state`'s dict back into this rank's partitions of a ZeRO `optimizer`,
    whatever stage and world size wrote it. Called once the engine is built, before the first step
    (`CPUCapableDeepSpeedStrategy.load_model_state_dict`). Every rank holds `saved` whole."""
    inner = optimizer.optimizer
    if not isinstance(saved, dict) or saved.get("format") != ZERO_OPTIMIZER_FORMAT:
        raise CheckpointError(
            f"{where}: its optimizer state is not a ZeRO one "
            f"({ZERO_OPTIMIZER_FORMAT}); it resumes with the cluster.strategy "
            "that wrote it"
        )
    if len(saved["param_groups"]) != len(inner.param_groups):
        raise CheckpointError(
            f"{where}: {len(saved['param_groups'])} optimizer param groups "
            f"saved, this model has {len(inner.param_groups)}"
        )
    keys = _create_state(optimizer, saved)
    if keys:
        _link_state_fragments(optimizer)
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if name not in saved["params"]:
            raise CheckpointError(f"{where}: no optimizer state for parameter {name!r}")
        entry = saved["params"][name]
        _set_full(optimizer, param, entry["fp32"], None)
        for key in keys:
            _set_full(optimizer, param, entry[key], key)


def _set_full(optimizer: Any, param: Tensor, value: Tensor, key: str | None) -> None:
    """DeepSpeed's safe_set_full_fp32_param (key None) / safe_set_full_optimizer_state, except where
    ZeRO-3's (DeepSpeed 0.19) fails: a parameter whose size the worker count does not divide has a
    padded partition on the last rank, and DeepSpeed cuts that rank's piece past the value's end.
    There this rank's piece is copied into its partition here, the padding left alone."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    if hasattr(param, "ds_id") and value.numel() % optimizer._get_param_partition_world_size(param):
        part, _ = optimizer._get_fp32_opt_state_partition(
            param, release_swap_buffers=False, optim_state_key=key
        )
        start = part.numel() * optimizer._get_param_partition_rank(param)
        piece = value.flatten()[start : start + part.numel()]
        part.data[: piece.numel()].copy_(piece)
    elif key is None:
        safe_set_full_fp32_param(param, value)
    else:
        safe_set_full_optimizer_state(param, value, key)


def _create_state(optimizer: Any, saved: dict[str, Any]) -> list[str]:
    """Set each group's hyper-parameters and create AdamW's state as its first step would (zeros,
    the saved step count) for the safe_set_* API to fill; returns the per-element keys saved."""
    inner = optimizer.optimizer
    keys = sorted(k for k in next(iter(saved["params"].values()), {}) if k != "fp32")
    for group, hyper in zip(inner.param_groups, saved["param_groups"], strict=True):
        group.update({key: value for key, value in hyper.items() if key != "step"})
    for g, flat in _flat_partitions(optimizer):
        step = saved["param_groups"][g]["step"]
        if step is not None:  # else saved before AdamW's first step: its state stays lazy
            zeros = {key: torch.zeros_like(flat) for key in keys}
            inner.state[flat] = {"step": step.clone(), **zeros}
    return keys
