"""Resume: how a Kiln run continues from its own checkpoints, top to bottom.

A run directory (`--out`, a local path or a URI: cluster.rundir.RunDir) keeps its checkpoints in
`checkpoints/step-NNNNNNN/`, in the format that `pretrain/checkpoint.py` owns: saving, the manifest,
sha256 verification, loading, listing and pruning (on a local disk or an object store, where a
checkpoint's manifest.json is uploaded after its files, so no manifest means no checkpoint), and
the RNG capture it stores (what readers such as `kiln evaluate` and `kiln export` use too). This
module decides whether, and from which of them, a run continues, and hands that checkpoint to
Lightning. In the order a resumed run (`trainer.resume=auto`) meets them:

1. The run directory (driver, `cluster.rundir.run_dir`). A directory an earlier Kiln run made is
   continued instead of refused (`continues_run`). A run that then stops on bad input keeps a
   directory holding a checkpoint, so that it can still be continued (`has_checkpoint`).
2. Which checkpoint, and whether it can be continued exactly (driver, `check_resume`, once, before
   any worker starts; `--dry-run` makes the same check, removing nothing). Saves a killed run left
   half-written (`.tmp-*`) are removed.
   `resume_checkpoint` picks the newest complete checkpoint whose files match their sha256s: a
   corrupted newer one is skipped with a warning, and none intact is an error (starting over
   silently would discard the run). The choice is refused, with the reason, across DDP and ZeRO
   (they save the optimizer state in different forms; any ZeRO stage resumes any ZeRO stage's), for
   a ZeRO checkpoint without optimizer state (an older Kiln's), another task or model (the keys
   that changed are named), other data (the data manifest's sha256) and a changed setting of
   `KEPT_ON_RESUME` (optim.pretrained_lr_ratio, nsp_weight, classifier_pooling). It reaches every worker in
   the train loop config, so all ranks resume from one checkpoint.
3. Worker loss (every worker, `resume_point`). When Ray Train restarts a failed worker group
   (`cluster.max_failures`), the newest intact checkpoint written by this launch (`retry_checkpoint`:
   its manifest names this invocation's `launch` id; no clocks of different machines are compared)
   wins over the driver's choice: the new group continues where the lost one stopped, under every
   strategy, on whichever nodes it now runs. A remote checkpoint is fetched into each worker's cache
   and verified there (`fetch_checkpoint`).
4. The metrics history (rank 0, `stash_metrics` before `fit`, `restore_metrics` after every run).
   Lightning's CSV logger replaces metrics.csv when it starts, so the rows logged before the
   checkpoint's step are kept aside and put back in front; the rows after it are logged again. A
   remote run's metrics.csv is uploaded with every checkpoint (`publish_metrics`) and fetched by the
   rank 0 that resumes, wherever it runs.
5. Trainer state (every rank, inside `trainer.fit(ckpt_path=<checkpoint directory>)`).
   `KilnCheckpointIO`, a Lightning plugin in `cluster/callbacks.py`, returns
   `lightning_checkpoint(path)`: the checkpoint, verified again, with its `trainer_state` recast as
   the dict Lightning restores from its own checkpoints. Lightning then restores the weights, the
   optimizer, the scheduler, its loop progress and the train loader's position (the loader has
   `state_dict`/`load_state_dict`), exactly as from its own files. Setting the loop counters by hand
   would copy Lightning's restart bookkeeping (mid-epoch vs epoch end, fetcher offsets) and break
   with it; writing a Lightning-format file as well would store the weights twice. What Lightning
   does not restore, `KilnCheckpoint` (`cluster/callbacks.py`) takes from that dict (`rank_state`;
   on another worker count new rank r takes old rank r's) and puts back at `on_train_start`, the
   last hook before the first resumed batch (`restore_rank_state`): this rank's RNG, so dropout
   continues its stream, and the validation loader, whose pass count seeds validation's masks.
   Under DeepSpeed ZeRO, Lightning restores after the engine is built and leaves the weights and the
   optimizer to the strategy: `CPUCapableDeepSpeedStrategy` (`cluster/strategies.py`) reads the
   directory through `KilnCheckpointIO` too (not as DeepSpeed's format), loads the weights (ZeRO-3:
   one module gathered at a time) and puts the consolidated optimizer state back into this rank's
   partitions (`restore_zero_optimizer_state`), before the first resumed step.

A checkpoint is resumable through what `KilnCheckpoint` writes into its `trainer_state` at every
save: `step`, `epoch`, `loader`, `val_loader` and the `RESUME_KEYS` below (`optimizer`,
`scheduler`, `lightning` loop progress, `rng_per_rank`). `optimizer` is torch's state_dict under
DDP; under ZeRO it is consolidated (`cluster.strategies.zero_optimizer_state`: per parameter name
the full fp32 master weight and Adam moments, per param group its hyper-parameters and step), so
any ZeRO stage and any worker count can restore it.

Every function takes the directory it works on (a run directory, or its checkpoints directory) and
returns plain values; the lines it has for the user go to the `say` it is given.
"""

