"""Does pretraining pay? A BERT pretrained on other text vs the same architecture from random initialisation, on SST-2.

    kiln data prepare --config configs/data-wikitext2-bert.yaml --out runs/wikitext2-bert
    kiln pretrain --config configs/bert-mini-wikitext2-60min.yaml --out runs/bert-mini-wikitext2-60min
    nice -n 10 .venv/bin/python benchmarks/pretraining_pays.py --encoder runs/bert-mini-wikitext2-60min

The encoder never saw SST-2: it is pretrained (MLM, with or without NSP) on WikiText-2's articles, or on those and
Tatoeba's English sentences (configs/bert-mini-wikitext2-tatoeba-mlm-60min.yaml); the report names the files from
the checkpoint's data manifest. SST-2
(`../shared/data/sst2/train.tsv`) is prepared by `configs/data-sst2.yaml` with the encoder's own tokenizer.json
(`data.tokenizer_path`), so its ids are the pretraining vocabulary's; its seeded 5% validation split is the score.
Two label budgets share that validation split: every training phrase, and a seeded cut of `--few` of them
(written as a TSV beside the held-out rows and prepared again; the script checks the validation rows are identical).

Each (label budget, initialisation, seed) cell fine-tunes a [CLS] classifier (configs/classification.yaml; with
`--pooling mean` it reads the real tokens' mean, `classifier_pooling`) for a fixed number of steps of the same
batches: "pretrained" loads the encoder, "random init" is that same model with every weight re-initialised
(`init_weights`, seeded), so architecture, data order, dropout and head init match. Each initialisation picks its
learning rate from --lrs on the small cut. `--pretrained-lr-ratio R` trains the pretrained cells' encoder at lr x R
and their new head at lr (`optim.pretrained_lr_ratio`; 0 freezes the encoder); random-init cells have no pretrained
parameters and train everything at lr. `--jobs` cells run at once, each in its own process with 1 thread. Writes
benchmarks/results/pretraining_pays.md and its PNG.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime as dt
import json
import math
import os
import random
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.cells import plot_grid, run_cells, train_cell  # noqa: E402
from benchmarks.cells import verdict as cells_verdict  # noqa: E402
from benchmarks.classification_quality import finetune_job, split_rows  # noqa: E402

SST2 = ROOT.parent / "shared" / "data" / "sst2" / "train.tsv"
CONFIGS = ROOT / "configs"
INITS = ("pretrained", "random init")


@dataclass(frozen=True)
class Cell:
    labels: str  # "all" or the size of the cut, e.g. "1000"
    init: str  # one of INITS
    seed: int
    steps: int
    lr: float
    data_dir: str
    encoder: str
    pretrained_lr_ratio: float = 1.0  # the encoder's lr is lr x this (pretrained cells only)
    pooling: str = "cls"  # classifier_pooling: [CLS] through the pooler, or the real tokens' mean


def encoder_tokenizer(checkpoint: Path) -> Path:
    """The tokenizer.json saved in the encoder's checkpoint."""
    from pretrain.checkpoint import CheckpointError

    path = checkpoint / "tokenizer.json"
    if not path.is_file():
        raise CheckpointError(f"{path}: not found; --encoder needs a Kiln BERT run or checkpoint")
    return path


def pretraining_text(checkpoint: Path) -> str:
    """The files the encoder was pretrained on, by name, as its checkpoint's data manifest records them
    (`data.paths` of the prepare); "not recorded" when the manifest is gone or names none."""
    manifest = json.loads((checkpoint / "manifest.json").read_text())
    data = Path((manifest.get("data_manifest") or {}).get("path", ""))
    if not data.is_file():
        return "not recorded"
    paths = json.loads(data.read_text()).get("config", {}).get("paths") or []
    return ", ".join(f"`{Path(p).parent.name}/{Path(p).name}`" for p in paths) or "not recorded"


def prepare_sst2(source: Path, out: Path, tokenizer: Path) -> Path:
    """SST-2 prepared with `tokenizer` into `out`, once: a later run reuses it only if it holds the same vocabulary
    (another --encoder's tokenizer would give other ids)."""
    from cluster.config import load_config
    from cluster.jobs import PrepareJob
    from data_pipeline.errors import DataError
    from data_pipeline.prepare import prepare

    if (out / "manifest.json").is_file():
        if (out / "tokenizer.json").read_bytes() != tokenizer.read_bytes():
            raise DataError(
                f"{out}: prepared with another tokenizer than {tokenizer}; use another --work or delete it"
            )
        return out
    job = load_config(
        PrepareJob,
        CONFIGS / "data-sst2.yaml",
        [f"data.paths=[{source}]", f"data.tokenizer_path={tokenizer}"],
    )
    prepare(job.data, out, progress=lambda line: print(f"  {line}", flush=True))
    return out


