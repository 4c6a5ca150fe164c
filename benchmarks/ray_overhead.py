"""What Ray Train costs per step: the same Lightning fit in a plain process and inside a Ray Train worker.

    .venv/bin/python benchmarks/ray_overhead.py [--config configs/tiny-gpt.yaml] [--steps 80] [--warmup 20] [--rounds 3]

Both contenders train the same job (task, model, batch, data, seed) with one worker on one thread:
  lightning  `lightning.pytorch.Trainer.fit` in this process: the task registry's module and loaders, a CSV logger,
             nothing else (no Ray, no Kiln callbacks)
  ray        `kiln pretrain`'s path: `cluster.launch.run_training` → Ray Train `TorchTrainer` (1 worker) → the same
             module and loaders in a Lightning Trainer with Ray's environment, Kiln's progress, checkpoint and
             W&B-offline loggers
Steady state: the median of `train/tokens_per_s` (wall time from one batch's end to the next's, so data loading,
logging and Ray's reporting all count) over the steps after --warmup. Ray's start-up, worker placement and the
final checkpoint are excluded: they are paid once per run, not per step (reported separately as the run's wall time).
The contenders alternate within each round. Writes benchmarks/results/ray_overhead.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cluster.config import load_config  # noqa: E402
from cluster.jobs import PretrainJob  # noqa: E402
from cluster.report import read_series  # noqa: E402


def job_for(config: str, data_dir: Path, steps: int, out_overrides: list[str]) -> PretrainJob:
    return load_config(
        PretrainJob,
        Path(config),
        [
            f"data_dir={data_dir}",
            f"trainer.max_steps={steps}",
            "trainer.log_every=1",
            f"trainer.val_every={steps + 1}",
            "trainer.checkpoint_every=0",
            "cluster.num_workers=1",
            "cluster.cpus_per_worker=1",
            *out_overrides,
        ],
    )


def steady_rate(metrics_csv: Path, warmup: int) -> float:
    series = read_series(metrics_csv)["train/tokens_per_s"]
    return statistics.median(v for step, v in series if step >= warmup)


def run_lightning(job: PretrainJob, out: Path) -> tuple[float, Path]:
    import lightning.pytorch as pl
    import torch
    from lightning.pytorch.loggers import CSVLogger

    from cluster.tasks import TASKS, preflight

    torch.set_num_threads(1)
    job = preflight(job, out)
    pl.seed_everything(job.trainer.seed, workers=True, verbose=False)
    parts = TASKS[job.task](job, 0, 1)
    logger = CSVLogger(str(out), name="", version="")
    trainer = pl.Trainer(
        max_steps=job.trainer.max_steps,
        accelerator="cpu",
        devices=1,
        logger=logger,
        log_every_n_steps=1,
        val_check_interval=job.trainer.val_every,
        check_val_every_n_epoch=None,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    start = time.perf_counter()
    trainer.fit(parts.module, train_dataloaders=parts.train_loader)
    return time.perf_counter() - start, out / "metrics.csv"


def run_ray(job: PretrainJob, out: Path) -> tuple[float, Path]:
    from cluster.launch import run_training

    result = run_training(job, out, stage="bench")
    return result.seconds, result.metrics_csv


def prepare_data(scratch: Path) -> Path:
    from data_pipeline.config import DataConfig
    from data_pipeline.prepare import prepare

    out = scratch / "data"
    prepare(DataConfig(tasks=["clm", "mlm_nsp"]), out)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/tiny-gpt.yaml")
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "ray_overhead.md"))
    args = parser.parse_args(argv)
    os.environ["WANDB_MODE"] = "disabled"
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        data = prepare_data(scratch)
        rows: dict[str, list[float]] = {"lightning": [], "ray": []}
        walls: dict[str, list[float]] = {"lightning": [], "ray": []}
        for r in range(args.rounds):
            for name, fn in (("lightning", run_lightning), ("ray", run_ray)):
                job = job_for(args.config, data, args.steps, ["wandb.mode=disabled"])
                wall, csv_file = fn(job, scratch / f"{name}-{r}")
                rows[name].append(steady_rate(csv_file, args.warmup))
                walls[name].append(wall)
                print(
                    f"round {r + 1} {name}: {rows[name][-1]:,.0f} tokens/s steady, {wall:.1f} s wall",
                    flush=True,
                )
    ratios = [ray / plain for ray, plain in zip(rows["ray"], rows["lightning"], strict=True)]
    text = report(args, rows, walls, ratios, load_before, os.getloadavg())
    Path(args.out).write_text(text)
    print(text)
    return 0


def report(
    args: argparse.Namespace,
    rows: dict[str, list[float]],
    walls: dict[str, list[float]],
    ratios: list[float],
    load_before: tuple[float, ...],
    load_after: tuple[float, ...],
) -> str:
    import ray
    import torch

    overhead = 1 - statistics.median(ratios)
    lines = [
        "# Ray Train overhead: the same Lightning fit with and without Ray",
        "",
        f"- date: {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC",
        f"- machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        f"- command: `.venv/bin/python benchmarks/ray_overhead.py --config {args.config} --steps {args.steps} "
        f"--warmup {args.warmup} --rounds {args.rounds}`",
        f"- torch {torch.__version__}, ray {ray.__version__}; 1 worker, 1 thread; built-in sample data",
        f"- load average at start {', '.join(f'{x:.2f}' for x in load_before)}, "
        f"at end {', '.join(f'{x:.2f}' for x in load_after)}",
        "",
        "| contender | steady tokens/s per round | median | run wall time s (incl. start-up) |",
        "|---|---|---|---|",
    ]
    for name in ("lightning", "ray"):
        lines.append(
            f"| {name} | {', '.join(f'{x:,.0f}' for x in rows[name])} | {statistics.median(rows[name]):,.0f} "
            f"| {', '.join(f'{x:.1f}' for x in walls[name])} |"
        )
    lines += [
        "",
        f"Ray / plain Lightning steady-state throughput per round: {', '.join(f'{x:.3f}' for x in ratios)}; "
        f"median overhead {overhead:.1%} (goal <= 5%: {'met' if overhead <= 0.05 else 'not met'}).",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