from __future__ import annotations

import csv
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cluster.rundir import CHECKPOINTS, MARKER, RunDir
from data_pipeline.configlib import ConfigError, to_dict
from data_pipeline.storage import Location
from pretrain.checkpoint import (
    MODEL_FILE,
    CheckpointError,
    clean_partial_saves,
    fetch_checkpoint,
    load_trainer_state,
    load_weights,
    newest_valid_checkpoint,
    read_manifest,
    restore_rng_state,
    verify_checkpoint,
)

if TYPE_CHECKING:
    from cluster.jobs import FinetuneJob, PretrainJob

# Where a line for the user goes: print, or in a training worker cluster.progress.emit.
Say = Callable[[str], None]
METRICS = "metrics.csv"
STASHED_METRICS = ".metrics-before-resume.csv"
RESUME_KEYS = ("optimizer", "scheduler", "lightning", "rng_per_rank")  # needed in trainer_state


def checkpoints_dir(run: Path | RunDir) -> Path:
    """The checkpoints directory this process writes in (a remote run's: its scratch copy)."""
    return Path(run) / CHECKPOINTS


def _out(run: Path | RunDir) -> Location:
    return run.out if isinstance(run, RunDir) else Location.of(run)


def _checkpoint_root(run: Path | RunDir) -> Path | Location:
    """Where the run's checkpoints live: a local directory, or a prefix of a remote `--out`."""
    return run.checkpoints if isinstance(run, RunDir) and run.remote else checkpoints_dir(run)


# ---------------------------------------------------------------- 1. the run directory
def continues_run(run: Path | RunDir, mode: str) -> bool:
    """With trainer.resume=auto, a directory an earlier Kiln run made is continued, not refused."""
    return mode == "auto" and (_out(run) / MARKER).is_file()


def has_checkpoint(run: Path | RunDir) -> bool:
    """Whether `run` holds a checkpoint a later run could continue from, so it must be kept."""
    return any(not name.startswith(".") for name in (_out(run) / CHECKPOINTS).list())


# ---------------------------------------------------------------- 2. which checkpoint (driver)
def resume_checkpoint(root: Path | Location, mode: str, say: Say = print) -> Path | str | None:
    """The checkpoint a run resumes from: with mode "auto" the newest complete one under `root` (a
    checkpoints directory, local or remote) whose sha256s check out, else None. Interrupted saves
    (`.tmp-*`, or without a valid manifest: an upload cut short) are never picked; a corrupted one
    is skipped, with a warning, for the one before it."""
    return newest_valid_checkpoint(root, warn=say) if mode == "auto" else None


