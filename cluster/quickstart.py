"""`kiln quickstart`: the whole mission on the built-in sample, every stage real, then report.md.

data (Ray Data → tokenizer → shards) → BERT MLM+NSP and GPT causal pretraining (Ray Train, 2 workers) →
translation warm-started from both checkpoints, classifier from the encoder → evaluation against trivial baselines.
"""

from __future__ import annotations

import dataclasses
import json
import math
import platform
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from cluster.config import to_yaml
from cluster.evaluation import evaluate_checkpoint
from cluster.jobs import QuickstartJob
from cluster.launch import TrainResult, init_ray, run_training
from cluster.report import last_value, loss_drop, markdown_table, plot_curves
from cluster.rundir import prepare_run_dir
from cluster.tracking import log_artifacts


def _say(message: str) -> None:
    print(f"[quickstart] {message}", flush=True)


def run_quickstart(cfg: QuickstartJob, out: Path, overwrite: bool = False) -> Path:
    out = prepare_run_dir(Path(out), overwrite).resolve()
    (out / "config.yaml").write_text(to_yaml(cfg))
    timings: dict[str, float] = {}
    start = time.perf_counter()
    init_ray(cfg.bert.cluster.address)

    _say("1/5 data: Ray Data reads the built-in sample, trains a tokenizer, writes shards")
    t0 = time.perf_counter()
    from data_pipeline.prepare import prepare

    data_manifest = prepare(cfg.data, out / "data", progress=lambda m: print(f"[data] {m}", flush=True))
    timings["data"] = time.perf_counter() - t0
    data_dir = str(out / "data")

    results: dict[str, TrainResult] = {}
    for i, (stage, job) in enumerate((("bert", cfg.bert), ("gpt", cfg.gpt)), start=2):
        _say(f"{i}/5 pretrain {stage}: {job.cluster.num_workers} Ray Train workers, {job.trainer.max_steps} steps")
        results[stage] = run_training(dataclasses.replace(job, data_dir=data_dir), out / stage, stage)
        timings[stage] = results[stage].seconds

    _say("4/5 fine-tune: translation (encoder from BERT, decoder from GPT, new cross-attention) and classifier")
    translation = dataclasses.replace(cfg.translation, data_dir=data_dir,
                                      encoder_checkpoint=str(results["bert"].checkpoint),
                                      decoder_checkpoint=str(results["gpt"].checkpoint))
    classification = dataclasses.replace(cfg.classification, data_dir=data_dir,
                                         encoder_checkpoint=str(results["bert"].checkpoint))
    for stage, job in (("translation", translation), ("classification", classification)):
        results[stage] = run_training(job, out / stage, stage)
        timings[stage] = results[stage].seconds

    _say("5/5 evaluate on the held-out test split")
    t0 = time.perf_counter()
    evals = {stage: evaluate_checkpoint(results[stage].checkpoint, Path(data_dir), "test", cfg.translation.decode,
                                        out / stage / "eval") for stage in ("translation", "classification")}
    timings["evaluate"] = time.perf_counter() - t0
    jobs = {"bert": cfg.bert, "gpt": cfg.gpt, "translation": translation, "classification": classification}
    for stage, result in results.items():
        plot_curves(result.metrics_csv, out / stage / "loss_curve.png", title=f"{stage}: loss")
        # loss curve, sample translations / predictions, test metrics and checkpoint into the stage's W&B run
        log_artifacts(jobs[stage].wandb, out / stage, stage, checkpoint=result.checkpoint)
    timings["total"] = time.perf_counter() - start
    report = write_report(out, cfg, data_manifest, results, evals, timings)
    (out / "summary.json").write_text(json.dumps({"evaluation": evals, "seconds": timings}, indent=2))
    return report


def _f(x: float, digits: int = 3) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _pretrain_rows(results: dict[str, TrainResult], vocab: int) -> list[list[str]]:
    rows = []
    for stage in ("bert", "gpt"):
        csv_file = results[stage].metrics_csv
        first, last = loss_drop(csv_file)
        val_loss = last_value(csv_file, "val/loss")
        mlm, nsp = last_value(csv_file, "val/mlm_acc"), last_value(csv_file, "val/nsp_acc")
        ppl = last_value(csv_file, "val/ppl")
        extra = f"MLM acc {_f(mlm)}, NSP acc {_f(nsp)} (chance 0.5)" if stage == "bert" else f"perplexity {_f(ppl, 1)}"
        rows.append([stage, f"{_f(first)} → {_f(last)}", _f(val_loss), f"{_f(math.log(vocab))} (uniform)", extra])
    return rows


def write_report(out: Path, cfg: QuickstartJob, data: dict, results: dict[str, TrainResult],
                 evals: dict[str, dict[str, Any]], timings: dict[str, float]) -> Path:
    tr, cl = evals["translation"], evals["classification"]
    samples = [json.loads(line) for line in (out / "translation/eval/predictions.jsonl").read_text().splitlines()[:8]]
    parts = [
        "# Kiln quickstart report",
        f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M UTC} on {platform.node()} ({platform.processor() or 'cpu'}); "
        f"{timings['total'] / 60:.1f} minutes in all. Resolved config: `config.yaml`.",
        "## Data",
        f"Built-in sample, seed {cfg.data.seed}; one {cfg.data.tokenizer} tokenizer of {data['vocab_size']} tokens "
        f"shared by every task. Shards and manifests: `data/`.",
        f"## Pretraining (Ray Train, {cfg.bert.cluster.num_workers} workers each)",
        markdown_table(["model", "train loss (first → last)", "val loss", "chance loss", "also"],
                       _pretrain_rows(results, int(data["vocab_size"]))),
        "![BERT loss](bert/loss_curve.png) ![GPT loss](gpt/loss_curve.png)",
        "## Fine-tuning, scored on the held-out test split",
        markdown_table(["task", "metric", "Kiln", "trivial baseline"], [
            ["translation (en → fr numbers)", "BLEU (sacrebleu)", _f(tr["bleu"], 1),
             f"{_f(tr['copy_source_bleu'], 1)} (copy the source)"],
            ["translation", "chrF", _f(tr["chrf"], 1), ""],
            ["translation", "exact match", _f(tr["exact_match"]), ""],
            ["classification (stdlib docstring domain)", "accuracy", _f(cl["accuracy"]),
             f"{_f(cl['majority_class_accuracy'])} (majority class)"],
            ["classification", "macro-F1 / MCC", f"{_f(cl['macro_f1'])} / {_f(cl['mcc'])}", ""],
        ]),
        f"Translation: beam {tr['beam_size']}, {tr['sentences']} test sentences; the encoder is the pretrained BERT, "
        f"the decoder the pretrained GPT, with {len(results['translation'].new_tensors)} freshly initialised "
        "cross-attention tensors.",
        "![translation loss](translation/loss_curve.png) ![classification loss](classification/loss_curve.png)",
        "### Sample translations",
        markdown_table(["source", "reference", "Kiln"],
                       [[s["source"], s["reference"], s["hypothesis"]] for s in samples]),
        "## Time per stage (seconds)",
        markdown_table(list(timings), [[f"{v:.0f}" for v in timings.values()]]),
        "W&B runs (offline) are under each stage's `wandb/`; upload them all with `kiln wandb sync <this directory>`.",
    ]
    report = out / "report.md"
    report.write_text("\n\n".join(parts) + "\n")
    return report
