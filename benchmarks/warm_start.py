"""Warm-started Transformer vs the same architecture from scratch: Multi30k German→English at a fixed number of steps.

    nice -n 10 .venv/bin/python benchmarks/warm_start.py [--pretrain-steps 150] [--finetune-steps 150] \
        [--sampling 0.25] [--threads 1]

1. Data: Multi30k with the recipe of configs/data-multi30k.yaml (one 8,000-token BPE for both languages; made once
   under --work by benchmarks/translation_quality.py's `prepared`). The pretraining text is the same 29,000 training
   pairs, one sentence per document, tokenised with that same tokenizer (`data.tokenizer_path`), so the BERT, the
   GPT and the translation model index one vocabulary: BERT (MLM + NSP) reads the German and the English side, GPT
   (causal LM) the English side, the language its decoder will write.
2. Pretraining in this process (no Ray; the same TASKS builders and losses `kiln pretrain` runs): a BERT and a GPT
   of 3 layers × 256 (the `mini` presets with 3 layers, so the translation model matches the `small` scratch
   Transformer of translation_quality.py: 3 + 3 layers × 256), each for --pretrain-steps steps of 64 rows.
3. Fine-tuning, each for exactly --finetune-steps steps of 64 pairs (steps, not minutes: the machine is shared, and
   a step count keeps the comparison fair whatever the load): (a) the warm-started model (task translation with
   encoder_checkpoint / decoder_checkpoint: BERT encoder, GPT decoder, fresh cross-attention); (b) the very same
   model re-initialised at random (`init_weights()`: same shapes, same data order, same hyper-parameters);
   (c) with --sampling P > 0, (a) again with scheduled sampling rising linearly to P over the run.
4. Each scored on the official test_2016_flickr set (1,000 sentences) with beam 5, GNMT alpha 0.6, sacrebleu BLEU
   and chrF on detokenised output (translation_quality.score). Writes benchmarks/results/warm_start.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.translation_quality import MULTI30K, prepared, score, train_for  # noqa: E402
from cluster.config import load_config  # noqa: E402
from cluster.jobs import FinetuneJob, PrepareJob, PretrainJob  # noqa: E402

NO_LIMIT = 10.0**6  # minutes: these runs end on their step count
# The pretraining corpora: (task, files of ../shared/data/multi30k/raw, model overrides).
PRETRAIN = {
    "bert": (
        "mlm_nsp",
        ["train.de", "train.en"],
        ["model.arch=bert", "model.preset=mini", "model.num_hidden_layers=3"],
    ),
    "gpt": ("clm", ["train.en"], ["model.arch=gpt", "model.preset=mini", "model.n_layer=3"]),
}


def pretraining_data(work: Path, name: str, translation_data: Path) -> Path:
    """The sentences of the training files as documents for `name`'s task, in the translation data's vocabulary."""
    from data_pipeline.prepare import prepare

    task, files, _ = PRETRAIN[name]
    out = work / f"{name}-text"
    if not (out / "manifest.json").is_file():
        paths = ", ".join(str(MULTI30K / f) for f in files)
        job = load_config(
            PrepareJob,
            None,
            [
                "data.source=text",
                f"data.paths=[{paths}]",
                "data.text_unit=line",
                f"data.tasks=[{task}]",
                f"data.tokenizer_path={translation_data / 'tokenizer.json'}",
                "data.seq_len=64",
            ],
        )
        prepare(job.data, out)
    return out


def pretrain(work: Path, name: str, data: Path, steps: int) -> dict:
    """Pretrain `name` in this process for `steps` steps; save it as a Kiln checkpoint. Returns a report row."""
    from pretrain.checkpoint import save_checkpoint

    task, _, model_overrides = PRETRAIN[name]
    job = load_config(
        PretrainJob,
        None,
        [
            f"data_dir={data}",
            f"task={task}",
            "trainer.batch_size=64",
            f"trainer.max_steps={steps}",
            "optim.lr=0.001",
            f"optim.warmup_steps={max(1, steps // 10)}",
            *model_overrides,
        ],
    )
    losses: list[float] = []
    start, load = time.monotonic(), os.getloadavg()[0]
    print(f"[pretrain {name}] {steps} steps", flush=True)
    model, done, _ = train_for(job, NO_LIMIT, max_steps=steps, losses=losses)
    checkpoint = save_checkpoint(
        work / name, model, model.config, data / "tokenizer.json", overwrite=True
    )
    return {
        "name": name,
        "task": task,
        "steps": done,
        "params": sum(p.numel() for p in model.parameters()),
        "first": statistics.fmean(losses[:10]),
        "last": statistics.fmean(losses[-10:]),
        "minutes": (time.monotonic() - start) / 60,
        "load": load,
        "checkpoint": checkpoint,
    }


def finetune(
    data: Path,
    checkpoints: dict[str, Path],
    name: str,
    steps: int,
    fresh: bool,
    sampling: float,
    limit: int | None,
) -> dict:
    """Fine-tune the warm-started architecture (from the checkpoints, or re-initialised) and score it."""
    job = load_config(
        FinetuneJob,
        None,
        [
            f"data_dir={data}",
            "task=translation",
            f"encoder_checkpoint={checkpoints['bert']}",
            f"decoder_checkpoint={checkpoints['gpt']}",
            "trainer.batch_size=64",
            f"trainer.max_steps={steps}",
            "optim.lr=0.001",
            f"optim.warmup_steps={max(1, steps // 10)}",
            f"scheduled_sampling={sampling}",
        ],
    )
    losses: list[float] = []
    start, load = time.monotonic(), os.getloadavg()[0]
    print(f"[{name}] {steps} steps", flush=True)
    model, done, _ = train_for(job, NO_LIMIT, max_steps=steps, fresh_weights=fresh, losses=losses)
    minutes = (time.monotonic() - start) / 60
    row = {
        "name": name,
        "steps": done,
        "params": sum(p.numel() for p in model.parameters()),
        "load": load,
        "first": statistics.fmean(losses[:10]),
        "last": statistics.fmean(losses[-10:]),
        "minutes": minutes,
        **score(model, data, limit),
    }
    print(f"[{name}] {row}", flush=True)
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--pretrain-steps", type=int, default=150, help="steps of 64 rows for the BERT and the GPT"
    )
    parser.add_argument(
        "--finetune-steps", type=int, default=150, help="steps of 64 pairs for each translation run"
    )
    parser.add_argument(
        "--sampling",
        type=float,
        default=0.25,
        help="scheduled sampling's maximum p for a third run (warm-started); 0 = no third run",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="1: on a machine shared with others, 2 threads ran 2.5x slower per step (spin-waiting)",
    )
    parser.add_argument(
        "--test-limit", type=int, default=None, help="score only this many test sentences (smoke)"
    )
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "bench-translation")
    parser.add_argument(
        "--out", type=Path, default=ROOT / "benchmarks" / "results" / "warm_start.md"
    )
    args = parser.parse_args(argv)
    if not MULTI30K.is_dir():
        print(
            f"{MULTI30K}: not found (../shared/data is needed for this benchmark)", file=sys.stderr
        )
        return 2
    torch.set_num_threads(args.threads)
    started = time.monotonic()
    data = prepared(args.work)
    pre = [
        pretrain(
            args.work / "warm-start",
            name,
            pretraining_data(args.work, name, data),
            args.pretrain_steps,
        )
        for name in PRETRAIN
    ]
    checkpoints = {row["name"]: row["checkpoint"] for row in pre}
    runs = [
        ("warm-started (BERT encoder + GPT decoder)", False, 0.0),
        ("same architecture from scratch", True, 0.0),
    ]
    if args.sampling > 0:
        runs.append(
            (
                f"warm-started + scheduled sampling (linear to p={args.sampling:g})",
                False,
                args.sampling,
            )
        )
    rows = [
        finetune(data, checkpoints, name, args.finetune_steps, fresh, p, args.test_limit)
        for name, fresh, p in runs
    ]
    text = report(args, pre, rows, (time.monotonic() - started) / 60)
    args.out.write_text(text)
    print(text)
    return 0


def report(args: argparse.Namespace, pre: list[dict], rows: list[dict], minutes: float) -> str:
    command = (
        f"nice -n 10 .venv/bin/python benchmarks/warm_start.py --pretrain-steps {args.pretrain_steps} "
        f"--finetune-steps {args.finetune_steps} --sampling {args.sampling:g} --threads {args.threads}"
    )
    test = f"first {args.test_limit} sentences of the " if args.test_limit else "the "
    lines = [
        "# Warm-started Transformer vs the same architecture from scratch: Multi30k de→en, test_2016_flickr",
        "",
        f"- date: {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC; machine: {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores, {args.threads} thread(s), shared with other jobs (load at each start below); "
        f"torch {torch.__version__}; the whole command took {minutes:.0f} min",
        f"- command: `{command}`",
        "- pretraining (in process, batch 64, AdamW 1e-3, 10% warm-up then linear decay), on the Multi30k training "
        "sentences, one per document, with the translation data's 8,000-token BPE:",
        "",
        "| model | objective, text | params | steps | loss, first 10 steps | loss, last 10 steps | minutes | load |",
        "|---|---|---|---|---|---|---|---|",
    ]
    texts = {"mlm_nsp": "MLM + NSP, German + English", "clm": "causal LM, English"}
    for r in pre:
        lines.append(
            f"| {r['name'].upper()} 3 × 256 | {texts[r['task']]} | {r['params'] / 1e6:.1f} M | {r['steps']} | "
            f"{r['first']:.2f} | {r['last']:.2f} | {r['minutes']:.1f} | {r['load']:.1f} |"
        )
    lines += [
        "",
        f"- fine-tuning: {args.finetune_steps} steps of 64 pairs each (label smoothing 0.1, AdamW 1e-3, 10% "
        f"warm-up then linear decay); scored on {test}test_2016_flickr set, beam 5, GNMT length penalty alpha "
        "0.6, sacrebleu on detokenised output",
        "",
        "| model | params | steps | train loss, first 10 | train loss, last 10 | BLEU | chrF | minutes | load |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['name']} | {r['params'] / 1e6:.1f} M | {r['steps']} | {r['first']:.2f} | {r['last']:.2f} | "
            f"{r['bleu']:.1f} | {r['chrf']:.1f} | {r['minutes']:.1f} | {r['load']:.1f} |"
        )
    copy = rows[0]["copy_source_bleu"] if rows else float("nan")
    lines += [
        "",
        f"Copying the German source scores BLEU {copy:.1f}. Training losses are label-smoothed (0.1) and "
        "include scheduled sampling's mixed inputs where it is on.",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