def check_resume(
    job: PretrainJob | FinetuneJob, run: Path | RunDir, say: Say = print, *, clean: bool = True
) -> Path | str | None:
    """Driver side, before any worker starts: the checkpoint of the run directory `run` that `job`
    continues from (None: a fresh start; a URI on a remote run), refused with the reason when it
    cannot be continued exactly. clean=False (`--dry-run`): the same choice and refusals, but the
    interrupted saves stay where they are (they are never chosen either way)."""
    root = _checkpoint_root(run)
    if clean and job.trainer.resume == "auto" and isinstance(root, Path):
        for leftover in clean_partial_saves(root):
            say(
                f"[resume] removed {leftover.name}, a save that was interrupted before it completed"
            )
    latest = resume_checkpoint(root, job.trainer.resume, say)
    if latest is not None:
        _check_exact(job, latest)
    return latest


def _check_exact(job: PretrainJob | FinetuneJob, latest: Path | str) -> None:
    """ConfigError unless `job` can continue `latest` exactly: its optimizer state, same task, model
    and data."""
    manifest, now = read_manifest(latest), to_dict(job)
    _check_optimizer_state(job, latest, manifest)
    saved = manifest.get("job_config") or {}
    for section in ("task", "model"):
        if section in saved and section in now and saved[section] != now[section]:
            diff = _diff(saved[section], now[section])
            raise ConfigError(
                f"trainer.resume=auto: {latest} was trained with a different "
                f"'{section}' ({diff}); resume with the run's own config, or start a "
                "new --out"
            )
    _check_kept_settings(latest, saved, now)
    data_sha = (manifest.get("data_manifest") or {}).get("sha256")
    if data_sha and data_sha != (Location.of(job.data_dir) / "manifest.json").sha256():
        raise ConfigError(
            f"trainer.resume=auto: {latest} was trained on other data than "
            f"{job.data_dir} (its manifest.json differs); resume on the same "
            "data_dir, or start a new --out"
        )


# Settings a resumed run must keep, beyond task, model and data: dotted key -> (the value of a job without the key:
# its default, what a checkpoint saved before the key existed was trained with; why).
KEPT_ON_RESUME: dict[str, tuple[float | str, str]] = {
    # the groups' learning rates come back from the checkpoint: another ratio would not load (0 or 1 changes the
    # groups) or silently not apply
    "optim.pretrained_lr_ratio": (
        1.0,
        "the optimizer state it restores fixes each group's learning rate",
    ),
    # a changed objective is continued pretraining (init_from, a new --out), not a resume
    "nsp_weight": (
        1.0,
        "it weights NSP in the loss, so the run would change its objective (and train/loss its meaning) midway",
    ),
    # a BERT classifier's head reads [CLS] or the tokens' mean: its weights were trained on one of them
    "classifier_pooling": (
        "cls",
        "the classifier head was trained on what it reads, and the pooler trains only with cls",
    ),
}


def _check_kept_settings(latest: Path | str, saved: dict, now: dict) -> None:
    for key, (default, why) in KEPT_ON_RESUME.items():
        before, after = _setting(saved, key, default), _setting(now, key, default)
        if before != after:
            raise ConfigError(
                f"trainer.resume=auto: {latest} was trained with {key}={_shown(before)}, not {_shown(after)}: "
                f"{why}; resume with the run's own value, or start a new --out"
            )


def _setting(config: dict, key: str, default: float | str) -> float | str:
    """A dotted key's value in a job config dict; `default` where it has none (a job without the key, an older
    Kiln)."""
    section, _, name = key.rpartition(".")
    return ((config.get(section) or {}) if section else config).get(name, default)


def _shown(value: float | str) -> str:
    return f"{value:g}" if isinstance(value, (int, float)) else str(value)


