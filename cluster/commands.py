"""The work behind each `kiln` subcommand. Each `cmd_*` takes the parsed arguments and returns an exit code.

The imports inside functions are there for start-up cost only: they pull in torch models, Lightning, Ray
or matplotlib, which the commands that do not use them (and every config error) must not pay for
(cluster/cli.py imports this module only when one of its commands runs).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from cluster.config import load_config
from cluster.jobs import DecodeConfig, FinetuneJob, PrepareJob, PretrainJob, QuickstartJob
from cluster.preemption import Preempted
from cluster.render import infer_command, render_kuberay, render_slurm
from cluster.rundir import RERUN_TRAINING, RunDir, run_dir
from cluster.submit import submit
from cluster.tracking import log_artifacts
from data_pipeline.configlib import ConfigError, to_yaml

if TYPE_CHECKING:
    from cluster.launch import TrainResult

T = TypeVar("T")


def _config(cls: type[T], args: argparse.Namespace, pin: bool = True) -> T | None:
    """Load and validate the config; with --print-config print it and return None (nothing else runs).
    pin=False: a job that runs later, elsewhere (submit, render) keeps checkpoint URIs as written."""
    cfg = load_config(cls, args.config, args.overrides, pin=pin)
    if args.print_config:
        sys.stdout.write(to_yaml(cfg))
        return None
    return cfg


def cmd_data_prepare(args: argparse.Namespace) -> int:
    cfg = _config(PrepareJob, args)
    if cfg is None:
        return 0
    from data_pipeline.prepare import prepare
    from data_pipeline.raystart import keep_ray_log
    from data_pipeline.storage import Location

    out = args.out or Path("runs/data")
    manifest = prepare(cfg.data, out, progress=lambda msg: print(f"[data] {msg}", flush=True))
    print(
        f"[data] wrote {out} (tasks: {', '.join(manifest['tasks'])}, vocab {manifest['vocab_size']})"
    )
    # Ray's own output, held until `out` existed (beside a remote `out`: uploaded once complete)
    log = RunDir(out).local / "logs" / "ray.log"
    keep_ray_log(log)
    if Location.of(out).is_remote and log.is_file():
        (Location.of(out) / "logs" / "ray.log").write_bytes(log.read_bytes())
    return 0


def cmd_pretrain(args: argparse.Namespace) -> int:
    cfg = _config(PretrainJob, args)
    if cfg is None:
        return 0
    if args.dry_run:
        return _dry_run(cfg, args.out or Path("runs/pretrain"), "pretrain")
    result, out = _train(cfg, args.out or Path("runs/pretrain"), cfg.model.arch, "pretraining")
    _track(cfg, out, cfg.model.arch, result.checkpoint)
    print(f"[{cfg.model.arch}] checkpoint: {result.checkpoint}\n{_outputs(cfg.model.arch, out)}")
    return 0


def _dry_run(cfg: PretrainJob | FinetuneJob, out: str | Path, stage: str) -> int:
    from cluster.dryrun import dry_run  # the model files (torch): only when a run is planned

    print("\n".join(dry_run(cfg, out, stage)))
    return 0


def _train(
    cfg: PretrainJob | FinetuneJob, out: str | Path, stage: str, kind: str
) -> tuple[TrainResult, RunDir]:
    """(TrainResult, run directory) of a training run, its loss curve drawn."""
    from cluster.launch import run_training
    from cluster.report import plot_curves

    # run_dir: removed again when bad input stops the run before its first checkpoint
    with run_dir(out, cfg.trainer.resume, rerun=RERUN_TRAINING) as run:
        result = run_training(cfg, run, stage=stage)
    plot_curves(result.metrics_csv, run / "loss_curve.png", title=f"{stage} {kind}")
    run.publish("loss_curve.png", "logs")
    return result, run


def _outputs(stage: str, out: Path) -> str:
    return (
        f"[{stage}] outputs: {out} (metrics.csv, loss_curve.png; Ray's and the workers' own output in "
        "logs/ray.log)"
    )


def cmd_finetune(args: argparse.Namespace) -> int:
    cfg = _config(FinetuneJob, args)
    if cfg is None:
        return 0
    if args.dry_run:
        return _dry_run(cfg, args.out or Path("runs/finetune"), "finetune")
    from cluster.evaluation import evaluate_checkpoint

    result, out = _train(cfg, args.out or Path("runs/finetune"), cfg.task, "fine-tuning")
    metrics = evaluate_checkpoint(result.checkpoint, cfg.data_dir, "test", cfg.decode, out / "eval")
    out.publish("eval")
    _track(cfg, out, cfg.task, result.checkpoint)
    print(
        f"[{cfg.task}] checkpoint: {result.checkpoint}\n[{cfg.task}] test: {_fmt(metrics)}\n"
        f"{_outputs(cfg.task, out)}"
    )
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from cluster import evaluation

    source = _evaluation_source(args)
    # --length-penalty / --alpha left unset: the fine-tuning recipe's own, as its run scored it
    decode, from_recipe = evaluation.decode_given(
        args.length_penalty, args.alpha, beam_size=args.beam
    )
    if source == "data":
        metrics = evaluation.evaluate_checkpoint(
            args.checkpoint, args.data, args.split or "test", decode, args.out, from_recipe
        )
    elif source == "input":
        metrics = evaluation.evaluate_labelled_file(
            args.checkpoint,
            args.input,
            args.text_column or "text",
            args.label_column or "label",
            args.out,
        )
    else:
        metrics = evaluation.evaluate_parallel_files(
            args.checkpoint, args.src, args.ref, decode, args.out, from_recipe
        )
    print(json.dumps(metrics, indent=2))
    return 0


def _evaluation_source(args: argparse.Namespace) -> str:
    """Which one of `kiln evaluate`'s sources was given ("data", "input" or "src"), with only
    its own options."""
    given = [
        name
        for name, on in (
            ("data", args.data is not None),
            ("input", args.input is not None),
            ("src", args.src is not None or args.ref is not None),
        )
        if on
    ]
    if len(given) != 1:
        raise ConfigError(
            "kiln evaluate: give one of --data DIR [--split NAME], --input FILE "
            "(a classifier) or --src FILE --ref FILE (translation)"
        )
    if given == ["src"] and (args.src is None or args.ref is None):
        raise ConfigError("kiln evaluate: --src and --ref go together")
    options = (
        ("--split", args.split, "data"),
        ("--text-column", args.text_column, "input"),
        ("--label-column", args.label_column, "input"),
    )
    for flag, value, source in options:
        if value is not None and source != given[0]:
            raise ConfigError(f"kiln evaluate: {flag} applies only with --{source}")
    return given[0]


def cmd_predict(args: argparse.Namespace) -> int:
    from finetune import predict

    fmt = _predictions_format(args.out)
    # the input first: a bad file fails before the model loads
    rows = predict.read_texts(args.input, args.column, sys.stdin if args.input is None else None)
    classifier = predict.load_classifier(args.checkpoint)
    records = predict.prediction_records(classifier, rows)
    text = predict.format_predictions(records, classifier.label_names, fmt)
    if args.out is None:
        sys.stdout.write(text)
        return 0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text, encoding="utf-8")
    print(f"[predict] {len(rows)} texts labelled → {args.out}")
    return 0


def _predictions_format(out: Path | None) -> str:
    """`kiln predict --out`: the suffix chooses TSV or JSONL; stdout gets TSV."""
    suffix = "" if out is None else out.suffix.lower()
    if out is None or suffix == ".tsv":
        return "tsv"
    if suffix in (".jsonl", ".json"):
        return "jsonl"
    raise ConfigError(f"--out {out}: name a .tsv or .jsonl file (its suffix chooses the format)")


def cmd_translate(args: argparse.Namespace) -> int:
    from cluster.evaluation import translate_lines

    if args.input is not None and not args.input.is_file():
        raise ConfigError(f"{args.input}: input file not found")
    text = args.input.read_text(encoding="utf-8") if args.input else sys.stdin.read()
    lines = text.splitlines()
    if args.sample:
        outputs = _sample_lines(args, lines)
    elif any(getattr(args, k) is not None for k in ("temperature", "top_k", "top_p")):
        raise ConfigError("--temperature, --top-k and --top-p only apply with --sample")
    else:
        outputs = translate_lines(
            args.checkpoint,
            lines,
            args.beam,
            args.alpha,
            args.max_len,
            length_penalty=args.length_penalty,
        )
    result = "".join(f"{line}\n" for line in outputs)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(result, encoding="utf-8")
    else:
        sys.stdout.write(result)
    return 0


def _translation_decoder(args: argparse.Namespace) -> tuple[Any, Any, DecodeConfig]:
    """The checkpoint's model, tokenizers and length penalty: --length-penalty / --alpha, or where
    left unset the checkpoint's recipe settings (as `kiln evaluate`)."""
    from cluster.evaluation import translation_decoder

    return translation_decoder(args.checkpoint, args.length_penalty, args.alpha)


