"""Weights & Biases: offline by default (the run lives under the output directory), online when asked.

One run per output directory: its id is written to `<out>/wandb/run_id` (a file, or an object when `--out` is a
URI) on the driver before workers start, so
every rank, every Ray Train retry, a resumed job and the driver's post-training uploads all name the same run.
Offline, each of those processes writes its own `offline-run-*` directory of that id; `wandb sync` uploads them in
start order into the one run. Secrets never enter configs: an online run takes `WANDB_API_KEY` from the
environment only, and any secret's value found in what is recorded is replaced before it is written.
"""

from __future__ import annotations

import argparse
import json
import netrc
import os
import secrets
import shutil
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cluster.rundir import RUN_ID, out_location
from data_pipeline.configlib import ConfigError

if (
    TYPE_CHECKING
):  # cluster.jobs imports torch; `kiln wandb sync` and `kiln jobs` must start without it
    from cluster.jobs import WandbConfig

SECRET_ENV_VARS = (
    "WANDB_API_KEY",
    "HF_TOKEN",
    "HUGGING_FACE_HUB_TOKEN",
    "RAY_AUTH_TOKEN",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
)
REDACTED = "<redacted>"
REFERENCE_OVER_MIB = (
    100.0  # checkpoints larger than this are logged by reference (file:// URI), not copied
)
MAX_TABLE_ROWS = 200


# ------------------------------------------------------------------------------------------------------ secrets
def secret_values() -> dict[str, str]:
    """{variable: value} of the secret variables set in this environment (values shorter than 8 chars are not
    secrets worth matching: they would flag ordinary words)."""
    return {
        name: os.environ[name] for name in SECRET_ENV_VARS if len(os.environ.get(name, "")) >= 8
    }


def find_secrets(text: str) -> list[str]:
    """Names of the secret variables whose values occur in `text`."""
    return [name for name, value in secret_values().items() if value in text]


def scrub(value: Any) -> Any:
    """`value` (nested dicts/lists/strings) with every secret's value replaced by <redacted>."""
    found = secret_values()
    if not found:
        return value

    def walk(item: Any) -> Any:
        if isinstance(item, str):
            for secret in found.values():
                item = item.replace(secret, REDACTED)
            return item
        if isinstance(item, dict):
            return {walk(k): walk(v) for k, v in item.items()}
        if isinstance(item, (list, tuple)):
            return type(item)(walk(v) for v in item)
        return item

    return walk(value)


