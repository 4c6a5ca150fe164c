"""Start or connect to Ray and run a training job on N Ray Train workers, each a Lightning Trainer.

The driver validates the job, then `TorchTrainer.fit()` runs `train_worker` on every worker; there the task
registry builds the LightningModule and this rank's loaders, and the strategy registry picks DDP or DeepSpeed.
Whether and from which checkpoint a run continues (trainer.resume, worker restarts) is cluster/resume.py's.
"""

from __future__ import annotations

import copy
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cluster.config import resolve_paths
from cluster.jobs import ClusterConfig, FinetuneJob, PretrainJob
from cluster.preemption import Preempted, clear_stop_request, stop_file, stop_on_sigterm
from cluster.progress import EventWriter, find_relay, follow_progress, progress_file, start_relay
from cluster.resume import (
    METRICS,
    check_resume,
    checkpoint_step,
    checkpoints_dir,
    publish_metrics,
    restore_metrics,
    resume_point,
    stash_metrics,
)
from cluster.rundir import SUMMARY, RunDir
from cluster.tracking import check_online_credentials, ensure_run_id
from data_pipeline.configlib import ConfigError, build, to_dict

JOB_TYPES: dict[str, type] = {"pretrain": PretrainJob, "finetune": FinetuneJob}
RAY_LOG = "ray.log"  # under <out>/logs/: Ray's own output and every worker's stdout/stderr


@dataclass
class TrainResult:
    out_dir: RunDir
    checkpoint: Path | str  # a URI when --out is one
    metrics_csv: Path  # on this machine (a remote run's: fetched into its working directory)
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


def run_training(job: PretrainJob | FinetuneJob, out_dir: Path | RunDir, stage: str) -> TrainResult:
    """Run `job` with Ray Train; returns where its final checkpoint and metrics are."""
    from ray.train import FailureConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from cluster.progress import emit
    from cluster.tasks import count_parameters

    run = out_dir if isinstance(out_dir, RunDir) else RunDir(out_dir)
    job = _publish_imported(driver_checks(job, run.local), run)
    check_disk(job, run, count_parameters(job))  # before any file is written
    run.local.mkdir(parents=True, exist_ok=True)
    clear_stop_request(run)
    # chosen (and sha256-verified) once, here, for every worker (cluster/resume.py)
    latest = check_resume(job, run, say=emit)
    if job.wandb.mode != "disabled":
        ensure_run_id(run)
    init_ray(job.cluster.address, run / "logs")
    check_gpus(job.cluster, connected=True)
    # launch: this invocation's id, written into every checkpoint it saves, so a worker group that Ray Train
    # restarts after a failure (cluster.max_failures) continues from this launch's newest one (resume_point).
    launch = uuid.uuid4().hex[:12]
    relay = start_relay(f"kiln-progress-{launch}") if run.remote else None
    config = {
        "job_type": "pretrain" if isinstance(job, PretrainJob) else "finetune",
        "job": to_dict(job),
        "out_dir": str(run.out),
        "stage": stage,
        "launch": launch,
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
        run_config=_run_config(run, stage, FailureConfig(max_failures=job.cluster.max_failures)),
    )
    start = time.perf_counter()
    # SIGTERM: every rank checkpoints at one step and stops (preemption); rank 0's progress on the console
    with (
        stop_on_sigterm(run, stage),
        follow_progress(run.local, job.trainer.log_every, relay=relay),
    ):
        fit_reporting_user_errors(trainer)
    seconds = time.perf_counter() - start
    summary = run.read_json(SUMMARY)
    run.fetch(METRICS)
    if summary.get("preempted"):
        raise Preempted(stage, summary["steps"], summary["checkpoint"])
    return TrainResult(
        run, _checkpoint_path(summary["checkpoint"]), run / METRICS, seconds, summary["new_tensors"]
    )


