"""The work behind each `kiln` subcommand. Each `cmd_*` takes the parsed arguments and returns an exit code."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, TypeVar

from cluster.config import ConfigError, load_config, to_yaml
from cluster.jobs import FinetuneJob, PrepareJob, PretrainJob, QuickstartJob

T = TypeVar("T")


def _config(cls: type[T], args: argparse.Namespace) -> T | None:
    """Load and validate the config; with --print-config print it and return None (nothing else runs)."""
    cfg = load_config(cls, args.config, args.overrides)
    if args.print_config:
        sys.stdout.write(to_yaml(cfg))
        return None
    return cfg


def fresh_out_dir(out: Path, overwrite: bool = False) -> Path:
    """An output directory that is empty (or absent). Refuse to mix a new run into an old one's files."""
    from cluster.rundir import prepare_run_dir

    return prepare_run_dir(out, overwrite)


def run_out_dir(out: Path, resume: str) -> Path:
    """With trainer.resume=auto a directory an earlier Kiln run made is continued, not refused; else a fresh one."""
    from cluster.rundir import MARKER

    if resume == "auto" and (Path(out) / MARKER).is_file():
        return Path(out)
    return fresh_out_dir(out)


def cmd_data_prepare(args: argparse.Namespace) -> int:
    cfg = _config(PrepareJob, args)
    if cfg is None:
        return 0
    from data_pipeline.prepare import prepare

    out = args.out or Path("runs/data")
    manifest = prepare(cfg.data, out, progress=lambda msg: print(f"[data] {msg}", flush=True))
    print(f"[data] wrote {out} (tasks: {', '.join(manifest['tasks'])}, vocab {manifest['vocab_size']})")
    return 0


def cmd_pretrain(args: argparse.Namespace) -> int:
    cfg = _config(PretrainJob, args)
    if cfg is None:
        return 0
    from cluster.launch import run_training
    from cluster.report import plot_curves

    out = run_out_dir(args.out or Path("runs/pretrain"), cfg.trainer.resume)
    result = run_training(cfg, out, stage=cfg.model.arch)
    plot_curves(result.metrics_csv, out / "loss_curve.png", title=f"{cfg.model.arch} pretraining")
    print(f"[{cfg.model.arch}] checkpoint: {result.checkpoint}")
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    cfg = _config(FinetuneJob, args)
    if cfg is None:
        return 0
    from cluster.evaluation import evaluate_checkpoint
    from cluster.launch import run_training
    from cluster.report import plot_curves

    out = run_out_dir(args.out or Path("runs/finetune"), cfg.trainer.resume)
    result = run_training(cfg, out, stage=cfg.task)
    plot_curves(result.metrics_csv, out / "loss_curve.png", title=f"{cfg.task} fine-tuning")
    metrics = evaluate_checkpoint(result.checkpoint, Path(cfg.data_dir), "test", cfg.decode, out / "eval")
    print(f"[{cfg.task}] checkpoint: {result.checkpoint}\n[{cfg.task}] test: {_fmt(metrics)}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from cluster.evaluation import evaluate_checkpoint
    from cluster.jobs import DecodeConfig

    metrics = evaluate_checkpoint(args.checkpoint, args.data, args.split, DecodeConfig(beam_size=args.beam), args.out)
    print(json.dumps(metrics, indent=2))
    return 0


def cmd_translate(args: argparse.Namespace) -> int:
    from cluster.evaluation import translate_lines

    if args.input is not None and not args.input.is_file():
        raise ConfigError(f"{args.input}: input file not found")
    text = args.input.read_text(encoding="utf-8") if args.input else sys.stdin.read()
    lines = text.splitlines()
    outputs = translate_lines(args.checkpoint, lines, args.beam, args.length_penalty, args.max_len)
    result = "".join(f"{line}\n" for line in outputs)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(result, encoding="utf-8")
    else:
        sys.stdout.write(result)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from pretrain.hf_export import export_hf

    written = export_hf(args.checkpoint, args.out)
    print(f"exported {args.checkpoint} → {written} (Hugging Face format)")
    return 0


def cmd_submit(args: argparse.Namespace) -> int:
    from cluster.submit import submit

    cls = {"pretrain": PretrainJob, "finetune": FinetuneJob, "data-prepare": PrepareJob}[args.command_name]
    cfg = _config(cls, args)
    if cfg is None:
        return 0
    submit(args.command_name, args.config, args.overrides, args.out, args.address)
    return 0


def cmd_jobs(args: argparse.Namespace) -> int:
    from cluster.submit import jobs

    return jobs(args.action, args.job_id, args.follow, args.address)


QUICKSTART_RECIPE = Path(__file__).resolve().parent.parent / "configs" / "quickstart.yaml"


def cmd_quickstart(args: argparse.Namespace) -> int:
    if args.config is None and QUICKSTART_RECIPE.is_file():
        args.config = QUICKSTART_RECIPE
    cfg = _config(QuickstartJob, args)
    if cfg is None:
        return 0
    from cluster.quickstart import run_quickstart

    report = run_quickstart(cfg, args.out or Path("runs/quickstart"), overwrite=args.overwrite)
    print(f"[quickstart] report: {report}")
    return 0


def _fmt(metrics: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items())