def write_cut(full: Path, n: int, seed: int, out: Path) -> Path:
    """A TSV of `n` seeded training phrases plus every held-out one (which the hash split puts back in place)."""
    from data_pipeline.errors import DataError

    train = split_rows(full, "train")
    if n > len(train):
        raise DataError(f"--few {n}: the training split has only {len(train)} phrases")
    rows = random.Random(seed).sample(train, n)
    rows += split_rows(full, "validation") + split_rows(full, "test")
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, delimiter="\t", quoting=csv.QUOTE_NONE, escapechar="\\")
        writer.writerow(["sentence", "label"])
        writer.writerows((text, label) for text, label in rows)
    return out


def check_cut(full: Path, cut: Path, n: int) -> None:
    from data_pipeline.errors import DataError

    if sorted(split_rows(full, "validation")) != sorted(split_rows(cut, "validation")):
        raise DataError(f"{full} and {cut}: validation splits differ; delete {cut} and rerun")
    if len(split_rows(cut, "train")) != n:
        raise DataError(f"{cut}: expected {n} training phrases; delete it and rerun")


def scores(model: object, data_dir: Path, split: str) -> dict[str, float]:
    """Accuracy and macro-F1 of `model` on one split of a prepared classification directory."""
    import torch

    from data_pipeline.loader import make_loader
    from finetune.evaluate import classification_report, predict_labels

    loader = make_loader(data_dir, "classification", split, 256, shuffle=False, drop_last=False)
    with torch.no_grad():
        preds, gold = predict_labels(model, loader)
    report = classification_report(preds, gold, num_classes=2)
    return {"accuracy": report["accuracy"], "macro_f1": report["macro_f1"]}


def run_cell(cell: Cell, batch_size: int) -> dict:
    """Fine-tune one cell in this (worker) process; score it on the validation and test splits."""
    import torch

    torch.set_num_threads(1)
    job = finetune_job(
        Path(cell.data_dir),
        cell.steps,
        batch_size,
        cell.lr,
        [
            f"encoder_checkpoint={cell.encoder}",
            f"trainer.seed={cell.seed}",
            f"optim.pretrained_lr_ratio={cell.pretrained_lr_ratio}",
            f"classifier_pooling={cell.pooling}",
        ],
    )
    model, row = train_cell(job, cell, fresh=cell.init == "random init")
    for split in ("validation", "test"):
        row.update(
            {f"{split}_{k}": v for k, v in scores(model, Path(cell.data_dir), split).items()}
        )
    print(
        f"[{cell.labels} labels, {cell.init}, lr {lr_text(dataclasses.asdict(cell))}, seed {cell.seed}] "
        "validation accuracy "
        f"{row['validation_accuracy']:.4f}, test {row['test_accuracy']:.4f} in {row['minutes']:.1f} min "
        f"(load {row['load']:.2f} at start)",
        flush=True,
    )
    return row


def features(model: object, data_dir: Path, split: str) -> tuple[object, object]:
    """Mean-pooled last hidden states of a frozen classifier's encoder, and the labels."""
    import numpy as np
    import torch

    from data_pipeline.loader import make_loader
    from finetune.models.classifier import mean_over_real

    loader = make_loader(data_dir, "classification", split, 256, shuffle=False, drop_last=False)
    feats, labels = [], []
    with torch.no_grad():
        for batch in loader:
            seq, _ = model.bert(batch["input_ids"], attention_mask=batch["attention_mask"])
            feats.append(mean_over_real(seq, batch["attention_mask"]).numpy())
            labels.append(batch["labels"].numpy())
    return np.concatenate(feats), np.concatenate(labels)


