"""Lightning callbacks run inside every Ray Train worker: progress lines and Kiln checkpoints."""

from __future__ import annotations

import logging
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn

from pretrain.checkpoint import capture_rng_state, prune_checkpoints, save_checkpoint


def emit(line: str) -> None:
    """Write a progress line once. Ray Train patches `print` into its logger, and W&B wraps stdout, so a plain
    `print` reaches the driver twice; the process's own stdout is forwarded exactly once."""
    sys.__stdout__.write(line + "\n")
    sys.__stdout__.flush()


def quiet_worker_logs() -> None:
    """Keep the driver's console to Kiln's progress lines and real warnings."""
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    logging.getLogger("lightning.fabric").setLevel(logging.WARNING)
    # Validation metrics are reduced across ranks by the module itself before logging.
    warnings.filterwarnings("ignore", message=".*sync_dist=True.*")
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")
    warnings.filterwarnings("ignore", message=".*exists and is not empty.*")


class ProgressPrinter(pl.Callback):
    """One line every `every` steps from rank 0 (Ray forwards worker stdout to the driver; a tqdm bar does not
    survive that trip)."""

    def __init__(self, stage: str, every: int, keys: tuple[str, ...]) -> None:
        self.stage, self.every, self.keys = stage, every, keys
        self._start = 0.0

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        step = trainer.global_step
        if trainer.global_rank != 0 or (step % self.every and step != trainer.max_steps):
            return
        metrics = trainer.callback_metrics
        shown = " ".join(f"{k.split('/')[-1]} {float(metrics[k]):.4g}" for k in self.keys if k in metrics)
        elapsed = time.perf_counter() - self._start
        eta = elapsed / max(step, 1) * (trainer.max_steps - step)
        emit(f"[{self.stage}] step {step}/{trainer.max_steps} {shown} | {elapsed:.0f}s elapsed, ~{eta:.0f}s left")

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.global_rank != 0 or trainer.sanity_checking:
            return
        metrics = trainer.callback_metrics
        shown = " ".join(f"{k} {float(v):.4g}" for k, v in sorted(metrics.items()) if k.startswith("val/"))
        emit(f"[{self.stage}] validation at step {trainer.global_step}: {shown}")


class KilnCheckpoint(pl.Callback):
    """Writes Kiln checkpoint directories every `every` steps (0: never) and at the end of training.

    Weights are consolidated first when DeepSpeed ZeRO-3 has partitioned them, which is a collective, so every
    rank enters `_save`; only rank 0 writes."""

    def __init__(self, root: Path, model_config: Any, tokenizer_file: Path, job_config: dict, data_manifest: Path,
                 every: int, keep_last: int, loader: Any) -> None:
        self.root, self.model_config, self.tokenizer_file = Path(root), model_config, tokenizer_file
        self.job_config, self.data_manifest, self.loader = job_config, data_manifest, loader
        self.every, self.keep_last = every, keep_last
        self.last_saved: Path | None = None

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        step = trainer.global_step
        if self.every and step % self.every == 0 and step < trainer.max_steps:
            self._save(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._save(trainer, pl_module)

    def _save(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        model: nn.Module = pl_module.model
        with _gathered(trainer, model):
            if trainer.global_rank == 0:
                path = self.root / f"step-{trainer.global_step:07d}"
                if not path.exists():
                    save_checkpoint(path, model, self.model_config, self.tokenizer_file, job_config=self.job_config,
                                    trainer_state=self._trainer_state(trainer), data_manifest=self.data_manifest)
                    prune_checkpoints(self.root, self.keep_last)
                self.last_saved = path
        trainer.strategy.barrier("kiln-checkpoint")

    def _trainer_state(self, trainer: pl.Trainer) -> dict:
        state: dict[str, Any] = {"step": trainer.global_step, "epoch": trainer.current_epoch,
                                 "rng": capture_rng_state(), "loader": self.loader.state_dict()}
        if not _zero_stage(trainer):
            # With DDP every rank holds the whole optimizer state; with ZeRO it is sharded across ranks and lives
            # in DeepSpeed's own files, not in this directory.
            state["optimizer"] = trainer.optimizers[0].state_dict()
            state["scheduler"] = trainer.lr_scheduler_configs[0].scheduler.state_dict()
        return state


def _zero_stage(trainer: pl.Trainer) -> int:
    config = getattr(trainer.strategy, "config", None)
    return int(config.get("zero_optimization", {}).get("stage", 0)) if isinstance(config, dict) else 0


class _gathered:
    """Context manager: full parameters on every rank while inside (a no-op unless ZeRO-3 partitions them)."""

    def __init__(self, trainer: pl.Trainer, model: nn.Module) -> None:
        self.ctx = None
        if _zero_stage(trainer) == 3:
            import deepspeed

            self.ctx = deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None)

    def __enter__(self) -> None:
        if self.ctx is not None:
            self.ctx.__enter__()

    def __exit__(self, *exc: Any) -> None:
        if self.ctx is not None:
            self.ctx.__exit__(*exc)


def set_threads(cpus: int) -> None:
    """Ray gives each worker `cpus_per_worker` CPUs; torch should use exactly that many threads."""
    torch.set_num_threads(max(1, cpus))