def _check_optimizer_state(
    job: PretrainJob | FinetuneJob, latest: Path | str, manifest: dict
) -> None:
    """DDP saves torch's optimizer state_dict, ZeRO the consolidated state (any stage, any worker
    count restores it); one family's cannot be restored into the other's optimizer."""
    saved = ((manifest.get("job_config") or {}).get("cluster") or {}).get("strategy")
    if saved is None:
        return
    if (saved == "ddp") != (job.cluster.strategy == "ddp"):
        resumable_with = "ddp" if saved == "ddp" else "any deepspeed_stage_N"
        raise ConfigError(
            f"trainer.resume=auto: {latest} was saved with cluster.strategy={saved} "
            f"and cannot be resumed with cluster.strategy={job.cluster.strategy}: "
            "DDP and DeepSpeed ZeRO save the optimizer state in different forms "
            f"(resume with {resumable_with}, or start a new --out)"
        )
    state = load_trainer_state(latest, mmap=True) if saved != "ddp" else {"optimizer": True}
    if "optimizer" not in (state or {}):
        raise ConfigError(
            f"trainer.resume=auto: {latest} holds no optimizer state (a ZeRO run "
            "saved by an older Kiln); it cannot be continued exactly, start a new "
            "--out"
        )


def _diff(saved: Any, now: Any) -> str:
    if isinstance(saved, dict) and isinstance(now, dict):
        keys = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
        return ", ".join(f"{k}: {saved.get(k)!r} then, {now.get(k)!r} now" for k in keys)
    return f"{saved!r} then, {now!r} now"


# ---------------------------------------------------------------- 3. worker loss (every worker)
def retry_checkpoint(root: Path | Location, launch: str, say: Say = print) -> Path | str | None:
    """The newest intact checkpoint under `root` written by this launch (its manifest's `launch` is
    this `kiln pretrain/finetune` invocation's id; no clocks are compared, the workers may run on
    other machines than the driver): present only when Ray Train restarted the worker group after a
    failure, which must continue where the lost group stopped."""
    path = newest_valid_checkpoint(root, warn=say, launch=launch)
    if path is not None:
        say(f"[retry] the worker group was restarted; continuing from {path}")
    return path


def resume_point(
    run: Path | RunDir, chosen: str | Path | None, launch: str, say: Say = print
) -> tuple[Path | str, Path] | None:
    """The checkpoint a worker group continues from, as (where it is, a local directory of it):
    after a restart this launch's own newest one (`retry_checkpoint`, any strategy), else the
    driver's choice `chosen` (`check_resume`; None: a fresh start). A remote checkpoint is fetched
    into the local cache and verified (pretrain.checkpoint.fetch_checkpoint)."""
    found = retry_checkpoint(_checkpoint_root(run), launch, say) or chosen
    return (found, fetch_checkpoint(found)) if found else None


def checkpoint_step(path: Path | str) -> int:
    """The training step a checkpoint (a directory, or a URI) was saved at (its manifest's `step`)."""
    step = read_manifest(path).get("step")
    if not isinstance(step, int):
        raise CheckpointError(
            f"{path}/manifest.json: no integer 'step'; not a training checkpoint to resume"
        )
    return step


# ---------------------------------------------------------------- 4. the metrics history (rank 0)
def stash_metrics(run: Path, step: int) -> None:
    """Lightning's CSV logger deletes an existing metrics.csv when it starts; keep the rows logged
    before the checkpoint (`step` column < its step: later ones were logged after it and are redone)
    for `restore_metrics`. Rows stashed by an earlier resume that itself failed are kept too."""
    run = Path(run)
    rows = _read_rows(run / STASHED_METRICS) + _read_rows(run / METRICS)
    kept = [r for r in rows if r.get("step") not in (None, "") and int(float(r["step"])) < step]
    _write_rows(run / STASHED_METRICS, kept)
    (run / METRICS).unlink(missing_ok=True)


def restore_metrics(run: Path) -> None:
    """metrics.csv = the stashed rows, then the resumed run's (a union header: later runs may log
    new keys).

    Called by rank 0 after every run, resumed or not: it always leaves a metrics.csv, header only
    when nothing was logged (a resume of a run already at max_steps), because the loss curve and the
    report read it next."""
    stash, metrics = Path(run) / STASHED_METRICS, Path(run) / METRICS
    if stash.is_file() or not metrics.is_file():
        _write_rows(metrics, _read_rows(stash) + _read_rows(metrics))
    stash.unlink(missing_ok=True)