def _sample_lines(args: argparse.Namespace, lines: list[str]) -> list[str]:
    """`kiln translate --sample`: one draw per line from the filtered, tempered model distribution."""
    from finetune.translate import sample_texts

    temperature = 1.0 if args.temperature is None else args.temperature
    top_k, top_p = args.top_k or 0, 1.0 if args.top_p is None else args.top_p
    model, tokenizer, _ = _translation_decoder(args)  # sampling has no length penalty
    try:
        return sample_texts(
            model, tokenizer, lines, args.max_len, temperature, top_k, top_p, args.seed
        )
    except ValueError as e:  # the sampling arguments
        raise ConfigError(f"kiln translate --sample: {e}") from e


def _read_lines(path: Path, flag: str) -> list[str]:
    if not path.is_file():
        raise ConfigError(f"{flag} {path}: file not found")
    return path.read_text(encoding="utf-8").splitlines()


def _parallel_text(args: argparse.Namespace) -> tuple[list[str], list[str]]:
    """Sources and references of `kiln analyze-beam`: a prepared split, or --src/--ref files; --limit applied."""
    if (args.data is None) == (args.src is None and args.ref is None):
        raise ConfigError("kiln analyze-beam: give either --data DIR or --src FILE --ref FILE")
    if args.data is not None:
        from cluster.evaluation import read_split, task_dir

        split = read_split(task_dir(args.data, "translation"), args.split, ["src_text", "tgt_text"])
        srcs, refs = split["src_text"], split["tgt_text"]
    elif args.src is None or args.ref is None:
        raise ConfigError("kiln analyze-beam: --src and --ref go together")
    else:
        srcs, refs = _read_lines(args.src, "--src"), _read_lines(args.ref, "--ref")
        if len(srcs) != len(refs):
            raise ConfigError(
                f"--src {args.src} has {len(srcs)} lines but --ref {args.ref} has {len(refs)}"
            )
    if args.limit is not None:
        srcs, refs = srcs[: args.limit], refs[: args.limit]
    if not srcs:
        raise ConfigError("kiln analyze-beam: no sentences to analyse")
    return srcs, refs


