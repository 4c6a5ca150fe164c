"""Start or connect to Ray and run a training job on N Ray Train workers, each a Lightning Trainer.

The driver validates the job, then `TorchTrainer.fit()` runs `train_worker` on every worker; there the task
registry builds the LightningModule and this rank's loaders, and the strategy registry picks DDP or DeepSpeed.
Whether and from which checkpoint a run continues (trainer.resume, worker restarts) is cluster/resume.py's.
"""

from __future__ import annotations

import copy
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cluster.config import resolve_paths
from cluster.jobs import ClusterConfig, FinetuneJob, PretrainJob
from cluster.preemption import Preempted, clear_stop_request, stop_file, stop_on_sigterm
from cluster.progress import follow_progress, progress_file
from cluster.resume import (
    check_resume,
    checkpoint_step,
    checkpoints_dir,
    restore_metrics,
    resume_point,
    stash_metrics,
)
from cluster.tracking import check_online_credentials, ensure_run_id
from data_pipeline.configlib import ConfigError, build, to_dict

JOB_TYPES: dict[str, type] = {"pretrain": PretrainJob, "finetune": FinetuneJob}
RAY_LOG = "ray.log"  # under <out>/logs/: Ray's own output and every worker's stdout/stderr


@dataclass
class TrainResult:
    out_dir: Path
    checkpoint: Path
    metrics_csv: Path
    seconds: float
    new_tensors: list[str]


def init_ray(address: str | None = None, log_dir: Path | None = None) -> None:
    """Connect to `address` (or RAY_ADDRESS) when given; otherwise start a local Ray bound to loopback. Ray's own
    output goes to `log_dir`/ray.log from now on (data_pipeline.raystart; `kiln --verbose` shows it too)."""
    from data_pipeline.raystart import init_ray as start
    from data_pipeline.raystart import log_to

    if log_dir is not None:
        log_to(Path(log_dir) / RAY_LOG)
    # --verbose shows every worker line as Ray forwards it, without its "[repeated Nx]" merging.
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # Ray Train's PreemptionWatcher (node drains; an actor whose constructor arguments Ray keeps in the object
    # store, which its core worker reports as an error line) does nothing Kiln uses: Kiln's preemption is the
    # STOP file (cluster/preemption.py). Ray Train passes this variable on from the driver to its controller.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    start(address)


