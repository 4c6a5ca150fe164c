"""`kiln`: the command line. Parsing and error reporting only; each command's work lives in its own module.

`kiln --help` and a config error must not pay for torch or Ray imports (seconds of CPU):
`HANDLERS` names each subcommand's handler as "module:function", and a handler's module is imported
only when its command runs (tests/test_import_rules.py runs both and checks what they imported).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import get_args

from cluster.config import absolute_path, is_uri
from cluster.jobs import LengthPenalty
from cluster.preemption import EXIT_PREEMPTED, Preempted
from data_pipeline.configlib import ConfigError
from data_pipeline.errors import DataError

# Errors that mean "the user's input is wrong": one line, exit code 2, no traceback (unless --debug).
# DataError covers its subclass DataDirError (not a prepared data directory).
USER_ERRORS: tuple[type[BaseException], ...] = (ConfigError, DataError)
# The names of finetune.decode.LENGTH_PENALTIES, from the job config's choice (that module imports
# torch; cluster.jobs does not).
LENGTH_PENALTIES: tuple[str, ...] = get_args(LengthPenalty)


def location(text: str) -> Path | str:
    """A path argument: a URI (`s3://bucket/x`) stays a string (Path would fold its `//`)."""
    return text if is_uri(text) else Path(text)


EPILOG = (
    "Overrides: dotted keys after the config, e.g. "
    "`kiln pretrain --config configs/tiny-bert.yaml trainer.max_steps=50`."
)
TRAINING_EPILOG = (
    f"{EPILOG} Exit codes: 0 done; 2 bad input (one line names the file or key); {EXIT_PREEMPTED} "
    "stopped on SIGTERM (or a file <out>/STOP) after every worker checkpointed the same step: rerun "
    "with trainer.resume=auto to continue."
)


def _config_args(p: argparse.ArgumentParser, out_help: str) -> None:
    p.add_argument(
        "--config", type=location, help="YAML recipe (see configs/); defaults when omitted"
    )
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="dotted overrides, e.g. trainer.max_steps=50",
    )
    p.add_argument(
        "--print-config", action="store_true", help="print the resolved config as YAML and exit"
    )
    p.add_argument("--out", type=location, help=out_help)


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
        epilog=TRAINING_EPILOG,
    )
    _config_args(
        p, "run directory: checkpoints, metrics.csv, loss curve, W&B offline run [runs/pretrain]"
    )
    _dry_run_arg(p)
    p = sub.add_parser(
        "finetune",
        help="fine-tune for translation or classification (pretrained, or a classic baseline from scratch)",
        description="Fine-tune from Kiln (or hf:) checkpoints: translation with a BERT encoder and GPT decoder plus "
        "new cross-attention, a [CLS] classifier on a BERT encoder, or (decoder_checkpoint alone) a GPT last-token "
        "classifier. A `model` section trains a baseline from scratch instead: model.arch=transformer | lstm | "
        "lstm_attention (model.attention=bahdanau | luong_dot | luong_general) | convs2s | lstm_classifier.",
        epilog=TRAINING_EPILOG,
    )
    _config_args(p, "run directory [runs/finetune]")
    _dry_run_arg(p)


DRY_RUN_HELP = (
    "check the run as it starts (config, data and its manifest, checkpoints, disk, a non-empty --out it "
    "would not continue, the checkpoint trainer.resume=auto would continue from), count the model's "
    "parameters, print the plan (global batch, passes over the train split, workers, fresh start or "
    "resumed step) and exit; "
    "starts no Ray and writes nothing, not even --out"
)


def _dry_run_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dry-run", action="store_true", help=DRY_RUN_HELP)


def _add_eval(sub: argparse._SubParsersAction) -> None:
    _add_evaluate(sub)
    _add_predict(sub)
    p = sub.add_parser(
        "translate", help="translate lines from a file or stdin with a fine-tuned checkpoint"
    )
    p.add_argument(
        "--checkpoint", type=location, required=True, help="translation checkpoint directory"
    )
    p.add_argument("--input", type=location, help="text file, one sentence per line [stdin]")
    p.add_argument("--beam", type=int, default=4, help="beam width; 1 = greedy [4]")
    _length_penalty_args(p, recipe=True)
    p.add_argument("--max-len", type=int, default=64, help="longest output in tokens [64]")
    p.add_argument("--out", type=location, help="write translations to this file [stdout]")
    p.add_argument(
        "--sample",
        action="store_true",
        help="sample instead of beam search (ignores --beam, --length-penalty and --alpha)",
    )
    p.add_argument(
        "--temperature", type=float, help="with --sample: softmax temperature; 0 = greedy [1.0]"
    )
    p.add_argument(
        "--top-k", type=int, help="with --sample: draw from the k most likely tokens; 0 = all [0]"
    )
    p.add_argument(
        "--top-p",
        type=float,
        help="with --sample: nucleus, the smallest set with probability >= p [1.0]",
    )
    p.add_argument("--seed", type=int, default=0, help="with --sample: random seed [0]")
    _add_analysis(sub)
    p = sub.add_parser(
        "lm-baseline",
        help="train/score a language-model baseline: Kneser-Ney n-gram, character LSTM, or a Kiln GPT checkpoint",
        description="Perplexity per word and per character on the same text, comparable across models whatever "
        "their units (see finetune/lm_baselines.py). Writes metrics.json (and, for char_lstm, loss_curve.png, "
        "samples.txt and a checkpoint) to --out.",
        epilog=EPILOG,
    )
    _config_args(p, "output directory [the config's out_dir]")


CHECKPOINT_HELP = (
    "fine-tuned checkpoint directory, or a run directory (its newest complete checkpoint)"
)
EVAL_EPILOG = "Exit codes: 0 done; 2 bad input (one line names the file and line)."


def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evaluate",
        help="score a fine-tuned checkpoint (BLEU/chrF or accuracy/F1) on a prepared split or raw "
        "files",
        description="Score a translation model or a classifier on one source: a split of a "
        "prepared data directory (--data DIR --split), a raw labelled file for a classifier "
        "(--input: TSV/CSV with a header, JSONL or Parquet; columns by name), or two line-aligned "
        "raw files for translation (--src, --ref). Raw files are cleaned as `kiln data prepare` "
        "cleans them and tokenised with the checkpoint's own tokenizer(s). Prints the metrics as "
        "JSON; --out also writes metrics.json and predictions.jsonl.",
        epilog=EVAL_EPILOG,
    )
    p.add_argument(
        "--checkpoint", type=location, required=True, metavar="DIR", help=CHECKPOINT_HELP
    )
    p.add_argument(
        "--data",
        type=location,
        metavar="DIR",
        help="prepared data directory (output of `kiln data prepare`)",
    )
    p.add_argument("--split", metavar="NAME", help="with --data: split to score [test]")
    p.add_argument(
        "--input",
        type=location,
        metavar="FILE",
        help="classifiers: a labelled TSV/CSV/JSONL/Parquet file",
    )
    p.add_argument("--text-column", metavar="NAME", help="with --input: the text column [text]")
    p.add_argument("--label-column", metavar="NAME", help="with --input: the label column [label]")
    p.add_argument(
        "--src",
        type=location,
        metavar="FILE",
        help="translation: source file, one sentence per line",
    )
    p.add_argument(
        "--ref",
        type=location,
        metavar="FILE",
        help="translation: reference file, line-aligned with --src",
    )
    p.add_argument(
        "--beam", type=int, default=4, metavar="N", help="beam width for translation [4]"
    )
    _length_penalty_args(p, recipe=True)
    p.add_argument(
        "--out", type=location, metavar="DIR", help="write metrics.json and predictions.jsonl here"
    )


def _add_predict(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "predict",
        help="label raw text with a fine-tuned classifier: the label and every label's probability",
        description="Classify texts with a BERT [CLS], GPT last-token or biLSTM classifier "
        "checkpoint: every non-blank line of a plain-text file (or of stdin), or one column of a "
        "TSV/CSV (header), JSONL or Parquet file. Texts are cleaned as `kiln data prepare` cleans "
        "them, tokenised with the checkpoint's tokenizer and cut to the sequence length it was "
        "trained with. Writes one row per text: its line, the text, the label and prob_<label> "
        "for every label (TSV with a header, or JSONL with a `probabilities` object).",
        epilog=EVAL_EPILOG,
    )
    p.add_argument(
        "--checkpoint", type=location, required=True, metavar="DIR", help=CHECKPOINT_HELP
    )
    p.add_argument(
        "--input",
        type=location,
        metavar="FILE",
        help="texts: .txt one per line, or .tsv/.csv/.jsonl/.parquet [stdin]",
    )
    p.add_argument(
        "--column",
        metavar="NAME",
        help="the text column of a .tsv/.csv/.jsonl/.parquet input [text]",
    )
    p.add_argument(
        "--out", type=location, metavar="FILE", help="output file, .tsv or .jsonl [TSV on stdout]"
    )


def _length_penalty_args(p: argparse.ArgumentParser, recipe: bool = False) -> None:
    """Beam search ranks by logprob / lp(length): --length-penalty names lp, --alpha its strength.
    No argparse `choices`: the old form `--length-penalty 0.6` gets a one-line pointer to --alpha
    (`check_length_penalty`), not a usage dump. recipe: unset means the checkpoint's fine-tuning
    job's own `decode` setting (kiln evaluate), so the defaults are None."""
    where = "the checkpoint's recipe decode.{}, else " if recipe else ""
    p.add_argument(
        "--length-penalty",
        default=None if recipe else "gnmt",
        metavar="{" + ",".join(LENGTH_PENALTIES) + "}",
        help="length normalisation of beam scores: none, avg (length^alpha) or gnmt "
        f"(Wu et al. 2016) [{where.format('length_penalty')}gnmt]",
    )
    p.add_argument(
        "--alpha",
        type=float,
        default=None if recipe else 0.6,
        help=f"the length penalty's strength: GNMT's alpha, avg's exponent [{where.format('alpha')}0.6]",
    )