def cmd_analyze_beam(args: argparse.Namespace) -> int:
    from finetune.analysis import analyze_beam, write_analysis

    try:
        beams = [int(b) for b in args.beams.split(",")]
    except ValueError as e:
        raise ConfigError(
            f"--beams {args.beams!r}: expected comma-separated integers like 1,3,5,10"
        ) from e
    if not beams or min(beams) < 1 or args.max_len < 1:
        raise ConfigError(
            f"--beams must be widths >= 1 and --max-len >= 1 (got {args.beams!r}, {args.max_len})"
        )
    srcs, refs = _parallel_text(args)
    model, tokenizer, decode = _translation_decoder(args)
    result = analyze_beam(
        model, tokenizer, srcs, refs, beams, decode.length_penalty, decode.alpha, args.max_len
    )
    files = write_analysis(result, args.out)
    sys.stdout.write(result.to_markdown())
    print("wrote " + ", ".join(str(f) for f in files))
    return 0


def cmd_attention(args: argparse.Namespace) -> int:
    from finetune.attention_maps import attention_maps

    if bool(args.texts) == (args.src is not None):
        raise ConfigError(
            "kiln attention: give sentences as arguments or --src FILE (one of the two)"
        )
    texts = _read_lines(args.src, "--src") if args.src is not None else list(args.texts)
    texts = [t for t in texts if t.strip()][: args.limit]
    if not texts or args.beam < 1 or args.max_len < 1:
        raise ConfigError(
            "kiln attention: needs a non-empty sentence, --beam >= 1 and --max-len >= 1"
        )
    model, tokenizer, decode = _translation_decoder(args)
    try:
        paths = attention_maps(
            model,
            tokenizer,
            texts,
            args.out,
            args.beam,
            decode.length_penalty,
            decode.alpha,
            args.max_len,
        )
    except ValueError as e:  # a model without attention over the source
        raise ConfigError(f"{args.checkpoint}: {e}") from e
    print("\n".join(str(p) for p in paths))
    return 0