def publish_metrics(run: RunDir) -> None:
    """A remote run's metrics.csv so far (the stashed rows, then this run's) to its `--out`, where a
    resume on another machine finds it. Lightning's CSV logger flushes its rows every
    `flush_logs_every_n_steps`; the rows it holds back are logged again after a resume."""
    if not run.remote:
        return
    rows = _read_rows(Path(run) / STASHED_METRICS) + _read_rows(Path(run) / METRICS)
    merged = Path(run) / ".metrics-published.csv"
    _write_rows(merged, rows)
    run.location(METRICS).write_bytes(merged.read_bytes())


def _read_rows(file: Path) -> list[dict[str, str]]:
    if not file.is_file():
        return []
    with open(file, newline="") as f:
        return list(csv.DictReader(f))


def _write_rows(file: Path, rows: list[dict[str, str]]) -> None:
    # Lightning's order: epoch, step, then the metrics (sorted); without rows, a header of those two
    fields = sorted({k for row in rows for k in row}) or ["epoch", "step"]
    tmp = file.with_name(f".tmp-{file.name}")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(file)


# ---------------------------------------------------------------- 5. trainer state (every rank)
def lightning_checkpoint(path: Path) -> dict[str, Any]:
    """A Kiln checkpoint directory (sha256s verified) as the dict Lightning's
    `fit(ckpt_path=...)` restores."""
    verify_checkpoint(path)
    state = load_trainer_state(path) or {}
    missing = [key for key in RESUME_KEYS if key not in state]
    if missing:
        raise CheckpointError(
            f"{path}: its trainer_state lacks {missing}, which resuming needs "
            "(saved by an older Kiln; a ZeRO run's then held no optimizer state)"
        )
    scheduler = dict(state["scheduler"])
    # The schedule's shape (warmup, total = max_steps) stays this run's, so a resume with a larger
    # max_steps decays over the new total: LambdaLR.load_state_dict leaves a lambda alone whose
    # saved entry is None.
    scheduler["lr_lambdas"] = [None] * len(scheduler.get("lr_lambdas", [None]))
    weights = load_weights(path / MODEL_FILE)
    return {
        **state["lightning"],
        "epoch": state["epoch"],
        "global_step": state["step"],
        "state_dict": {f"model.{name}": tensor for name, tensor in weights.items()},
        "optimizer_states": [state["optimizer"]],
        "lr_schedulers": [scheduler],
        "callbacks": {},
        "kiln_path": str(path),
        "kiln_rng_per_rank": state["rng_per_rank"],
        "kiln_val_loader": state.get("val_loader"),
    }


def rank_state(
    checkpoint: dict[str, Any], world_size: int, rank: int
) -> tuple[dict | None, dict | None]:
    """What Lightning leaves out of `lightning_checkpoint`'s dict, for this rank: (its RNG state,
    the validation loader's state); (None, None) when the dict has neither.

    Saved by another number of workers (an elastic resume: the loaders re-partition the rest of the
    epoch, the optimizer state is whole or consolidated), rank r continues old rank r's RNG stream
    and a rank that did not exist keeps its fresh seed: dropout cannot continue streams across a
    change of layout, so such a resume is exactly-once in its data, not bitwise."""
    rngs = checkpoint.get("kiln_rng_per_rank")
    if rngs is None:
        return None, None
    rng = rngs[rank] if rank < len(rngs) else None
    return rng, checkpoint.get("kiln_val_loader")


def restore_rank_state(rng: dict | None, val_state: dict | None, val_loader: Any | None) -> None:
    """Put `rank_state`'s result back, just before the first resumed batch."""
    if val_state is not None and val_loader is not None:
        val_loader.load_state_dict(val_state)  # its pass count seeds validation's masks
    if rng is not None:
        restore_rng_state(rng)  # dropout continues the stream it would have drawn