def check_length_penalty(args: argparse.Namespace) -> None:
    value = getattr(args, "length_penalty", None)
    if value is None or value in LENGTH_PENALTIES:
        return
    *others, last = LENGTH_PENALTIES
    try:
        float(value)
    except ValueError:
        raise ConfigError(
            f"--length-penalty {value!r}: choose {', '.join(others)} or {last}"
        ) from None
    raise ConfigError(
        f"--length-penalty names the penalty ({', '.join(LENGTH_PENALTIES)}); the GNMT strength "
        f"is --alpha {value}"
    )


def _add_analysis(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "analyze-beam",
        help="beam-search error analysis: search vs model errors and BLEU per beam width",
        description="Translate with each beam width; where the output differs from the reference, a search error "
        "if the model scores the reference higher (by the length-normalised score the search maximises; the raw "
        "log-prob split is reported too), else a model error. Writes analysis.json, summary.md, bleu_vs_beam.png "
        "and errors_vs_beam.png to --out.",
    )
    p.add_argument(
        "--checkpoint", type=location, required=True, help="translation checkpoint directory"
    )
    p.add_argument(
        "--data", type=location, help="prepared data directory (its translation split is read)"
    )
    p.add_argument("--split", default="test", help="with --data: split to analyse [test]")
    p.add_argument(
        "--src", type=location, help="source file, one sentence per line (instead of --data)"
    )
    p.add_argument("--ref", type=location, help="reference file, line-aligned with --src")
    p.add_argument("--beams", default="1,3,5,10", help="comma-separated beam widths [1,3,5,10]")
    p.add_argument("--limit", type=int, help="only the first N sentences")
    _length_penalty_args(p, recipe=True)
    p.add_argument("--max-len", type=int, default=64, help="longest output in tokens [64]")
    p.add_argument("--out", type=location, required=True, help="output directory")
    p = sub.add_parser(
        "attention",
        help="cross-attention heatmap PNGs of a translation checkpoint for chosen sentences",
        description="Translate each sentence with beam search and draw the last decoder layer's cross-attention "
        "(averaged over heads) on its own output: one attention_NNN.png per sentence in --out.",
    )
    p.add_argument(
        "--checkpoint", type=location, required=True, help="translation checkpoint directory"
    )
    p.add_argument("texts", nargs="*", metavar="TEXT", help="sentences to plot (or --src)")
    p.add_argument("--src", type=location, help="file with one sentence per line")
    p.add_argument("--limit", type=int, help="only the first N sentences")
    p.add_argument("--beam", type=int, default=4, help="beam width [4]")
    _length_penalty_args(p, recipe=True)
    p.add_argument("--max-len", type=int, default=64, help="longest output in tokens [64]")
    p.add_argument("--out", type=location, required=True, help="output directory")