def cmd_lm_baseline(args: argparse.Namespace) -> int:
    from finetune.lm_baselines import LMBaselineJob, format_summary, run_lm_baseline

    job = _config(LMBaselineJob, args)
    if job is None:
        return 0
    with run_dir(args.out or job.out_dir) as out:  # removed again on bad input
        metrics = run_lm_baseline(job, out.local)
        out.publish(*(p.name for p in out.local.iterdir()))
    print(format_summary(metrics))
    print(f"[lm-baseline] metrics: {out / 'metrics.json'}")
    return 0


def cmd_average(args: argparse.Namespace) -> int:
    from finetune.models import ARCHITECTURES  # every architecture, as `kiln evaluate` loads them
    from pretrain.average import average_checkpoints

    def say(msg: str) -> None:
        print(msg, flush=True)

    average_checkpoints(args.checkpoints, args.out, last=args.last, registry=ARCHITECTURES, say=say)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from pretrain.hf_export import export_hf

    written = export_hf(args.checkpoint, args.out)
    print(f"exported {args.checkpoint} → {written} (Hugging Face format)")
    return 0


def cmd_submit(args: argparse.Namespace) -> int:
    cls = {"pretrain": PretrainJob, "finetune": FinetuneJob, "data-prepare": PrepareJob}[
        args.command_name
    ]
    cfg = _config(cls, args, pin=False)
    if cfg is None:
        return 0
    submit(
        args.command_name,
        args.config,
        args.overrides,
        args.out,
        args.address,
        job=cfg,
        max_upload_mib=args.max_upload_mib,
    )
    return 0


def cmd_render(args: argparse.Namespace) -> int:
    command = infer_command(args.config, args.overrides)
    cfg = _config({"pretrain": PretrainJob, "finetune": FinetuneJob}[command], args, pin=False)
    if cfg is None:
        return 0
    if args.target == "kuberay":
        text = render_kuberay(
            command,
            args.config,
            args.overrides,
            cfg,
            image=args.image,
            out_dir=args.job_out,
            name=args.name,
            namespace=args.namespace,
            code_dir=args.code_dir,
            worker_memory=args.worker_memory,
            s3_secret=args.s3_secret,
        )
    else:
        text = render_slurm(
            command,
            args.config,
            args.overrides,
            cfg,
            nodes=args.nodes,
            out_dir=args.job_out,
            name=args.name,
            time_limit=args.time,
            partition=args.partition,
            venv=args.venv,
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(f"wrote {args.out} ({args.target}, {cfg.cluster.num_workers} workers)")
    return 0


def _track(cfg: PretrainJob | FinetuneJob, out: RunDir, stage: str, checkpoint: Path | str) -> None:
    """The run's images, sample predictions, test metrics and checkpoint into its W&B run (cluster.tracking)."""
    log_artifacts(cfg.wandb, out, stage, checkpoint=checkpoint)
    out.publish("wandb")  # a remote run: the driver's offline W&B run beside rank 0's


QUICKSTART_RECIPE = Path(__file__).resolve().parent.parent / "configs" / "quickstart.yaml"


def cmd_quickstart(args: argparse.Namespace) -> int:
    if args.config is None and QUICKSTART_RECIPE.is_file():
        args.config = QUICKSTART_RECIPE
    cfg = _config(QuickstartJob, args)
    if cfg is None:
        return 0
    from cluster.quickstart import run_quickstart

    try:
        report = run_quickstart(cfg, args.out or Path("runs/quickstart"), overwrite=args.overwrite)
    except (
        Preempted
    ) as stopped:  # its stages chain into one another: a stopped one is not resumed on its own
        raise Preempted(
            stopped.stage,
            stopped.step,
            stopped.checkpoint,
            hint="the quickstart does not resume: run it again with --overwrite",
        ) from None
    print(f"[quickstart] report: {report}")
    return 0


def _fmt(metrics: dict[str, Any]) -> str:
    return ", ".join(
        f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items()
    )