def check_online_credentials(mode: str) -> None:
    """An online run needs an API key from the environment (or `wandb login`'s ~/.netrc) before workers start."""
    if mode != "online" or os.environ.get("WANDB_API_KEY"):
        return
    host = (
        (os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").split("://")[-1].split("/")[0]
    )
    try:
        if netrc.netrc().authenticators(host):
            return
    except (FileNotFoundError, netrc.NetrcParseError):
        pass
    raise ConfigError(
        "wandb.mode=online needs WANDB_API_KEY in the environment (for a submitted job: the "
        "cluster's environment) or `wandb login`; or keep wandb.mode=offline and `kiln wandb sync`"
    )


# ------------------------------------------------------------------------------------------ loggers (workers)
def build_loggers(
    cfg: WandbConfig, out_dir: str | os.PathLike[str], stage: str, job_config: dict[str, Any]
) -> list[Any]:
    """CSV metrics (always, `out_dir/metrics.csv`) and a W&B run unless disabled. Lightning loggers write from
    rank 0 only (the W&B run is created lazily, on rank 0), so every rank may build them."""
    from lightning.pytorch.loggers import CSVLogger, WandbLogger

    local = os.fspath(out_dir)  # a RunDir: the working directory on this machine
    loggers: list[Any] = [CSVLogger(save_dir=local, name="", version="")]
    if cfg.mode == "disabled":
        return loggers
    quiet_wandb()
    os.environ["WANDB_MODE"] = cfg.mode
    wandb_logger = WandbLogger(
        name=cfg.name or f"{stage}-{out_location(out_dir).name}",
        save_dir=local,
        offline=cfg.mode == "offline",
        project=cfg.project,
        entity=cfg.entity,
        tags=[stage, *cfg.tags],
        config=scrub(job_config),
        # A retried Ray Train worker group resumes the same W&B run instead of starting a second one.
        id=read_run_id(out_dir),
        resume="allow",
    )
    # Lightning passes `anonymous=None` to wandb.init whatever it is given, and W&B warns about any value of
    # that retired setting ("The anonymous setting has no effect"); not passing it is what W&B asks for.
    getattr(wandb_logger, "_wandb_init", {}).pop("anonymous", None)
    loggers.append(wandb_logger)
    return loggers


def quiet_wandb() -> None:
    """W&B's console lines stay in its own logs (<out>/wandb/.../logs/) unless `kiln --verbose` was given
    (KILN_VERBOSE, which a local Ray's workers inherit)."""
    if os.environ.get("KILN_VERBOSE", "") in ("", "0"):
        os.environ.setdefault("WANDB_SILENT", "true")


def finish_run() -> None:
    """Close this process's W&B run (rank 0's; other ranks have none) at the end of training. Ray ends worker
    processes without running their exit hooks, and an unfinished run loses the history W&B had not flushed yet
    (seen: the last rows of a run missing from its offline file)."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and wandb.run is not None:
        wandb.finish()


def ensure_run_id(out_dir: str | os.PathLike[str]) -> str:
    """Called once on the driver before workers start, so every rank and every retry agree on the run id
    (kept in the run's `--out`, which every node reaches)."""
    id_file = out_location(out_dir) / RUN_ID
    if id_file.is_file():
        return id_file.read_text().strip()
    run_id = secrets.token_hex(4)  # W&B run ids: short, lowercase, unique per project
    id_file.write_text(run_id)
    return run_id


def read_run_id(out_dir: str | os.PathLike[str]) -> str:
    id_file = out_location(out_dir) / RUN_ID
    if not id_file.is_file():
        raise ConfigError(f"{id_file}: no W&B run id (the driver writes it before training starts)")
    return id_file.read_text().strip()


# ------------------------------------------------------------------------------------ after training (driver)
def log_artifacts(
    cfg: WandbConfig,
    out_dir: Path,
    stage: str,
    checkpoint: Path | None = None,
    images: list[Path] | None = None,
    tables: dict[str, Path] | None = None,
    reference_over_mib: float = REFERENCE_OVER_MIB,
) -> str | None:
    """Add what training leaves behind to the run of `out_dir`: PNGs (loss curves, attention maps) as images,
    JSONL predictions (sample translations) as tables, test metrics as summary values, and the checkpoint as a
    model artifact, by reference when larger than `reference_over_mib`. Returns the run id (None: no run).

    `images` / `tables` default to what Kiln's commands write: `*.png` in `out_dir` and its direct
    subdirectories, and `eval/predictions.jsonl`."""
    run_out, out_dir = out_location(out_dir), Path(out_dir)
    if cfg.mode == "disabled" or not (run_out / RUN_ID).is_file():
        return None
    import wandb

    images = _default_images(out_dir) if images is None else images
    tables = _default_tables(out_dir) if tables is None else tables
    quiet_wandb()
    run = wandb.init(
        id=read_run_id(run_out),
        resume="allow",
        dir=str(out_dir),
        mode=cfg.mode,
        project=cfg.project,
        entity=cfg.entity,
        name=cfg.name or f"{stage}-{run_out.name}",
        tags=[stage, *cfg.tags],
        settings=wandb.Settings(console="off"),
    )
    try:
        media: dict[str, Any] = {f"images/{png.stem}": wandb.Image(str(png)) for png in images}
        media.update({f"samples/{name}": _table(file) for name, file in tables.items()})
        if media:
            run.log(media)
        metrics = out_dir / "eval" / "metrics.json"
        if metrics.is_file():
            run.summary.update({f"test/{k}": v for k, v in json.loads(metrics.read_text()).items()})
        if checkpoint is not None:
            run.log_artifact(
                checkpoint_artifact(checkpoint, f"{stage}-{run.id}", reference_over_mib),
                aliases=["latest", Path(checkpoint).name],
            )
    finally:
        run.finish()
    return run.id


def checkpoint_artifact(
    checkpoint: Path | str, name: str, reference_over_mib: float = REFERENCE_OVER_MIB
) -> Any:
    """A W&B model artifact of a checkpoint directory: its files (small) or a file:// reference (large; W&B
    records paths and checksums, the bytes stay where they are). A checkpoint on object storage is
    always a reference to its URI (W&B reads the S3 credentials from the same environment)."""
    import wandb

    if "://" in str(checkpoint):
        return _remote_checkpoint_artifact(str(checkpoint), name, reference_over_mib)
    checkpoint = Path(checkpoint)
    size = sum(f.stat().st_size for f in checkpoint.rglob("*") if f.is_file())
    artifact = wandb.Artifact(name, type="model", metadata={"path": str(checkpoint), "bytes": size})
    if size > reference_over_mib * 2**20:
        artifact.add_reference(checkpoint.resolve().as_uri())
    else:
        # immutable: no staging copy; the checkpoint is never rewritten once complete.
        artifact.add_dir(str(checkpoint), policy="immutable")
    return artifact


def _remote_checkpoint_artifact(uri: str, name: str, reference_over_mib: float) -> Any:
    """A checkpoint on object storage: its files from the verified local copy when small; when large
    its URI (metadata) with its manifest.json and config.json only (W&B's own s3:// references would
    need boto3 and its own credentials handling; the manifest's sha256s identify the weights)."""
    import wandb

    from pretrain.checkpoint import fetch_checkpoint

    local = fetch_checkpoint(uri)
    size = sum(f.stat().st_size for f in local.rglob("*") if f.is_file())
    artifact = wandb.Artifact(name, type="model", metadata={"path": uri, "bytes": size})
    if size > reference_over_mib * 2**20:
        for small in ("manifest.json", "config.json"):
            artifact.add_file(str(local / small), policy="immutable")
    else:
        artifact.add_dir(str(local), policy="immutable")
    return artifact


def _default_images(out_dir: Path) -> list[Path]:
    skip = {"wandb", "ray", "checkpoints", "imported"}
    pngs = sorted(out_dir.glob("*.png"))
    pngs += sorted(p for p in out_dir.glob("*/*.png") if p.parent.name not in skip)
    return pngs


def _default_tables(out_dir: Path) -> dict[str, Path]:
    predictions = out_dir / "eval" / "predictions.jsonl"
    return {"predictions": predictions} if predictions.is_file() else {}


def _table(file: Path) -> Any:
    import wandb

    rows = [
        json.loads(line)
        for line in file.read_text(encoding="utf-8").splitlines()[:MAX_TABLE_ROWS]
        if line
    ]
    columns = list(rows[0]) if rows else ["empty"]
    return wandb.Table(columns=columns, data=[[scrub(row.get(c)) for c in columns] for row in rows])


# ---------------------------------------------------------------------------------------------- wandb sync
def cmd_wandb(args: argparse.Namespace) -> int:
    """`kiln wandb sync OUTPUT_DIR [--dry-run]`."""
    return sync(args.out_dir, dry_run=args.dry_run)


def offline_runs(out_dir: Path) -> list[Path]:
    """The offline W&B run directories under `out_dir` (any depth: a quickstart holds one per stage)."""
    return sorted(p.parent for p in Path(out_dir).rglob("offline-run-*/run-*.wandb"))


def sync(out_dir: Path, dry_run: bool = False, extra: list[str] | None = None) -> int:
    """Upload the offline runs under `out_dir` with `wandb sync` (several directories of one run id, from
    retries and the driver's uploads, are synced in start order into that run)."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        raise ConfigError(f"{out_dir}: no such directory")
    runs = offline_runs(out_dir)
    if not runs:
        raise ConfigError(
            f"{out_dir}: no offline W&B runs under it (looked for */wandb/offline-run-*/run-*.wandb; "
            "was the run made with wandb.mode=disabled or online?)"
        )
    if not dry_run:
        check_online_credentials("online")
    beside = Path(sys.executable).parent / "wandb"
    exe = str(beside) if beside.is_file() else shutil.which("wandb")
    if not exe:
        raise ConfigError("the `wandb` command is not installed next to this python")
    cmd = [exe, "sync", *(["--dry-run"] if dry_run else []), *(extra or []), *map(str, runs)]
    print(f"wandb sync: {len(runs)} offline run directories under {out_dir}", flush=True)
    return subprocess.run(cmd, check=False).returncode
