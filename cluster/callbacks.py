"""Lightning callbacks run inside every Ray Train worker: progress lines, Kiln checkpoints, and exact resume.

Resume (trainer.resume=auto) is told top to bottom in cluster/resume.py; its Lightning hooks are here:
`KilnCheckpointIO` hands `trainer.fit(ckpt_path=<Kiln checkpoint directory>)` the dict that
`resume.lightning_checkpoint` builds, and `KilnCheckpoint` writes the `trainer_state` a resume reads
and puts back at `on_train_start` what Lightning's own restore leaves out (`resume.rank_state`).
"""

from __future__ import annotations

import logging
import os
import time
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.plugins.io import TorchCheckpointIO
from torch import Tensor, nn

from cluster import progress
from cluster.progress import EventWriter, emit
from cluster.resume import (
    lightning_checkpoint,
    publish_metrics,
    rank_state,
    restore_rank_state,
)
from cluster.rundir import RunDir
from data_pipeline.storage import Location
from pretrain.checkpoint import (
    capture_rng_state,
    prune_checkpoints,
    publish_checkpoint,
    save_checkpoint,
)

# How often rank 0 asks an object store for the stop request (one request each); KILN_STOP_POLL_S
# changes it (0: after every step, as on a local disk).
REMOTE_STOP_POLL_S = float(os.environ.get("KILN_STOP_POLL_S", "5"))


def quiet_worker_logs() -> None:
    """Keep the driver's console to Kiln's progress lines and real warnings."""
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    logging.getLogger("lightning.fabric").setLevel(logging.WARNING)
    # Validation metrics are reduced across ranks by the module itself before logging.
    warnings.filterwarnings("ignore", message=".*sync_dist=True.*")
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")
    warnings.filterwarnings("ignore", message=".*exists and is not empty.*")


class ProgressPrinter(pl.Callback):
    """Rank 0's progress as events for the driver's console (cluster.progress): every `every` steps and the
    last (the plain lines of a log), in between at most one each LIVE_INTERVAL_S (a terminal's live line), and
    every validation's results. Without `events` (a Trainer outside Kiln's launcher) the plain lines are
    printed instead."""

    LIVE_INTERVAL_S = 0.5

    def __init__(
        self,
        stage: str,
        every: int,
        keys: tuple[str, ...],
        events: EventWriter | Path | None = None,
    ) -> None:
        self.stage, self.every, self.keys = stage, max(1, every), keys
        self.writer = EventWriter(events) if isinstance(events, Path) else events
        self._start, self._start_step, self._sent = 0.0, 0, 0.0

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start, self._start_step = time.perf_counter(), trainer.global_step  # > 0 when resumed

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any
    ) -> None:
        step, now = trainer.global_step, time.perf_counter()
        logged = step % self.every == 0 or step >= trainer.max_steps
        if trainer.global_rank != 0 or not (
            logged or (self.writer and now - self._sent >= self.LIVE_INTERVAL_S)
        ):
            return
        self._sent = now
        metrics = trainer.callback_metrics
        elapsed = now - self._start
        self._send(
            {
                "kind": "step",
                "step": step,
                "max_steps": trainer.max_steps,
                "metrics": {k.split("/")[-1]: float(metrics[k]) for k in self.keys if k in metrics},
                "elapsed": elapsed,
                "eta": elapsed / max(step - self._start_step, 1) * (trainer.max_steps - step),
            }
        )

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.global_rank != 0 or trainer.sanity_checking:
            return
        metrics = trainer.callback_metrics
        self._send(
            {
                "kind": "validation",
                "step": trainer.global_step,
                "metrics": {
                    k: float(v) for k, v in sorted(metrics.items()) if k.startswith("val/")
                },
            }
        )

    def _send(self, event: dict[str, Any]) -> None:
        event["stage"] = self.stage
        if self.writer is not None:
            self.writer.write(**event)
        elif event["kind"] == "validation":
            emit(progress.format_validation(event))
        elif event["step"] % self.every == 0 or event["step"] >= event["max_steps"]:
            emit(progress.format_step(event))


