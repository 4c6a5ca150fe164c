"""`kiln`: the command line. Parsing and error reporting only; each command's work lives in its own module."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path

from cluster.config import ConfigError

# Errors that mean "the user's input is wrong": one line, exit code 2, no traceback (unless --debug).
USER_ERRORS: tuple[type[BaseException], ...] = (ConfigError,)

EPILOG = ("Overrides: dotted keys after the config, e.g. "
          "`kiln pretrain --config configs/tiny-bert.yaml trainer.max_steps=50`.")


def _config_args(p: argparse.ArgumentParser, out_help: str) -> None:
    p.add_argument("--config", type=Path, help="YAML recipe (see configs/); defaults when omitted")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. trainer.max_steps=50")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    p.add_argument("--out", type=Path, help=out_help)


def _add_data(sub: argparse._SubParsersAction) -> None:
    data = sub.add_parser("data", help="data preparation")
    data_sub = data.add_subparsers(dest="data_command", metavar="{prepare}", required=True)
    p = data_sub.add_parser(
        "prepare",
        help="read a corpus with Ray Data, train a tokenizer, write tokenized shards + manifest",
        description="Read sources with Ray Data, clean, split, train (or load) a tokenizer, build examples for "
        "each task and write Parquet shards with a sha256 manifest.",
        epilog=EPILOG,
    )
    _config_args(p, "output directory (must not exist or be empty) [runs/data]")


def _add_training(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "pretrain",
        help="pretrain a BERT (MLM+NSP) or GPT (causal LM) on Ray Train + Lightning",
        description="Pretrain on prepared shards with N Ray Train workers, each a Lightning Trainer "
        "(DDP or DeepSpeed ZeRO-1/2/3).",
        epilog=EPILOG,
    )
    _config_args(p, "run directory: checkpoints, metrics.csv, loss curve, W&B offline run [runs/pretrain]")
    p = sub.add_parser(
        "finetune",
        help="fine-tune for translation (warm-started encoder-decoder) or classification",
        description="Fine-tune from Kiln checkpoints: translation with a BERT encoder and GPT decoder plus new "
        "cross-attention, or a [CLS] classifier on the BERT encoder.",
        epilog=EPILOG,
    )
    _config_args(p, "run directory [runs/finetune]")


def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="score a fine-tuned checkpoint on a prepared split (BLEU/chrF or accuracy/F1)")
    p.add_argument("--checkpoint", type=Path, required=True, help="fine-tuned checkpoint directory")
    p.add_argument("--data", type=Path, required=True, help="prepared data directory (output of `kiln data prepare`)")
    p.add_argument("--split", default="test", help="split to score [test]")
    p.add_argument("--beam", type=int, default=4, help="beam width for translation [4]")
    p.add_argument("--out", type=Path, help="write metrics.json (and translations.txt) here")
    p = sub.add_parser("translate", help="translate lines from a file or stdin with a fine-tuned checkpoint")
    p.add_argument("--checkpoint", type=Path, required=True, help="translation checkpoint directory")
    p.add_argument("--input", type=Path, help="text file, one sentence per line [stdin]")
    p.add_argument("--beam", type=int, default=4, help="beam width; 1 = greedy [4]")
    p.add_argument("--length-penalty", type=float, default=0.6, help="GNMT length-penalty alpha [0.6]")
    p.add_argument("--max-len", type=int, default=64, help="longest output in tokens [64]")
    p.add_argument("--out", type=Path, help="write translations to this file [stdout]")


def _add_ops(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="export a checkpoint (safetensors) for Hugging Face transformers")
    p.add_argument("--checkpoint", type=Path, required=True, help="Kiln checkpoint directory")
    p.add_argument("--format", choices=["hf"], default="hf", help="target format [hf]")
    p.add_argument("--out", type=Path, required=True, help="output directory (must not exist or be empty)")
    p = sub.add_parser("submit", help="submit a pretrain/finetune/data job to a Ray cluster (Ray Jobs API)")
    p.add_argument("command_name", choices=["pretrain", "finetune", "data-prepare"], help="which kiln command to run")
    _config_args(p, "output directory on the cluster [runs/<command>]")
    p.add_argument("--address", help="Ray dashboard address, e.g. http://127.0.0.1:8265 [RAY_ADDRESS]")
    p = sub.add_parser("jobs", help="list, inspect, follow and stop Ray jobs")
    p.add_argument("action", choices=["list", "status", "logs", "stop"])
    p.add_argument("job_id", nargs="?", help="submission id (status, logs, stop)")
    p.add_argument("--follow", action="store_true", help="with logs: stream until the job ends")
    p.add_argument("--address", help="Ray dashboard address [RAY_ADDRESS or http://127.0.0.1:8265]")


def _add_quickstart(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "quickstart",
        help="the whole mission on the built-in sample: data → BERT+GPT pretraining → fine-tuning → report.md",
        description="Prepare the built-in sample with Ray Data, pretrain a tiny BERT and GPT on 2 Ray Train workers, "
        "fine-tune a warm-started translation model and a classifier, evaluate against trivial baselines "
        "and write report.md with loss curves. Without --config it runs configs/quickstart.yaml.",
        epilog=EPILOG,
    )
    _config_args(p, "output directory [runs/quickstart]")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if an earlier Kiln run wrote it")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kiln", description="Kiln: distributed pretraining and fine-tuning of Transformer language models."
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in (_add_data, _add_training, _add_eval, _add_ops, _add_quickstart):
        add(sub)
    return parser


def _handler(args: argparse.Namespace) -> Callable[[argparse.Namespace], int | None]:
    # Imported lazily: `kiln --help` and config errors must not pay for torch/ray imports.
    from cluster import commands

    name = "data_prepare" if args.command == "data" else args.command
    return getattr(commands, f"cmd_{name}")


def _user_errors() -> tuple[type[BaseException], ...]:
    from data_pipeline.errors import DataError
    from pretrain.checkpoint import CheckpointError

    return (*USER_ERRORS, DataError, CheckpointError)


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # argparse cannot give a second run of positionals (overrides after options, as in
    # `kiln submit pretrain --config X a.b=1`) to the same nargs="*" argument; collect them here.
    if extra:
        if hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
            args.overrides = [*args.overrides, *extra]
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.command in ("submit", "jobs"):
        from cluster.submit import use_token_auth_if_available

        use_token_auth_if_available()
    try:
        code = _handler(args)(args)
    except KeyboardInterrupt:
        print("kiln: interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as err:  # noqa: BLE001 — the filter below decides what is a user error
        if args.debug or not isinstance(err, _user_errors()):
            raise
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        print(f"kiln: error: {message}", file=sys.stderr)
        sys.exit(2)
    sys.exit(code or 0)
