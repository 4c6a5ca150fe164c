"""Start or connect to Ray and run a training job on N Ray Train workers, each a Lightning Trainer.

The driver validates the job, then `TorchTrainer.fit()` runs `train_worker` on every worker; there the task
registry builds the LightningModule and this rank's loaders, and the strategy registry picks DDP or DeepSpeed.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cluster.config import build, to_dict
from cluster.jobs import FinetuneJob, PretrainJob
from cluster.tracking import ensure_run_id

JOB_TYPES: dict[str, type] = {"pretrain": PretrainJob, "finetune": FinetuneJob}


@dataclass
class TrainResult:
    out_dir: Path
    checkpoint: Path
    metrics_csv: Path
    seconds: float
    new_tensors: list[str]


def init_ray(address: str | None = None) -> None:
    """Connect to `address` (or RAY_ADDRESS) when given; otherwise start a local Ray bound to loopback."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    # Workers print progress lines; Ray's own INFO chatter and dedup notices would bury them.
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if address:
        ray.init(address=address, logging_level="WARNING")
    else:
        ray.init(include_dashboard=False, logging_level="WARNING", _node_ip_address="127.0.0.1")


def run_training(job: PretrainJob | FinetuneJob, out_dir: Path, stage: str) -> TrainResult:
    """Run `job` with Ray Train; returns where its final checkpoint and metrics are."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from cluster.tasks import preflight

    preflight(job)  # user errors (missing data, wrong checkpoint) surface here, not inside a worker
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    if job.wandb.mode != "disabled":
        ensure_run_id(out_dir)
    init_ray(job.cluster.address)
    job_type = "pretrain" if isinstance(job, PretrainJob) else "finetune"
    config = {"job_type": job_type, "job": to_dict(job), "out_dir": str(out_dir), "stage": stage}
    trainer = TorchTrainer(
        train_worker,
        train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=job.cluster.num_workers, use_gpu=job.cluster.use_gpu,
                                     resources_per_worker={"CPU": job.cluster.cpus_per_worker}),
        run_config=RunConfig(name=stage, storage_path=str(out_dir / "ray"),
                             failure_config=FailureConfig(max_failures=job.cluster.max_failures)),
    )
    start = time.perf_counter()
    trainer.fit()
    seconds = time.perf_counter() - start
    summary = json.loads((out_dir / "train_summary.json").read_text())
    return TrainResult(out_dir, Path(summary["checkpoint"]), out_dir / "metrics.csv", seconds, summary["new_tensors"])


def train_worker(config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker (also callable in a plain process with world size 1)."""
    import lightning.pytorch as pl
    import ray.train
    from ray.train.lightning import RayLightningEnvironment, prepare_trainer

    from cluster.callbacks import KilnCheckpoint, ProgressPrinter, emit, quiet_worker_logs, set_threads
    from cluster.strategies import build_strategy
    from cluster.tasks import TASKS, data_paths
    from cluster.tracking import build_loggers

    job = build(JOB_TYPES[config["job_type"]], config["job"], source="job")
    out_dir, stage = Path(config["out_dir"]), config["stage"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    set_threads(job.cluster.cpus_per_worker)
    quiet_worker_logs()
    pl.seed_everything(job.trainer.seed, workers=True, verbose=False)
    parts = TASKS[job.task](job, rank, world)
    task_dir, tokenizer_file, _ = data_paths(job.data_dir, job.task)
    checkpoint = KilnCheckpoint(out_dir / "checkpoints", parts.model_config, tokenizer_file, to_dict(job),
                                Path(job.data_dir) / "manifest.json", job.trainer.checkpoint_every,
                                job.trainer.keep_last, parts.train_loader)
    trainer = pl.Trainer(
        max_steps=job.trainer.max_steps,
        accelerator="gpu" if job.cluster.use_gpu else "cpu",
        devices="auto",
        strategy=build_strategy(job.cluster, job.trainer.batch_size),
        plugins=[RayLightningEnvironment()],
        precision=job.trainer.precision,
        gradient_clip_val=job.optim.grad_clip or None,
        accumulate_grad_batches=job.trainer.accumulate_grad_batches,
        val_check_interval=job.trainer.val_every,
        check_val_every_n_epoch=None,
        limit_val_batches=job.trainer.limit_val_batches,
        log_every_n_steps=job.trainer.log_every,
        logger=build_loggers(job.wandb, out_dir, stage, to_dict(job)),
        callbacks=[ProgressPrinter(stage, job.trainer.log_every, parts.progress_keys), checkpoint],
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=str(out_dir),
    )
    trainer = prepare_trainer(trainer)
    if rank == 0 and parts.new_tensors:
        emit(f"[{stage}] initialised fresh: {len(parts.new_tensors)} tensors (e.g. {', '.join(parts.new_tensors[:3])})")
    trainer.fit(parts.module, train_dataloaders=parts.train_loader, val_dataloaders=parts.val_loader)
    if rank == 0:
        summary = {"checkpoint": str(checkpoint.last_saved), "new_tensors": parts.new_tensors,
                   "steps": trainer.global_step, "task": job.task}
        (out_dir / "train_summary.json").write_text(json.dumps(summary, indent=2))