def run_training(job: PretrainJob | FinetuneJob, out_dir: Path, stage: str) -> TrainResult:
    """Run `job` with Ray Train; returns where its final checkpoint and metrics are."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from cluster.callbacks import emit
    from cluster.tasks import count_parameters, preflight
    from pretrain.checkpoint import (
        CHECKPOINT_BYTES_PER_PARAM,
        ZERO_CHECKPOINT_BYTES_PER_PARAM,
        check_free_space,
    )

    out_dir = Path(out_dir).resolve()
    # load_config resolved the paths already; a job built in code gets it too: workers run elsewhere
    job = resolve_paths(copy.deepcopy(job))
    check_gpus(job.cluster)
    # User errors (missing data, wrong checkpoint) surface here, not inside a worker; `hf:` checkpoints are
    # converted into out_dir/imported/ and the job returned points at the converted copies.
    job = preflight(job, out_dir)
    # before any file is written
    ddp = job.cluster.strategy == "ddp"
    per_param = CHECKPOINT_BYTES_PER_PARAM if ddp else ZERO_CHECKPOINT_BYTES_PER_PARAM
    check_free_space(
        checkpoints_dir(out_dir), count_parameters(job), job.trainer.keep_last, per_param
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    clear_stop_request(out_dir)
    # chosen (and sha256-verified) once, here, for every worker (cluster/resume.py)
    latest = check_resume(job, out_dir, say=emit)
    if job.wandb.mode != "disabled":
        check_online_credentials(job.wandb.mode)
        ensure_run_id(out_dir)
    init_ray(job.cluster.address, out_dir / "logs")
    check_gpus(job.cluster, connected=True)
    job_type = "pretrain" if isinstance(job, PretrainJob) else "finetune"
    # started_ns: checkpoints written after it belong to this run, so a worker group Ray Train restarts
    # after a failure (cluster.max_failures) continues from them instead of starting over (resume_point).
    config = {
        "job_type": job_type,
        "job": to_dict(job),
        "out_dir": str(out_dir),
        "stage": stage,
        "started_ns": time.time_ns(),
        "resume_from": None if latest is None else str(latest),
    }
    trainer = TorchTrainer(
        train_worker,
        train_loop_config=config,
        torch_config=TorchConfig(timeout_s=job.cluster.collective_timeout_s),
        scaling_config=ScalingConfig(
            num_workers=job.cluster.num_workers,
            use_gpu=job.cluster.use_gpu,
            resources_per_worker={"CPU": job.cluster.cpus_per_worker},
        ),
        run_config=RunConfig(
            name=stage,
            storage_path=str(out_dir / "ray"),
            failure_config=FailureConfig(max_failures=job.cluster.max_failures),
        ),
    )
    start = time.perf_counter()
    # SIGTERM: every rank checkpoints at one step and stops (preemption); rank 0's progress on the console
    with stop_on_sigterm(out_dir, stage), follow_progress(out_dir, job.trainer.log_every):
        fit_reporting_user_errors(trainer)
    seconds = time.perf_counter() - start
    summary = json.loads((out_dir / "train_summary.json").read_text())
    if summary.get("preempted"):
        raise Preempted(stage, summary["steps"], Path(summary["checkpoint"]))
    return TrainResult(
        out_dir,
        Path(summary["checkpoint"]),
        out_dir / "metrics.csv",
        seconds,
        summary["new_tensors"],
    )


def check_gpus(cluster: ClusterConfig, connected: bool = False) -> None:
    """cluster.use_gpu asks Ray for a GPU per worker; where there is none, Ray waits forever. Refuse
    at once: before a local Ray starts when this machine has too few, or once connected when the
    cluster offers none (a remote cluster with some may be scaling up to the rest)."""
    if not cluster.use_gpu:
        return
    import ray

    remote = bool(cluster.address or os.environ.get("RAY_ADDRESS"))
    if not connected:
        if remote or ray.is_initialized():
            return  # not a local start: checked once connected
        import torch

        have, where = torch.cuda.device_count(), "this machine has"
    else:
        have, where = int(ray.cluster_resources().get("GPU", 0)), "the Ray cluster offers"
        if remote and have:
            return
    need = cluster.num_workers
    if have < need:
        raise ConfigError(
            f"cluster.use_gpu=true needs {need} GPU(s), one per worker "
            f"(cluster.num_workers={need}), but {where} {have}; "
            "set cluster.use_gpu=false"
        )


def fit_reporting_user_errors(trainer: Any) -> None:
    """`trainer.fit()`; a config, data or checkpoint error raised on a worker is re-raised here as
    itself, so the CLI reports it as a driver's (one line, exit 2), not as Ray Train's wrapper."""
    try:
        trainer.fit()
    except Exception as err:
        found = worker_user_error(err)
        if found is None:
            raise
        raise found from err


def worker_user_error(err: BaseException) -> BaseException | None:
    """The user error (cluster.rundir.user_error_types) inside what Ray Train raised, lowest rank
    first. Ray Train v2 raises WorkerGroupError(worker_failures={rank: error}) or
    ControllerError(controller_failure), v1 a TrainingFailedError whose __cause__ is the worker's
    error; a RayTaskError (subclass of its cause's type, str a traceback) stands for `.cause`."""
    from cluster.rundir import user_error_types

    types, seen, queue = user_error_types(), set(), [err]
    while queue:
        current = queue.pop(0)
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        inner = getattr(current, "cause", None)  # RayTaskError
        if isinstance(inner, BaseException):
            queue.insert(0, inner)
            continue
        if isinstance(current, types):
            return current
        failures = getattr(current, "worker_failures", None) or {}
        queue += [failures[rank] for rank in sorted(failures)]
        queue += [getattr(current, name, None) for name in ("controller_failure", "_base_exc")]
        queue += [current.__cause__, current.__context__]
    return None


def train_worker(config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker (also callable in a plain process with world size 1)."""
    import lightning.pytorch as pl
    import ray.train

    from cluster.callbacks import (
        KilnCheckpoint,
        LogLastStep,
        StopOnRequest,
        emit,
        quiet_worker_logs,
        send_lines_to,
        set_threads,
    )
    from cluster.tasks import TASKS, data_paths
    from cluster.tracking import finish_run
    from pretrain.flops import peak_flops

    job = build(JOB_TYPES[config["job_type"]], config["job"], source="job")
    out_dir, stage = Path(config["out_dir"]), config["stage"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    set_threads(job.cluster.cpus_per_worker)
    quiet_worker_logs()
    if (
        rank == 0
    ):  # rank 0's lines (emit) reach the user's console through the driver (cluster.progress)
        send_lines_to(progress_file(out_dir))
    peak, peak_source = peak_flops(
        job.trainer.peak_flops, _worker_device(job.cluster.use_gpu), job.trainer.precision
    )
    pl.seed_everything(job.trainer.seed, workers=True, verbose=False)
    parts = TASKS[job.task](job, rank, world)
    parts.module.peak_flops = peak
    parts.module.max_nonfinite_steps = job.trainer.max_nonfinite_steps
    task_dir, tokenizer_file, _ = data_paths(job.data_dir, job.task)
    checkpoint = KilnCheckpoint(
        checkpoints_dir(out_dir),
        parts.model_config,
        tokenizer_file,
        to_dict(job),
        Path(job.data_dir) / "manifest.json",
        job.trainer.checkpoint_every,
        job.trainer.keep_last,
        parts.train_loader,
        parts.val_loader,
    )
    # A restarted worker group continues from this run's own newest checkpoint; else the driver's choice.
    resume_from = resume_point(
        out_dir, config.get("resume_from"), config.get("started_ns", 0), say=emit
    )
    checkpoint.last_saved = resume_from  # stays the answer if it is already at max_steps
    stopper = StopOnRequest(stop_file(out_dir), checkpoint)
    # LogLastStep: metrics.csv always ends with the last step's row, even in a run shorter than log_every
    trainer = _build_trainer(
        job,
        out_dir,
        stage,
        parts,
        [checkpoint, stopper, LogLastStep()],
        resume=resume_from is not None,
    )
    if rank == 0:
        emit(f"[{stage}] MFU against {peak / 1e9:.4g} GFLOP/s per worker, {peak_source}")
        if parts.new_tensors:
            emit(
                f"[{stage}] initialised fresh: {len(parts.new_tensors)} tensors "
                f"(e.g. {', '.join(parts.new_tensors[:3])})"
            )
        if resume_from is not None:
            emit(f"[{stage}] resuming from {resume_from}")
            stash_metrics(out_dir, checkpoint_step(resume_from))
    trainer.fit(
        parts.module,
        train_dataloaders=parts.train_loader,
        val_dataloaders=parts.val_loader,
        ckpt_path=str(resume_from) if resume_from is not None else None,
    )
    finish_run()  # rank 0's W&B run, complete before Ray ends this process (cluster.tracking)
    if rank == 0:
        restore_metrics(out_dir)
        summary = {
            "checkpoint": str(checkpoint.last_saved),
            "new_tensors": parts.new_tensors,
            "steps": trainer.global_step,
            "task": job.task,
            "resumed_from": None if resume_from is None else str(resume_from),
            "preempted": stopper.stopped_at is not None,
            "stopped_at_per_rank": stopper.stopped_at,
        }
        (out_dir / "train_summary.json").write_text(json.dumps(summary, indent=2))


def _build_trainer(
    job: PretrainJob | FinetuneJob,
    out_dir: Path,
    stage: str,
    parts: Any,
    callbacks: list[Any],
    resume: bool,
) -> Any:
    import lightning.pytorch as pl
    from ray.train.lightning import RayLightningEnvironment, prepare_trainer

    from cluster.callbacks import KilnCheckpointIO, ProgressPrinter
    from cluster.strategies import build_strategy
    from cluster.tracking import build_loggers

    # KilnCheckpointIO only reads: it lets fit(ckpt_path=<Kiln checkpoint directory>) restore (cluster.callbacks).
    plugins = [RayLightningEnvironment(), *([KilnCheckpointIO()] if resume else [])]
    progress_keys = (*parts.progress_keys, "train/mfu")
    trainer = pl.Trainer(
        max_steps=job.trainer.max_steps,
        accelerator="gpu" if job.cluster.use_gpu else "cpu",
        devices="auto",
        strategy=build_strategy(job.cluster, job.trainer.batch_size),
        plugins=plugins,
        precision=job.trainer.precision,
        gradient_clip_val=job.optim.grad_clip or None,
        accumulate_grad_batches=job.trainer.accumulate_grad_batches,
        val_check_interval=job.trainer.val_every,
        check_val_every_n_epoch=None,
        limit_val_batches=job.trainer.limit_val_batches,
        log_every_n_steps=job.trainer.log_every,
        logger=build_loggers(job.wandb, out_dir, stage, to_dict(job)),
        callbacks=[
            ProgressPrinter(stage, job.trainer.log_every, progress_keys, progress_file(out_dir)),
            *callbacks,
        ],
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=str(out_dir),
    )
    return prepare_trainer(trainer)


def _worker_device(use_gpu: bool) -> Any:
    import torch

    if not use_gpu:
        return torch.device("cpu")
    import ray.train.torch

    return ray.train.torch.get_device()