def driver_checks(job: PretrainJob | FinetuneJob, imported_into: Path) -> PretrainJob | FinetuneJob:
    """The checks of a run on the driver before it writes a file or starts Ray (`--dry-run` runs them
    too), so user errors (missing data, wrong checkpoint) surface here, not inside a worker. `hf:`
    checkpoints are converted into `imported_into`/imported/; the job returned points at the copies."""
    from cluster.tasks import preflight

    # load_config resolved the paths already; a job built in code gets it too: workers run elsewhere
    job = resolve_paths(copy.deepcopy(job))
    check_gpus(job.cluster)
    check_online_credentials(job.wandb.mode)
    return preflight(job, imported_into)


def check_disk(job: PretrainJob | FinetuneJob, run: RunDir, num_params: int) -> None:
    """The disk under the run's checkpoints holds `trainer.keep_last` + 1 of them (ZeRO's are larger)."""
    from pretrain.checkpoint import (
        CHECKPOINT_BYTES_PER_PARAM,
        ZERO_CHECKPOINT_BYTES_PER_PARAM,
        check_free_space,
    )

    ddp = job.cluster.strategy == "ddp"
    per_param = CHECKPOINT_BYTES_PER_PARAM if ddp else ZERO_CHECKPOINT_BYTES_PER_PARAM
    check_free_space(checkpoints_dir(run), num_params, job.trainer.keep_last, per_param)


def _publish_imported(job: PretrainJob | FinetuneJob, run: RunDir) -> PretrainJob | FinetuneJob:
    """`hf:` checkpoints that preflight converted into this machine's working directory go to a
    remote run's `--out` (imported/...), where every worker's node can fetch them."""
    import dataclasses

    from pretrain.checkpoint import publish_checkpoint

    if not run.remote:
        return job
    changes = {}
    for key in ("init_from", "encoder_checkpoint", "decoder_checkpoint"):
        value = getattr(job, key, None)
        if value and Path(value).is_relative_to(run.local):
            rel = Path(value).relative_to(run.local).as_posix()
            publish_checkpoint(Path(value), run.location(rel))
            changes[key] = run.location(rel).text
    return dataclasses.replace(job, **changes) if changes else job


def _checkpoint_path(text: str) -> Path | str:
    return text if "://" in text else Path(text)


def _run_config(run: RunDir, stage: str, failure: Any) -> Any:
    """Ray Train's own state (its controller's) goes under `<out>/ray`, on the run's storage."""
    from ray.train import RunConfig

    if not run.remote:
        return RunConfig(name=stage, storage_path=str(run / "ray"), failure_config=failure)
    from data_pipeline.storage import resolve

    fs, path = resolve(run.location("ray").text)
    return RunConfig(name=stage, storage_path=path, storage_filesystem=fs, failure_config=failure)


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
        quiet_worker_logs,
        set_threads,
    )
    from cluster.progress import emit, send_lines_to
    from cluster.tasks import TASKS, data_paths
    from cluster.tracking import finish_run
    from pretrain.flops import peak_flops

    job = build(JOB_TYPES[config["job_type"]], config["job"], source="job")
    stage, launch = config["stage"], config.get("launch", "")
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    # this process's view of the run: --out itself, or (a URI) a scratch directory of its own
    run = RunDir(config["out_dir"], role=f"rank-{rank}")
    if run.remote:
        run.fresh_scratch()
    set_threads(job.cluster.cpus_per_worker)
    quiet_worker_logs()
    events = _progress_events(run, launch) if rank == 0 else None
    # rank 0's lines (emit) reach the user's console through the driver (cluster.progress)
    send_lines_to(events)
    peak, peak_source = peak_flops(
        job.trainer.peak_flops, _worker_device(job.cluster.use_gpu), job.trainer.precision
    )
    pl.seed_everything(job.trainer.seed, workers=True, verbose=False)
    parts = TASKS[job.task](job, rank, world)
    parts.module.peak_flops = peak
    parts.module.max_nonfinite_steps = job.trainer.max_nonfinite_steps
    parts.module.compile_model = job.trainer.compile
    task_dir, tokenizer_file, _ = data_paths(job.data_dir, job.task)
    checkpoint = KilnCheckpoint(
        checkpoints_dir(run),
        parts.model_config,
        tokenizer_file,
        to_dict(job),
        _data_manifest(job.data_dir),
        job.trainer.checkpoint_every,
        job.trainer.keep_last,
        parts.train_loader,
        parts.val_loader,
        run=run,
        launch=launch,
    )
    # A restarted worker group continues from this launch's own newest checkpoint; else the driver's choice.
    found = resume_point(run, config.get("resume_from"), launch, say=emit)
    resume_from = None if found is None else found[1]  # a local directory
    checkpoint.last_saved = (
        None if found is None else found[0]
    )  # the answer if already at max_steps
    stopper = StopOnRequest(stop_file(run), checkpoint)
    # LogLastStep: metrics.csv always ends with the last step's row, even in a run shorter than log_every
    trainer = _build_trainer(
        job,
        run,
        stage,
        parts,
        [checkpoint, stopper, LogLastStep()],
        resume=resume_from is not None,
        events=events,
    )
    if rank == 0:
        emit(f"[{stage}] MFU against {peak / 1e9:.4g} GFLOP/s per worker, {peak_source}")
        if parts.new_tensors:
            emit(
                f"[{stage}] initialised fresh: {len(parts.new_tensors)} tensors "
                f"(e.g. {', '.join(parts.new_tensors[:3])})"
            )
        if resume_from is not None:
            emit(f"[{stage}] resuming from {found[0]}")
            run.fetch(METRICS)  # a remote run's rows so far (cluster.resume.publish_metrics)
            stash_metrics(run, checkpoint_step(resume_from))
    trainer.fit(
        parts.module,
        train_dataloaders=parts.train_loader,
        val_dataloaders=parts.val_loader,
        ckpt_path=str(resume_from) if resume_from is not None else None,
    )
    finish_run()  # rank 0's W&B run, complete before Ray ends this process (cluster.tracking)
    if rank == 0:
        resumed = None if found is None else found[0]
        _finish(run, job, trainer, checkpoint, stopper, parts.new_tensors, resumed, events)


