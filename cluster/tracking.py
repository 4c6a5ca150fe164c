"""Weights & Biases: offline by default (the run lives under the output directory), online when asked.

Secrets never enter configs: an online run takes `WANDB_API_KEY` from the environment only.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger

from cluster.jobs import WandbConfig


def build_loggers(cfg: WandbConfig, out_dir: Path, stage: str, job_config: dict[str, Any]) -> list[Logger]:
    """CSV metrics (always, `out_dir/metrics.csv`) and a W&B run unless disabled. Lightning loggers write from
    rank 0 only, so every rank may build them."""
    loggers: list[Logger] = [CSVLogger(save_dir=str(out_dir), name="", version="")]
    if cfg.mode == "disabled":
        return loggers
    os.environ.setdefault("WANDB_SILENT", "true")
    os.environ["WANDB_MODE"] = cfg.mode
    wandb_dir = out_dir / "wandb"
    loggers.append(WandbLogger(
        name=cfg.name or f"{stage}-{out_dir.name}",
        save_dir=str(out_dir),
        offline=cfg.mode == "offline",
        project=cfg.project,
        entity=cfg.entity,
        tags=[stage, *cfg.tags],
        config=job_config,
        # A retried Ray Train worker group resumes the same W&B run instead of starting a second one.
        id=(wandb_dir / "run_id").read_text().strip(),
        resume="allow",
    ))
    return loggers


def ensure_run_id(out_dir: Path) -> str:
    """Called once on the driver before workers start, so every rank and every retry agree on the run id."""
    id_file = out_dir / "wandb" / "run_id"
    if id_file.is_file():
        return id_file.read_text().strip()
    id_file.parent.mkdir(parents=True, exist_ok=True)
    run_id = secrets.token_hex(4)  # W&B run ids: short, lowercase, unique per project
    id_file.write_text(run_id)
    return run_id