AVERAGE_EPILOG = (
    "Exit codes: 0 done; 2 bad input (one line names the checkpoint, directory or flag: fewer than "
    "2 checkpoints, --last with a list, another model's checkpoint, an --out that exists or lies "
    "beside the checkpoints)."
)


def _add_average(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "average",
        help="average the weights of a run's last N checkpoints into one checkpoint for evaluation",
        description="Checkpoint averaging (Vaswani et al. 2017; fairseq's average_checkpoints.py): "
        "the element-wise mean of the weights of one model's checkpoints, in float64, written as "
        "a checkpoint with the newest one's config, tokenizer(s) and job config, so `kiln "
        "evaluate`, `translate` and `predict` read it as a training checkpoint. It has no trainer "
        "state: it is scored, not resumed. Give one run directory with --last N (its N newest "
        "complete checkpoints by step), or the checkpoints themselves.",
        epilog=AVERAGE_EPILOG,
    )
    p.add_argument(
        "--checkpoints",
        type=location,
        nargs="+",
        required=True,
        metavar="DIR",
        help="one run directory (with --last), or two or more checkpoint directories",
    )
    p.add_argument(
        "--last", type=int, metavar="N", help="with a run directory: average its N newest (N >= 2)"
    )
    p.add_argument(
        "--out",
        type=location,
        required=True,
        metavar="DIR",
        help="the averaged checkpoint (must not exist; not inside the run's checkpoints/)",
    )