def probe(checkpoint: Path, cut: Path, seeds: list[int]) -> dict[str, float]:
    """Is there sentiment in the frozen features? A logistic regression on each encoder's mean-pooled states
    of the small cut's training phrases, scored on test: pretrained, and random init (mean over `seeds`)."""
    import torch
    from sklearn.linear_model import LogisticRegression

    from finetune.models.classifier import EncoderClassifier

    out: dict[str, list[float]] = {init: [] for init in INITS}
    for init, seed in [("pretrained", seeds[0])] + [("random init", s) for s in seeds]:
        model, _ = EncoderClassifier.from_pretrained(checkpoint, 2)
        if init == "random init":
            torch.manual_seed(seed)
            model.init_weights()
        model.eval()
        (x, y), (tx, ty) = features(model, cut, "train"), features(model, cut, "test")
        out[init].append(LogisticRegression(max_iter=2000).fit(x, y).score(tx, ty))
    return {init: statistics.mean(accs) for init, accs in out.items()}


def lr_text(row: dict) -> str:
    """The cell's learning rate, and the encoder's share of it where that is not all of it."""
    ratio = row["pretrained_lr_ratio"]
    return f"{row['lr']:g}" + ("" if ratio == 1 else f" (encoder × {ratio:g})")


def group(rows: list[dict], labels: str, init: str, lr: float | None = None) -> list[dict]:
    return [
        r
        for r in rows
        if r["labels"] == labels and r["init"] == init and (lr is None or r["lr"] == lr)
    ]


def mean(rows: list[dict], key: str) -> float:
    return statistics.mean(r[key] for r in rows)


def best_lr(rows: list[dict], labels: str, init: str) -> float:
    """The learning rate whose seeds have the highest mean validation accuracy."""
    lrs = sorted({r["lr"] for r in group(rows, labels, init)})
    return max(lrs, key=lambda lr: mean(group(rows, labels, init, lr), "validation_accuracy"))


def verdict(chosen: dict[str, list[dict]]) -> str:
    """Who wins on test accuracy, and whether by more than the seeds' spread (every seed above every other)."""
    return cells_verdict({i: chosen[i] for i in INITS}, "test_accuracy", "points", scale=100)


def plot(chosen: dict[str, dict[str, list[dict]]], path: Path) -> None:
    plot_grid(
        {b: {i: chosen[b][i] for i in INITS} for b in chosen},
        path,
        lambda labels: f"SST-2, {labels} labels",
        ("test_accuracy", 100.0, "test accuracy %"),
        lambda init, rows: f"{init}, lr {lr_text(rows[0])}",
    )


def table_row(cells: list[dict], chosen: bool) -> str:
    r0 = cells[0]
    val = ", ".join(f"{100 * r['validation_accuracy']:.1f}" for r in cells)
    test = [r["test_accuracy"] for r in cells]
    mark = " (chosen)" if chosen else ""
    return (
        f"| {r0['labels']} | {r0['init']} | {lr_text(r0)}{mark} | {r0['steps']} | {val} | "
        f"{100 * mean(cells, 'validation_accuracy'):.1f}% | {', '.join(f'{100 * a:.1f}' for a in test)} | "
        f"**{100 * statistics.mean(test):.1f}%** | {100 * (max(test) - min(test)):.1f} | "
        f"{mean(cells, 'minutes'):.1f} |"
    )


