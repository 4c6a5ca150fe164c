"""Translation quality at a fixed CPU time budget: every from-scratch architecture on Multi30k German→English.

    .venv/bin/python benchmarks/translation_quality.py [--minutes 5] [--arches transformer,lstm,...] [--threads 2]

Data: `kiln data prepare --config configs/data-multi30k.yaml` (train.de/train.en, one 8,000-token byte-level BPE
for both languages), made once under --work. Each architecture (its `small` preset, Kiln's TranslationModule loss
with label smoothing 0.1, AdamW with Kiln's warmup + linear decay over the steps the budget is expected to allow)
trains in this process for --minutes of wall time on --threads threads, then translates the official
test_2016_flickr set (1,000 sentences) with beam 5 (GNMT length penalty, alpha 0.6); sacrebleu BLEU and chrF on
the detokenised output. Architectures run one after another, so each gets the machine alone: the budget is the
same, the load is not (recorded per row). Writes benchmarks/results/translation_quality.md.

Published small-model BLEU on this test set (GPU, greedy, many epochs): LSTM ~14, Bahdanau attention ~28, ConvS2S
~34, Transformer ~36.5. A few CPU minutes are a small fraction of one epoch; the table says how far that gets.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cluster.config import load_config  # noqa: E402
from cluster.jobs import FinetuneJob, PrepareJob, PretrainJob  # noqa: E402

MULTI30K = ROOT.parent / "shared" / "data" / "multi30k" / "raw"
ARCHES = {
    "transformer": ["model.arch=transformer", "model.preset=small"],
    "lstm": ["model.arch=lstm", "model.preset=small"],
    "lstm_attention (bahdanau)": [
        "model.arch=lstm_attention",
        "model.attention=bahdanau",
        "model.preset=small",
    ],
    "lstm_attention (luong_general)": [
        "model.arch=lstm_attention",
        "model.attention=luong_general",
        "model.preset=small",
    ],
    "convs2s": ["model.arch=convs2s", "model.preset=small"],
}


def prepared(work: Path) -> Path:
    from data_pipeline.prepare import prepare

    out = work / "multi30k"
    if not (out / "manifest.json").is_file():
        job = load_config(
            PrepareJob,
            ROOT / "configs" / "data-multi30k.yaml",
            [f"data.paths=[{MULTI30K / 'train.de'}, {MULTI30K / 'train.en'}]"],
        )
        prepare(job.data, out)
    return out


def train_for(
    job: FinetuneJob | PretrainJob,
    minutes: float,
    log_every: int = 50,
    max_steps: int | None = None,
    fresh_weights: bool = False,
    losses: list[float] | None = None,
) -> tuple[torch.nn.Module, int, float]:
    """Train in this process until the budget (or max_steps) is spent; returns (model, steps, final train loss).
    fresh_weights: re-initialise the built model (a warm-started architecture trained from scratch instead);
    losses: a list every step's training loss is appended to."""
    from cluster.tasks import TASKS, preflight

    if fresh_weights and job.optim.pretrained_lr_ratio != 1:
        # re-initialised, the "pretrained" parameters are random: a ratio would scale the wrong ones
        raise ValueError(
            "optim.pretrained_lr_ratio: must be 1 with fresh_weights (nothing is pretrained)"
        )
    job = preflight(job)
    torch.manual_seed(job.trainer.seed)
    parts = TASKS[job.task](job, 0, 1)
    module = parts.module
    if fresh_weights:
        module.model.init_weights()
    opt_cfg = module.configure_optimizers()
    optimizer, scheduler = opt_cfg["optimizer"], opt_cfg["lr_scheduler"]["scheduler"]
    module.model.train()
    deadline, steps, loss = time.monotonic() + 60 * minutes, 0, float("nan")
    while time.monotonic() < deadline and steps != max_steps:
        for batch in parts.train_loader:
            module.manual_step = (
                steps  # scheduled sampling's step (TranslationModule) without a Trainer
            )
            out = module.compute(batch, "train")
            optimizer.zero_grad(set_to_none=True)
            out["loss"].backward()
            torch.nn.utils.clip_grad_norm_(module.model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            steps, loss = steps + 1, out["loss"].item()
            if losses is not None:
                losses.append(loss)
            if steps % log_every == 0:
                print(f"  step {steps} loss {loss:.3f}", flush=True)
            if time.monotonic() >= deadline or steps == max_steps:
                break
    return module.model.eval(), steps, loss


def score(model: torch.nn.Module, data_dir: Path, limit: int | None = None) -> dict[str, float]:
    """BLEU/chrF on test_2016_flickr (its first `limit` sentences when given: smoke runs only)."""
    from tokenizers import Tokenizer

    from finetune.translate import evaluate_translation

    tokenizer = Tokenizer.from_file(str(data_dir / "tokenizer.json"))
    srcs = (MULTI30K / "test_2016_flickr.de").read_text(encoding="utf-8").splitlines()[:limit]
    refs = (MULTI30K / "test_2016_flickr.en").read_text(encoding="utf-8").splitlines()[:limit]
    start = time.perf_counter()
    scores, _ = evaluate_translation(
        model,
        tokenizer,
        srcs,
        refs,
        beam_size=5,
        length_penalty="gnmt",
        alpha=0.6,
        max_len=64,
        batch_size=64,
    )
    return {**scores, "decode_s": time.perf_counter() - start}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--minutes", type=float, default=5.0, help="training wall time per architecture"
    )
    parser.add_argument(
        "--arches", default=",".join(ARCHES), help="comma-separated names from the table"
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--steps-hint", type=int, default=1500, help="the LR schedule's length (steps)"
    )
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "bench-translation")
    parser.add_argument(
        "--out", type=Path, default=ROOT / "benchmarks" / "results" / "translation_quality.md"
    )
    args = parser.parse_args(argv)
    if not MULTI30K.is_dir():
        print(
            f"{MULTI30K}: not found (../shared/data is needed for this benchmark)", file=sys.stderr
        )
        return 2
    torch.set_num_threads(args.threads)
    data = prepared(args.work)
    rows = []
    for name in args.arches.split(","):
        job = load_config(
            FinetuneJob,
            None,
            [
                f"data_dir={data}",
                "task=translation",
                "trainer.batch_size=64",
                f"trainer.max_steps={args.steps_hint}",
                "optim.lr=0.001",
                "optim.warmup_steps=100",
                *ARCHES[name],
            ],
        )
        load = os.getloadavg()[0]
        print(f"[{name}] training for {args.minutes} min", flush=True)
        model, steps, loss = train_for(job, args.minutes)
        params = sum(p.numel() for p in model.parameters())
        rows.append(
            {
                "arch": name,
                "params": params,
                "steps": steps,
                "loss": loss,
                "load": load,
                **score(model, data),
            }
        )
        print(f"[{name}] {rows[-1]}", flush=True)
    text = report(args, rows)
    args.out.write_text(text)
    print(text)
    return 0


def report(args: argparse.Namespace, rows: list[dict]) -> str:
    lines = [
        "# Translation quality at a fixed CPU budget: Multi30k de→en, test_2016_flickr",
        "",
        f"- date: {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC; machine: {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores; torch {torch.__version__}",
        f"- command: `.venv/bin/python benchmarks/translation_quality.py --minutes {args.minutes} --threads "
        f"{args.threads}`",
        f"- budget: {args.minutes} min of training per architecture on {args.threads} threads, batch 64, `small` "
        "presets; beam 5, GNMT length penalty alpha 0.6; BLEU/chrF by sacrebleu on detokenised output",
        "",
        "| architecture | params | steps in budget | final train loss | BLEU | chrF | decode s | load at start |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['arch']} | {r['params'] / 1e6:.1f} M | {r['steps']} | {r['loss']:.2f} | {r['bleu']:.1f} | "
            f"{r['chrf']:.1f} | {r['decode_s']:.0f} | {r['load']:.1f} |"
        )
    copy = rows[0]["copy_source_bleu"] if rows else float("nan")
    lines += ["", f"Copying the German source scores BLEU {copy:.1f}."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