def _add_ops(sub: argparse._SubParsersAction) -> None:
    _add_average(sub)
    p = sub.add_parser(
        "export", help="export a checkpoint (safetensors) for Hugging Face transformers"
    )
    p.add_argument("--checkpoint", type=location, required=True, help="Kiln checkpoint directory")
    p.add_argument("--format", choices=["hf"], default="hf", help="target format [hf]")
    p.add_argument(
        "--out", type=location, required=True, help="output directory (must not exist or be empty)"
    )
    p = sub.add_parser(
        "submit", help="submit a pretrain/finetune/data job to a Ray cluster (Ray Jobs API)"
    )
    p.add_argument(
        "command_name",
        choices=["pretrain", "finetune", "data-prepare"],
        help="which kiln command to run",
    )
    _config_args(p, "output directory on the cluster [runs/<command>]")
    p.add_argument(
        "--address", help="Ray dashboard address, e.g. http://127.0.0.1:8265 [RAY_ADDRESS]"
    )
    p.add_argument(
        "--max-upload-mib",
        type=float,
        default=100.0,
        help="refuse to upload a working directory larger than this [100]",
    )
    p = sub.add_parser("jobs", help="list, inspect, follow and stop Ray jobs")
    p.add_argument("action", choices=["list", "status", "logs", "stop"])
    p.add_argument("job_id", nargs="?", help="submission id (status, logs, stop)")
    p.add_argument("--follow", action="store_true", help="with logs: stream until the job ends")
    p.add_argument("--address", help="Ray dashboard address [RAY_ADDRESS or http://127.0.0.1:8265]")