def report(args: argparse.Namespace, rows: list[dict], facts: dict, chosen: dict) -> str:
    lines = [
        "# Pretraining that pays? A pretrained BERT vs random init, fine-tuned on SST-2",
        "",
        f"- date: {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC; {os.cpu_count()} cores, {args.jobs} cells at once, "
        f"1 thread each; whole command {facts['minutes']:.0f} min; load average at start "
        f"{facts['load_start']}, at end {' '.join(f'{x:.2f}' for x in os.getloadavg())}",
        f"- command: `nice -n 10 .venv/bin/python benchmarks/pretraining_pays.py --encoder {args.encoder} "
        f"--few {args.few} --steps-few {args.steps_few} --steps-all {args.steps_all} --seeds {args.seeds} "
        f"--lrs {args.lrs} --jobs {args.jobs}{ratio_arg(args)}{pooling_arg(args)}`",
        f"- encoder: `{args.encoder}` ({facts['checkpoint']}); SST-2 prepared in its vocabulary; the encoder was "
        f"pretrained on {facts['pretrained_on']} only",
        f"- every cell scored on the same {facts['n_val']:,} validation and {facts['n_test']:,} test phrases (seeded "
        "5% splits of GLUE SST-2 train); the learning rate of each initialisation is the one with the best mean "
        f"validation accuracy on the {args.few}-label cut, and the all-label cells use it",
        f"- batch {args.batch_size}, 64-token sequences; {args.few} labels: {args.steps_few} steps "
        f"(~{args.steps_few * args.batch_size / args.few:.1f} epochs); all {facts['n_train']:,} labels: "
        f"{args.steps_all} steps (~{args.steps_all * args.batch_size / facts['n_train']:.2f} epochs); linear warmup "
        "over 10% of the steps, then linear decay; seeds set head init, data order, dropout and (random init) "
        "every weight",
        *ratio_method(args),
        *pooling_method(args),
        "",
        "| labels | init | lr | steps | validation acc. per seed | validation mean | test acc. per seed | test mean "
        "| test spread (max - min) | min per cell |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for labels in chosen:
        for init in INITS:
            for lr in sorted({r["lr"] for r in group(rows, labels, init)}):
                cells = group(rows, labels, init, lr)
                lines.append(table_row(cells, chosen[labels][init][0]["lr"] == lr))
    lines += [
        "",
        "Winner on test accuracy at the chosen learning rates, by more than the seeds' spread or not:",
        "",
    ]
    lines += [f"- {labels} labels: {verdict(chosen[labels])}" for labels in chosen]
    lines += ["", f"Majority class of train, on test: {100 * facts['majority']:.1f}%."]
    p = facts["probe"]
    lines += [
        "",
        f"Frozen features (no fine-tuning): a logistic regression on the encoder's mean-pooled last hidden states of "
        f"the {args.few} training phrases scores {100 * p['pretrained']:.1f}% on test with the pretrained encoder, "
        f"{100 * p['random init']:.1f}% with a random one (mean over seeds {args.seeds}).",
    ]
    return "\n".join(lines) + "\n"


def ratio_arg(args: argparse.Namespace) -> str:
    return (
        ""
        if args.pretrained_lr_ratio == 1
        else f" --pretrained-lr-ratio {args.pretrained_lr_ratio:g}"
    )


def pooling_arg(args: argparse.Namespace) -> str:
    return "" if args.pooling == "cls" else f" --pooling {args.pooling}"


def pooling_method(args: argparse.Namespace) -> list[str]:
    """The method line of a run with --pooling mean (none at the default: BERT's [CLS] read-out)."""
    if args.pooling == "cls":
        return []
    return [
        "- every cell's classifier reads the mean of the encoder's last hidden states over the real tokens "
        "(`classifier_pooling=mean`; the pooler on [CLS] is unused and frozen), not BERT's pooled [CLS]"
    ]


def ratio_method(args: argparse.Namespace) -> list[str]:
    """The method line of a run with --pretrained-lr-ratio (none at the default: every parameter at lr)."""
    r = args.pretrained_lr_ratio
    if r == 1:
        return []
    encoder = "frozen (ratio 0)" if r == 0 else f"at lr × {r:g}"
    return [
        f"- pretrained cells: the encoder (every parameter loaded from the checkpoint) {encoder}, the new "
        "classifier head at lr (`optim.pretrained_lr_ratio`); random-init cells train every parameter at lr"
    ]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--encoder", type=Path, required=True, help="a Kiln BERT run directory or checkpoint"
    )
    parser.add_argument("--few", type=int, default=1000, help="labelled phrases in the small cut")
    parser.add_argument("--steps-few", type=int, default=200)
    parser.add_argument("--steps-all", type=int, default=300)
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated")
    parser.add_argument(
        "--lrs",
        default="3e-4,1e-3",
        help="learning rates tried for each initialisation on the small cut",
    )
    parser.add_argument(
        "--pretrained-lr-ratio",
        type=float,
        default=1.0,
        help="pretrained cells: the encoder trains at lr x this, the new head at lr (0 freezes the encoder); "
        "random-init cells train everything at lr",
    )
    parser.add_argument(
        "--pooling",
        choices=("cls", "mean"),
        default="cls",
        help="what every cell's classifier reads: BERT's pooled [CLS], or the real tokens' mean "
        "(classifier_pooling) [cls]",
    )
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument(
        "--jobs", type=int, default=2, help="cells fine-tuned at once (1 thread each)"
    )
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "bench-pretraining-pays")
    parser.add_argument(
        "--out", type=Path, default=ROOT / "benchmarks" / "results" / "pretraining_pays.md"
    )
    args = parser.parse_args(argv)
    try:
        args.seed_list = [int(s) for s in args.seeds.split(",")]
        args.lr_list = [float(s) for s in args.lrs.split(",")]
    except ValueError:
        parser.error(
            f"--seeds / --lrs: expected comma-separated numbers, got {args.seeds!r} / {args.lrs!r}"
        )
    if args.few < 1 or args.jobs < 1 or not all(lr > 0 for lr in args.lr_list):
        parser.error("--few and --jobs must be at least 1, and every --lrs value > 0")
    if not (math.isfinite(args.pretrained_lr_ratio) and args.pretrained_lr_ratio >= 0):
        parser.error(f"--pretrained-lr-ratio: a finite number >= 0, got {args.pretrained_lr_ratio}")
    return args