class KilnCheckpoint(pl.Callback):
    """Writes Kiln checkpoint directories every `every` steps (0: never) and at the last step; restores what
    Lightning's own restore leaves out when resuming.

    Saves happen at `on_train_batch_end`, the point Lightning's ModelCheckpoint saves from and its restart logic
    expects, the last step's too: by `on_train_end` the loops have closed the epoch, and a resume with a larger
    max_steps would then start a new one. Weights are consolidated first when DeepSpeed ZeRO-3 has partitioned
    them, and every rank's RNG state is gathered, both collectives, so every rank enters `save`; rank 0 writes."""

    def __init__(
        self,
        root: Path,
        model_config: Any,
        tokenizer_file: Path,
        job_config: dict,
        data_manifest: Path,
        every: int,
        keep_last: int,
        loader: Any,
        val_loader: Any | None = None,
        run: RunDir | None = None,
        launch: str | None = None,
    ) -> None:
        self.root, self.model_config, self.tokenizer_file = Path(root), model_config, tokenizer_file
        # A remote run: each checkpoint is written under `root` (scratch), then uploaded to the run's
        # `--out`, manifest last. `launch` goes into every manifest (cluster.resume.retry_checkpoint).
        self.run, self.launch = run, launch
        self.job_config, self.data_manifest = job_config, data_manifest
        self.loader, self.val_loader = loader, val_loader
        self.every, self.keep_last = every, keep_last
        self.last_saved: Path | str | None = None
        self._saved_step: int | None = None
        self._resume_rng: dict | None = None  # this rank's RNG at the checkpoint resumed from
        self._resume_val_loader: dict | None = None

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any
    ) -> None:
        step = trainer.global_step
        if step >= trainer.max_steps or (self.every and step % self.every == 0):
            self.save(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.save(
            trainer, pl_module
        )  # a no-op after the last step's save; writes one if training stopped early

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict
    ) -> None:
        # put back at on_train_start, the last hook before the first resumed batch (cluster/resume.py)
        self._resume_rng, self._resume_val_loader = rank_state(
            checkpoint, trainer.world_size, trainer.global_rank
        )

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        restore_rank_state(self._resume_rng, self._resume_val_loader, self.val_loader)
        self._resume_rng = self._resume_val_loader = None

    def save(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """A checkpoint of this step (a no-op if it is saved already). A collective: every rank calls it at the
        same step; also called off schedule, on preemption (StopOnRequest)."""
        if self._saved_step == trainer.global_step:
            return
        rngs = _gather_rng_states()
        model: nn.Module = pl_module.model
        # ZeRO-3 partitions the weights: rank 0 gets them whole, gathered one module at a time (a collective).
        weights = (
            zero3_state_dict(model, trainer.global_rank) if _zero_stage(trainer) == 3 else None
        )
        # ZeRO shards the optimizer: rank 0 gets it whole, one parameter at a time (a collective).
        zero = _zero_optimizer_state(trainer, model) if _zero_stage(trainer) else None
        if trainer.global_rank == 0:
            path = self.root / f"step-{trainer.global_step:07d}"
            if not path.exists():
                save_checkpoint(
                    path,
                    model,
                    self.model_config,
                    self.tokenizer_file,
                    job_config=self.job_config,
                    trainer_state=self._trainer_state(trainer, rngs, zero),
                    data_manifest=self.data_manifest,
                    state_dict=weights,
                    launch=self.launch,
                )
                prune_checkpoints(self.root, self.keep_last)
            self.last_saved = self._publish(path)
        self._saved_step = trainer.global_step
        trainer.strategy.barrier("kiln-checkpoint")

    def _publish(self, path: Path) -> Path | str:
        """A remote run's checkpoint into its `--out` (files, then manifest.json), older ones pruned
        there too, and the metrics so far beside them; a local run's checkpoint is already in place."""
        if self.run is None or not self.run.remote:
            return path
        dest = self.run.checkpoints / path.name
        publish_checkpoint(path, dest)
        prune_checkpoints(self.run.checkpoints, self.keep_last)
        publish_metrics(self.run)
        return str(dest)

    def _trainer_state(self, trainer: pl.Trainer, rngs: list[dict], zero: dict | None) -> dict:
        """What a resume reads back (cluster/resume.py: `lightning_checkpoint`, `RESUME_KEYS`).
        `zero`: a ZeRO run's optimizer state, consolidated (cluster.strategies)."""
        state: dict[str, Any] = {
            "step": trainer.global_step,
            "epoch": trainer.current_epoch,
            "rng": rngs[0],
            "rng_per_rank": rngs,
            "loader": self.loader.state_dict(),
        }
        if self.val_loader is not None:
            state["val_loader"] = self.val_loader.state_dict()
        # DDP: every rank holds the whole optimizer state, saved as torch's state_dict. ZeRO: each
        # rank holds its shard; saved whole, by parameter name, so any stage and any worker count
        # can restore it.
        state["optimizer"] = zero if zero is not None else trainer.optimizers[0].state_dict()
        state["scheduler"] = trainer.lr_scheduler_configs[0].scheduler.state_dict()
        # Lightning's loop progress (steps, batches, the train loader's position) in its own schema,
        # as its checkpoints store it: weights-only-loadable ints and dicts.
        state["lightning"] = {
            "loops": trainer._checkpoint_connector._get_loops_state_dict(),
            "pytorch-lightning_version": pl.__version__,
        }
        return state


class LogLastStep(pl.Callback):
    """Makes the last training step a logging step, so every run's metrics.csv (and W&B history) ends with its
    final step's row, however `trainer.log_every` relates to `max_steps`.

    Lightning logs a training step only when `(step + 1) % log_every_n_steps == 0` (or on `should_stop`), so a run
    shorter than log_every logged nothing and left no metrics.csv. Lowering `log_every_n_steps` here, after
    the last optimizer step and before Lightning decides whether to log it, sends that step through Lightning's
    own path: the same step numbering, and the values the module logs in its own `on_train_batch_end`
    (tokens/s, MFU), which run after this hook. Setting `should_stop` instead would also log it, but adds a
    validation pass at the end that the run did not ask for."""

    def __init__(self) -> None:
        self._every: int | None = None

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any
    ) -> None:
        if trainer.global_step >= trainer.max_steps > 0 and trainer.log_every_n_steps > 1:
            self._every, trainer.log_every_n_steps = trainer.log_every_n_steps, 1

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._every is not None:  # the Trainer as configured again, should it be used after fit
            trainer.log_every_n_steps, self._every = self._every, None