def _add_cluster(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "cluster", help="start, stop and inspect a local Ray head for job submission"
    )
    csub = p.add_subparsers(dest="cluster_command", metavar="{up,down,status}", required=True)
    up = csub.add_parser(
        "up", help="start a Ray head (127.0.0.1 unless --allow-remote) with token authentication"
    )
    up.add_argument("--host", default="127.0.0.1", help="address to listen on [127.0.0.1]")
    up.add_argument(
        "--allow-remote",
        action="store_true",
        help="allow a --host beyond loopback (read the warning)",
    )
    up.add_argument("--port", type=int, default=6379, help="GCS port [6379]")
    up.add_argument(
        "--dashboard-port", type=int, default=8265, help="dashboard / Jobs API port [8265]"
    )
    up.add_argument("--num-cpus", type=int, help="CPUs the head offers [all]")
    up.add_argument("--num-gpus", type=int, help="GPUs the head offers [all]")
    csub.add_parser("down", help="stop the head `kiln cluster up` started (no other Ray process)")
    st = csub.add_parser("status", help="alive nodes, resources and running jobs")
    st.add_argument("--address", help="a cluster's dashboard address [the local head]")
    p = sub.add_parser(
        "render",
        help="write a KubeRay RayJob manifest or a SLURM sbatch script from a config",
        epilog=EPILOG,
    )
    p.add_argument("target", choices=["kuberay", "slurm"])
    p.add_argument("--config", type=location, help="YAML recipe of a pretrain or finetune job")
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="dotted overrides, e.g. cluster.num_workers=8",
    )
    p.add_argument(
        "--print-config", action="store_true", help="print the resolved config as YAML and exit"
    )
    p.add_argument("--out", type=location, required=True, help="file to write (manifest or script)")
    p.add_argument(
        "--job-out",
        help="the job's output directory on the cluster (shared storage) [runs/<command>]",
    )
    p.add_argument("--name", help="job name [kiln-<command>]")
    p.add_argument("--image", help="kuberay: container image with Kiln and its dependencies")
    p.add_argument("--namespace", help="kuberay: Kubernetes namespace")
    p.add_argument(
        "--code-dir",
        default="/kiln",
        help="kuberay: where the image holds the Kiln project [/kiln]",
    )
    p.add_argument("--worker-memory", default="8Gi", help="kuberay: memory per worker pod [8Gi]")
    p.add_argument(
        "--s3-secret",
        default="kiln-s3",
        help="kuberay: Kubernetes Secret holding the pods' S3 credentials [kiln-s3]",
    )
    p.add_argument(
        "--nodes", type=int, help="slurm: nodes to allocate (the first also runs the Ray head)"
    )
    p.add_argument("--time", default="04:00:00", help="slurm: time limit [04:00:00]")
    p.add_argument("--partition", help="slurm: partition")
    p.add_argument(
        "--venv", help="slurm: virtualenv to activate on every node [this project's .venv]"
    )
    p = sub.add_parser("wandb", help="Weights & Biases helpers")
    wsub = p.add_subparsers(dest="wandb_command", metavar="{sync}", required=True)
    sync = wsub.add_parser(
        "sync", help="upload the offline W&B runs under an output directory (`wandb sync`)"
    )
    sync.add_argument(
        "out_dir", type=location, help="a run's (or the quickstart's) output directory"
    )
    sync.add_argument("--dry-run", action="store_true", help="list what would be uploaded")


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
    p.add_argument(
        "--overwrite", action="store_true", help="replace OUT if an earlier Kiln run wrote it"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kiln",
        description="Kiln: distributed pretraining and fine-tuning of Transformer language models.",
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    parser.add_argument("--verbose", action="store_true", help=VERBOSE_HELP)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in (_add_data, _add_training, _add_eval, _add_ops, _add_cluster, _add_quickstart):
        add(sub)
    _verbose_everywhere(sub)
    return parser


def _verbose_everywhere(sub: argparse._SubParsersAction) -> None:
    """`kiln pretrain ... --verbose` (and `kiln data prepare ... --verbose`) as well as `kiln --verbose ...`;
    SUPPRESS: a subcommand without the flag leaves the top level's value alone."""
    for command in sub.choices.values():
        command.add_argument(
            "--verbose", action="store_true", default=argparse.SUPPRESS, help=VERBOSE_HELP
        )
        for action in command._actions:
            if isinstance(action, argparse._SubParsersAction):
                _verbose_everywhere(action)


VERBOSE_HELP = (
    "also show Ray's and W&B's own output (Ray start-up, worker stdout/stderr with their (pid=...) "
    "prefixes, warnings) on the console; it is always written to <out>/logs/ray.log"
)


# subcommand -> "module:function" of its handler, imported when the command runs (module docstring).
# cluster.commands' job configs import torch; the commands that only talk to a Ray cluster or to W&B
# have their handlers elsewhere, so `kiln jobs list` answers in a second instead of several.
HANDLERS: dict[str, str] = {
    "data": "cluster.commands:cmd_data_prepare",
    "pretrain": "cluster.commands:cmd_pretrain",
    "finetune": "cluster.commands:cmd_finetune",
    "evaluate": "cluster.commands:cmd_evaluate",
    "predict": "cluster.commands:cmd_predict",
    "translate": "cluster.commands:cmd_translate",
    "analyze-beam": "cluster.commands:cmd_analyze_beam",
    "attention": "cluster.commands:cmd_attention",
    "lm-baseline": "cluster.commands:cmd_lm_baseline",
    "average": "cluster.commands:cmd_average",
    "export": "cluster.commands:cmd_export",
    "submit": "cluster.commands:cmd_submit",
    "render": "cluster.commands:cmd_render",
    "quickstart": "cluster.commands:cmd_quickstart",
    "cluster": "cluster.local:cmd_cluster",
    "jobs": "cluster.submit:cmd_jobs",
    "wandb": "cluster.tracking:cmd_wandb",
}


def _handler(args: argparse.Namespace) -> Callable[[argparse.Namespace], int | None]:
    module, function = HANDLERS[args.command].split(":")
    return getattr(importlib.import_module(module), function)


def _user_errors() -> tuple[type[BaseException], ...]:
    # Imported once an error is raised: these modules import torch and Ray.
    from data_pipeline.raystart import RayStartError
    from pretrain.checkpoint import CheckpointError

    return (*USER_ERRORS, CheckpointError, RayStartError)


# Path arguments left as written: --config is read here at once and named so in messages (and
# `submit` / `render` pass it on, relative to the uploaded project); submit's --out: the cluster.
KEEP_AS_WRITTEN = {"config"}
REMOTE_PATH_ARGS = {"submit": {"out"}}


# Commands whose --out may be a URI (the run or data goes to object storage); the others write
# local files (a report, predictions, an exported model) and refuse one with a clear line.
URI_OUT_COMMANDS = {"data", "pretrain", "finetune", "lm-baseline", "average", "submit"}
# Input files fetched from a URI into the local cache before a command reads them.
URI_INPUT_FILES = ("config", "src", "ref", "input")


def resolve_path_args(args: argparse.Namespace) -> None:
    """Relative path arguments made absolute against the working directory, as config paths are
    (cluster.config); `--checkpoint` given a run directory means its newest complete checkpoint
    (a remote one is fetched and verified); input files given as URIs are fetched."""
    remote = KEEP_AS_WRITTEN | REMOTE_PATH_ARGS.get(args.command, set())
    for name, value in vars(args).items():
        if isinstance(value, Path) and name not in remote:
            setattr(args, name, Path(absolute_path(str(value))))
        elif isinstance(value, list) and name not in remote:  # nargs="+" (average's --checkpoints)
            absolute = [Path(absolute_path(str(v))) if isinstance(v, Path) else v for v in value]
            setattr(args, name, absolute)
    out = getattr(args, "out", None)
    if isinstance(out, str) and args.command not in URI_OUT_COMMANDS:
        raise ConfigError(
            f"--out {out}: `kiln {args.command}` writes local files; give a local path"
        )
    for name in URI_INPUT_FILES:
        if isinstance(getattr(args, name, None), str):
            from data_pipeline.storage import local_copy  # pyarrow: only for a URI

            setattr(args, name, local_copy(getattr(args, name)))
    if isinstance(getattr(args, "checkpoint", None), (Path, str)):
        from pretrain.checkpoint import (
            resolve_checkpoint,
        )  # imports torch: only when a command reads one

        args.checkpoint = resolve_checkpoint(
            args.checkpoint, warn=lambda msg: print(msg, file=sys.stderr)
        )


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
    if (
        args.verbose
    ):  # read where Ray starts (data_pipeline.raystart) and by W&B setup (cluster.tracking)
        os.environ["KILN_VERBOSE"] = "1"
    if args.command in ("submit", "jobs", "cluster"):
        from cluster.submit import use_token_auth_if_available

        use_token_auth_if_available()
    try:
        check_length_penalty(args)
        resolve_path_args(args)
        code = _handler(args)(args)
    except KeyboardInterrupt:
        print("kiln: interrupted", file=sys.stderr)
        sys.exit(130)
    except (
        Preempted
    ) as stopped:  # a clean stop with a checkpoint: the exit code tells a scheduler to run it again
        print(str(stopped), flush=True)
        sys.exit(EXIT_PREEMPTED)
    except Exception as err:  # noqa: BLE001 — the filter below decides what is a user error
        # USER_ERRORS first: the other user-error classes live in modules that import torch.
        if args.debug or not (isinstance(err, USER_ERRORS) or isinstance(err, _user_errors())):
            raise
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        print(f"kiln: error: {message}", file=sys.stderr)
        sys.exit(2)
    sys.exit(code or 0)