def prepared(args: argparse.Namespace) -> tuple[Path, Path, Path, dict]:
    """(checkpoint, full SST-2, the small cut) in the encoder's vocabulary, and facts about the splits."""
    from finetune.evaluate import classification_report, majority_class
    from pretrain.checkpoint import resolve_checkpoint

    checkpoint = resolve_checkpoint(str(args.encoder))
    tokenizer = encoder_tokenizer(checkpoint)
    full = prepare_sst2(SST2, args.work / "sst2", tokenizer)
    cut_tsv = write_cut(full, args.few, 0, args.work / f"sst2-{args.few}.tsv")
    cut = prepare_sst2(cut_tsv, args.work / f"sst2-{args.few}", tokenizer)
    check_cut(full, cut, args.few)
    gold = [label for _, label in split_rows(full, "test")]
    top = majority_class([label for _, label in split_rows(full, "train")])
    facts = {
        "checkpoint": f"{checkpoint.parent.name}/{checkpoint.name}",
        "pretrained_on": pretraining_text(checkpoint),
        "n_val": len(split_rows(full, "validation")),
        "n_test": len(gold),
        "n_train": len(split_rows(full, "train")),
        "majority": classification_report([top] * len(gold), gold, num_classes=2)["accuracy"],
    }
    return checkpoint, full, cut, facts


def main(argv: list[str] | None = None) -> int:
    from data_pipeline.errors import DataError
    from pretrain.checkpoint import CheckpointError

    args = parse_args(argv)
    if not SST2.is_file():
        print(f"{SST2}: not found (../shared/data is needed for this benchmark)", file=sys.stderr)
        return 2
    begin, load_start = time.monotonic(), " ".join(f"{x:.2f}" for x in os.getloadavg())
    try:
        checkpoint, full, cut, facts = prepared(args)
    except (DataError, CheckpointError) as err:
        print(err, file=sys.stderr)
        return 2
    finally:
        import ray

        if (
            ray.is_initialized()
        ):  # prepare() started a local Ray: nothing later needs it (cells run in
            ray.shutdown()  # their own processes), and its daemons would share the 2 cores with them
    facts["load_start"] = load_start
    cache, few = args.work / "cells.jsonl", str(args.few)
    # random-init cells have no pretrained parameters: they train everything at lr, whatever the ratio
    ratio = {"pretrained": args.pretrained_lr_ratio, "random init": 1.0}

    def cells(labels: str, steps: int, data: Path, lrs: dict[str, list[float]]) -> list[Cell]:
        return [
            Cell(
                labels, init, seed, steps, lr, str(data), str(checkpoint), ratio[init], args.pooling
            )
            for lr_i in range(max(len(v) for v in lrs.values()))
            for seed in args.seed_list
            for init in INITS
            if lr_i < len(lrs[init])
            for lr in [lrs[init][lr_i]]
        ]

    grid = cells(few, args.steps_few, cut, dict.fromkeys(INITS, args.lr_list))
    rows = run_cells(grid, run_cell, [args.batch_size], args.jobs, cache)
    lr = {init: best_lr(rows, few, init) for init in INITS}
    grid = cells("all", args.steps_all, full, {i: [lr[i]] for i in INITS})
    rows += run_cells(grid, run_cell, [args.batch_size], args.jobs, cache)
    chosen = {b: {i: group(rows, b, i, lr[i]) for i in INITS} for b in (few, "all")}
    facts["probe"] = probe(checkpoint, cut, args.seed_list)
    facts["minutes"] = (time.monotonic() - begin) / 60
    text = report(args, rows, facts, chosen)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    plot(chosen, args.out.with_suffix(".png"))
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