class StopOnRequest(pl.Callback):
    """Preemption (cluster/preemption.py): after every step rank 0 looks for the stop file, the ranks agree in one
    all-reduce, and when it is there every rank checkpoints this step (a save at a step's end is what an exact
    resume continues from) and leaves the loop. `stopped_at` holds every rank's step, as each rank saw it."""

    def __init__(
        self, stop_file: Path | Location, checkpoint: KilnCheckpoint, poll_s: float | None = None
    ) -> None:
        self.stop_file, self.checkpoint = Location.of(stop_file), checkpoint
        # A local file is looked at after every step; an object store at most every few seconds
        # (one request each; rank 0's own monotonic clock).
        self.poll_s = (
            (REMOTE_STOP_POLL_S if self.stop_file.is_remote else 0.0) if poll_s is None else poll_s
        )
        self._next_poll = 0.0
        self.stopped_at: list[int] | None = None

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any
    ) -> None:
        if trainer.global_step >= trainer.max_steps:
            return  # the last step: the run ends here anyway, with its final checkpoint
        asked = trainer.global_rank == 0 and self._asked()
        if not trainer.strategy.reduce_boolean_decision(asked, all=False):
            return
        self.checkpoint.save(trainer, pl_module)
        self.stopped_at = _gather_objects(trainer.global_step)
        trainer.should_stop = True

    def _asked(self) -> bool:
        now = time.monotonic()
        if now < self._next_poll:
            return False
        self._next_poll = now + self.poll_s
        return self.stop_file.exists()


def _gather_objects(mine: Any) -> list[Any]:
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [mine]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, mine)
    return gathered


def _gather_rng_states() -> list[dict]:
    """Every rank's RNG state, in rank order (ranks draw different dropout masks, so their streams differ)."""
    return _gather_objects(capture_rng_state())


class KilnCheckpointIO(TorchCheckpointIO):
    """Lets `trainer.fit(ckpt_path=<Kiln checkpoint directory>)` resume from a Kiln checkpoint
    (cluster/resume.py, step 5)."""

    def load_checkpoint(
        self, path: Any, map_location: Any = None, weights_only: bool | None = None
    ) -> dict:
        if not Path(
            path
        ).is_dir():  # a Lightning .ckpt file: never unpickled beyond tensors and plain containers
            return super().load_checkpoint(path, map_location=map_location, weights_only=True)
        return lightning_checkpoint(Path(path))


def _zero_stage(trainer: pl.Trainer) -> int:
    config = getattr(trainer.strategy, "config", None)
    return (
        int(config.get("zero_optimization", {}).get("stage", 0)) if isinstance(config, dict) else 0
    )


def _zero_optimizer_state(trainer: pl.Trainer, model: nn.Module) -> dict | None:
    from cluster.strategies import zero_optimizer_state  # imports DeepSpeed and Ray Train

    return zero_optimizer_state(model, trainer.optimizers[0], trainer.global_rank)


def zero3_state_dict(model: nn.Module, rank: int) -> dict[str, Tensor] | None:
    """ZeRO-3: `model.state_dict()` (same keys) on rank 0, None elsewhere. Each module's own parameters are gathered
    in turn and copied to CPU, so no rank ever holds more than one module's full weights (gathering the whole model
    at once would undo ZeRO-3's memory saving at every save). A collective: every rank calls it."""
    import deepspeed

    state: dict[str, Tensor] = {}
    for prefix, module in model.named_modules():
        own = dict(module.named_parameters(recurse=False))
        with deepspeed.zero.GatheredParameters(list(own.values()), modifier_rank=0):
            if rank == 0:
                for name, param in own.items():
                    state[f"{prefix}.{name}" if prefix else name] = param.detach().cpu().clone()
        if rank == 0:  # buffers are not partitioned
            for name, buffer in module.named_buffers(recurse=False):
                if name not in module._non_persistent_buffers_set:
                    state[f"{prefix}.{name}" if prefix else name] = buffer.detach().cpu().clone()
    if rank != 0:
        return None
    return {
        key: state[key] for key in model.state_dict(keep_vars=True)
    }  # state_dict's order (and its tied keys)


def set_threads(cpus: int) -> None:
    """Ray gives each worker `cpus_per_worker` CPUs; torch should use exactly that many threads."""
    torch.set_num_threads(max(1, cpus))
