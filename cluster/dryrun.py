"""`kiln pretrain|finetune --dry-run`: the run's plan, checked as the run checks it, and nothing started.

The checks are the real run's own driver checks (cluster.launch.driver_checks, check_disk), its
refusal of a non-empty --out that it would not continue (cluster.rundir.check_run_dir), and its
resume check (cluster.resume.check_resume: with trainer.resume=auto, the checkpoint a run directory's
run would continue from, sha256s checked, or the refusal the run would stop with); the model is
counted on the meta device (cluster.tasks.count_parameters). Nothing is written or removed at --out,
not even the directory, nor the interrupted saves (`.tmp-*`) the real run cleans up: `hf:`
checkpoints are converted into a temporary directory, removed on return (a remote run's checkpoint
is fetched into the local cache, as the run's driver fetches it). No Ray starts and no Lightning is
imported, so a long recipe is validated against its data in seconds.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from cluster.jobs import FinetuneJob, PretrainJob
from cluster.launch import check_disk, driver_checks
from cluster.resume import check_resume, checkpoint_step, continues_run
from cluster.rundir import RERUN_TRAINING, RunDir, check_run_dir
from cluster.tasks import count_parameters
from data_pipeline.loader import read_manifest
from data_pipeline.storage import Location


def dry_run(job: PretrainJob | FinetuneJob, out: str | Path, stage: str) -> list[str]:
    """The lines `--dry-run` prints for `job` (stage: "pretrain" or "finetune"), once its checks pass."""
    run = RunDir(out)  # names the directory; creates nothing
    if not continues_run(run, job.trainer.resume):
        check_run_dir(
            run.out, rerun=RERUN_TRAINING
        )  # the refusal of a non-empty --out the run would stop with
    with tempfile.TemporaryDirectory(prefix="kiln-dry-run-") as scratch:
        job = driver_checks(job, Path(scratch))
        params = count_parameters(job)  # inside: a converted `hf:` checkpoint's weights are read
        check_disk(job, run, params)
        # the run's own choice and refusals; clean=False: its interrupted saves stay where they are
        latest = check_resume(job, run, clean=False)
    return plan_lines(job, run, stage, params, latest)


def plan_lines(
    job: PretrainJob | FinetuneJob, run: RunDir, stage: str, params: int, latest: Path | str | None
) -> list[str]:
    trainer, cluster = job.trainer, job.cluster
    world, accumulate = cluster.num_workers, trainer.accumulate_grad_batches
    global_batch = trainer.batch_size * world * accumulate
    rows = train_rows(job)
    gpu = " + 1 GPU" if cluster.use_gpu else ""
    return [
        f"[dry run] {stage} {job.task}: {model_name(job)}, {params:,} parameters",
        f"[dry run] max_steps {trainer.max_steps}, global batch {global_batch} = batch_size "
        f"{trainer.batch_size} x {world} workers x accumulate_grad_batches {accumulate}",
        f"[dry run] train split {rows:,} rows: {trainer.max_steps} steps x {global_batch} = "
        f"{trainer.max_steps * global_batch / rows:.2f} passes over it",
        f"[dry run] {world} workers x {cluster.cpus_per_worker} CPUs{gpu}, strategy {cluster.strategy}",
        resume_line(job, run, latest),
        f"[dry run] out {run.out} (not created); checks passed, nothing run",
    ]


def resume_line(job: PretrainJob | FinetuneJob, run: RunDir, latest: Path | str | None) -> str:
    """Where the run would start: fresh, or the checkpoint `check_resume` chose and its step."""
    mode = job.trainer.resume
    if latest is not None:
        return (
            f"[dry run] resume: would continue from {latest} at step {checkpoint_step(latest)} "
            f"(trainer.resume={mode})"
        )
    if mode != "auto":
        return f"[dry run] resume: fresh start (trainer.resume={mode})"
    return f"[dry run] resume: fresh start (no checkpoint in {run.checkpoints})"


def model_name(job: PretrainJob | FinetuneJob) -> str:
    """arch and preset of a model section, or the checkpoints a warm start loads."""
    model = job.model
    if model is not None:
        return f"{model.arch} (preset {model.preset})" if model.preset else model.arch
    keys = ("init_from", "encoder_checkpoint", "decoder_checkpoint")
    loaded = [f"{k}={getattr(job, k)}" for k in keys if getattr(job, k, None)]
    return "warm start from " + ", ".join(loaded)


def train_rows(job: PretrainJob | FinetuneJob) -> int:
    """Rows of the task's train split, from its manifest (a remote one read where it lies)."""
    manifest = Location.of(job.data_dir) / job.task / "manifest.json"
    return int(read_manifest(manifest.text)["splits"]["train"]["rows"])