def _progress_events(run: RunDir, launch: str) -> EventWriter:
    """Rank 0's progress events: appended to <out>/logs/progress.jsonl and, when the driver shares
    no directory with this worker (a remote --out), sent to its relay actor as well."""
    relay = find_relay(f"kiln-progress-{launch}") if run.remote else None
    return EventWriter(progress_file(run.local), relay=relay)


def _data_manifest(data_dir: str) -> Path:
    """The data manifest a checkpoint records (its sha256): a local file (a remote one's cached copy)."""
    from data_pipeline.shards import data_view

    return data_view(data_dir) / "manifest.json"


def _finish(
    run: RunDir,
    job: PretrainJob | FinetuneJob,
    trainer: Any,
    checkpoint: Any,
    stopper: Any,
    new_tensors: list[str],
    resume_from: Path | str | None,
    events: EventWriter | None,
) -> None:
    """Rank 0, after fit: the whole metrics history, the run's files to its --out, then the summary
    (last: the driver reads it once fit() has returned on every rank)."""
    restore_metrics(run)
    publish_metrics(run)
    run.publish("wandb", "logs/progress.jsonl")
    summary = {
        "checkpoint": str(checkpoint.last_saved),
        "new_tensors": new_tensors,
        "steps": trainer.global_step,
        "task": job.task,
        "resumed_from": None if resume_from is None else str(resume_from),
        "preempted": stopper.stopped_at is not None,
        "stopped_at_per_rank": stopper.stopped_at,
    }
    run.write_json(SUMMARY, summary)
    if events is not None:
        events.flush()


def _build_trainer(
    job: PretrainJob | FinetuneJob,
    out_dir: Path | RunDir,
    stage: str,
    parts: Any,
    callbacks: list[Any],
    resume: bool,
    events: EventWriter | None = None,
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
            ProgressPrinter(
                stage, job.trainer.log_every, progress_keys, events or progress_file(Path(out_dir))
            ),
            *callbacks,
        ],
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=os.fspath(out_dir),
    )
    return prepare_trainer(trainer)


def _worker_device(use_gpu: bool) -> Any:
    import torch

    if not use_gpu:
        return torch.device("cpu")
    import ray.train.torch

    return ray.train.torch.get_device()
