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

from cluster.evaluation import evaluate_checkpoint
from cluster.jobs import QuickstartJob
from cluster.launch import TrainResult, init_ray, run_training
from cluster.report import last_value, loss_drop, markdown_table, plot_curves, pretrain_chance
from cluster.rundir import RERUN_QUICKSTART, prepare_run_dir
from cluster.tracking import log_artifacts
from data_pipeline.configlib import to_yaml


def _say(message: str) -> None:
    print(f"[quickstart] {message}", flush=True)


def _stage_done(stage: str, result: TrainResult) -> None:
    """Where a stage's outputs went, its Ray and worker output (logs/ray.log) among them."""
    print(
        f"[{stage}] done in {result.seconds:.0f} s: checkpoint {result.checkpoint}; metrics.csv and "
        f"logs/ray.log in {result.out_dir}",
        flush=True,
    )


def run_quickstart(cfg: QuickstartJob, out: Path, overwrite: bool = False) -> Path:
    out = prepare_run_dir(Path(out), overwrite, RERUN_QUICKSTART).resolve()
    (out / "config.yaml").write_text(to_yaml(cfg))
    timings: dict[str, float] = {}
    start = time.perf_counter()
    init_ray(
        cfg.bert.cluster.address, out / "logs"
    )  # each training stage then logs into its own logs/

    _say("1/5 data: Ray Data reads the built-in sample, trains a tokenizer, writes shards")
    t0 = time.perf_counter()
    from data_pipeline.prepare import prepare

    data_manifest = prepare(
        cfg.data, out / "data", progress=lambda m: print(f"[data] {m}", flush=True)
    )
    timings["data"] = time.perf_counter() - t0
    data_dir = str(out / "data")

    results: dict[str, TrainResult] = {}
    for i, (stage, job) in enumerate((("bert", cfg.bert), ("gpt", cfg.gpt)), start=2):
        _say(
            f"{i}/5 pretrain {stage}: {job.cluster.num_workers} Ray Train workers, {job.trainer.max_steps} steps"
        )
        results[stage] = run_training(
            dataclasses.replace(job, data_dir=data_dir), out / stage, stage
        )
        timings[stage] = results[stage].seconds
        _stage_done(stage, results[stage])

    _say(
        "4/5 fine-tune: translation (encoder from BERT, decoder from GPT, new cross-attention) and classifier"
    )
    translation = dataclasses.replace(
        cfg.translation,
        data_dir=data_dir,
        encoder_checkpoint=str(results["bert"].checkpoint),
        decoder_checkpoint=str(results["gpt"].checkpoint),
    )
    classification = dataclasses.replace(
        cfg.classification, data_dir=data_dir, encoder_checkpoint=str(results["bert"].checkpoint)
    )
    for stage, job in (("translation", translation), ("classification", classification)):
        results[stage] = run_training(job, out / stage, stage)
        timings[stage] = results[stage].seconds
        _stage_done(stage, results[stage])

    _say("5/5 evaluate on the held-out test split")
    t0 = time.perf_counter()
    evals = {
        stage: evaluate_checkpoint(
            results[stage].checkpoint,
            Path(data_dir),
            "test",
            cfg.translation.decode,
            out / stage / "eval",
        )
        for stage in ("translation", "classification")
    }
    timings["evaluate"] = time.perf_counter() - t0
    jobs = {
        "bert": cfg.bert,
        "gpt": cfg.gpt,
        "translation": translation,
        "classification": classification,
    }
    for stage, result in results.items():
        plot_curves(result.metrics_csv, out / stage / "loss_curve.png", title=f"{stage}: loss")
        # loss curve, sample translations / predictions, test metrics and checkpoint into the stage's W&B run
        log_artifacts(jobs[stage].wandb, out / stage, stage, checkpoint=result.checkpoint)
    timings["total"] = time.perf_counter() - start
    pre = pretraining_summary(out, results)
    report = write_report(out, cfg, data_manifest, results, evals, timings, pre)
    summary = {"pretraining": pre, "evaluation": evals, "seconds": timings}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return report


def _f(x: float, digits: int = 3) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def pretraining_summary(out: Path, results: dict[str, TrainResult]) -> dict[str, Any]:
    """BERT's last validation MLM/NSP accuracies next to their floors (from the data), GPT's
    perplexity."""
    bert_csv, chance = results["bert"].metrics_csv, pretrain_chance(out / "data")
    bert = {
        "mlm_acc": last_value(bert_csv, "val/mlm_acc"),
        "nsp_acc": last_value(bert_csv, "val/nsp_acc"),
        "unigram_token": chance.unigram_token,
        "unigram_accuracy": chance.unigram_accuracy,
        "nsp_chance": chance.nsp_chance,
        "nsp_pairs": chance.nsp_pairs,
    }
    return {"bert": bert, "gpt": {"ppl": last_value(results["gpt"].metrics_csv, "val/ppl")}}


def _pretrain_rows(
    results: dict[str, TrainResult], vocab: int, pre: dict[str, Any]
) -> list[list[str]]:
    bert = pre["bert"]
    extra = {
        "bert": f"MLM acc {_f(bert['mlm_acc'])} (unigram guess "
        f"{_f(bert['unigram_accuracy'])}); NSP acc {_f(bert['nsp_acc'])} "
        f"(chance {_f(bert['nsp_chance'])})",
        "gpt": f"perplexity {_f(pre['gpt']['ppl'], 1)} (uniform {vocab})",
    }
    rows = []
    for stage in ("bert", "gpt"):
        first, last = loss_drop(results[stage].metrics_csv)
        val_loss = last_value(results[stage].metrics_csv, "val/loss")
        rows.append(
            [
                stage,
                f"{_f(first)} → {_f(last)}",
                _f(val_loss),
                f"{_f(math.log(vocab))} (uniform)",
                extra[stage],
            ]
        )
    return rows


def _beats(value: float, floor: float) -> str:
    return "above" if value > floor else "NOT above"


def nsp_margin(bert: dict[str, Any]) -> float:
    """How many binomial standard errors BERT's NSP accuracy lies above chance on its validation
    pairs (a guesser at chance level lands within 2 of it 95% of the time)."""
    chance, pairs = bert["nsp_chance"], max(int(bert.get("nsp_pairs") or 0), 1)
    return (bert["nsp_acc"] - chance) / math.sqrt(chance * (1.0 - chance) / pairs)


def _bert_verdict(bert: dict[str, Any]) -> str:
    """One plain sentence: did the encoder learn more than its data's floors? MLM: more than twice
    the unigram guess; NSP: more than 3 standard errors above chance (not luck on this split)."""
    mlm, guess = bert["mlm_acc"], bert["unigram_accuracy"]
    nsp, chance, margin = bert["nsp_acc"], bert["nsp_chance"], nsp_margin(bert)
    learned = mlm > 2 * guess and margin > 3
    return (
        f"BERT {'learned' if learned else 'did not clearly learn'}: on the validation split "
        f"its masked-token accuracy is {_f(mlm)}, {_beats(mlm, guess)} the {_f(guess)} of "
        f"always guessing the most frequent token ('{bert['unigram_token']}'), and its "
        f"next-sentence accuracy is {_f(nsp)}, {_beats(nsp, chance)} the chance level "
        f"{_f(chance)} (the share of the commoner label) by {margin:.1f} standard errors "
        f"({bert.get('nsp_pairs', 0)} pairs)."
    )


def _classification_rows(cl: dict[str, Any]) -> list[list[str]]:
    baselines = (
        f"{_f(cl['bow_accuracy'])} (bag-of-words logistic regression); "
        f"{_f(cl['split_majority_rate'])} (test split's commonest label); "
        f"{_f(cl['uniform_chance'])} (uniform chance); "
        f"{_f(cl['majority_class_accuracy'])} (training split's commonest label)"
    )
    return [
        ["classification (stdlib docstring domain)", "accuracy", _f(cl["accuracy"]), baselines],
        [
            "classification",
            "macro-F1",
            _f(cl["macro_f1"]),
            f"{_f(cl['bow_macro_f1'])} (bag-of-words)",
        ],
        ["classification", "MCC", _f(cl["mcc"]), "0.000 (any constant answer)"],
    ]


def _classification_verdict(cl: dict[str, Any]) -> str:
    acc, bow = cl["accuracy"], cl["bow_accuracy"]
    constant = max(cl["split_majority_rate"], cl["uniform_chance"])
    return (
        f"The classifier (the pretrained BERT with a new [CLS] head) scores {_f(acc)} on "
        f"{cl['examples']} test texts: {'better than' if acc > bow else 'NOT better than'} the "
        f"bag-of-words logistic regression trained on the same split ({_f(bow)}), and "
        f"{_beats(acc, constant)} the best any constant answer scores ({_f(constant)})."
    )


def write_report(
    out: Path,
    cfg: QuickstartJob,
    data: dict,
    results: dict[str, TrainResult],
    evals: dict[str, dict[str, Any]],
    timings: dict[str, float],
    pre: dict[str, Any] | None = None,
) -> Path:
    tr, cl = evals["translation"], evals["classification"]
    pre = pre if pre is not None else pretraining_summary(out, results)
    samples = [
        json.loads(line)
        for line in (out / "translation/eval/predictions.jsonl").read_text().splitlines()[:8]
    ]
    parts = [
        "# Kiln quickstart report",
        f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M UTC} on {platform.node()} ({platform.processor() or 'cpu'}); "
        f"{timings['total'] / 60:.1f} minutes in all. Resolved config: `config.yaml`.",
        "## Data",
        f"Built-in sample, seed {cfg.data.seed}; one {cfg.data.tokenizer} tokenizer of {data['vocab_size']} tokens "
        f"shared by every task. Shards and manifests: `data/`.",
        f"## Pretraining (Ray Train, {cfg.bert.cluster.num_workers} workers each)",
        markdown_table(
            [
                "model",
                "train loss (first → last)",
                "val loss",
                "chance loss",
                "validation vs floor",
            ],
            _pretrain_rows(results, int(data["vocab_size"]), pre),
        ),
        _bert_verdict(pre["bert"]),
        "![BERT loss](bert/loss_curve.png) ![GPT loss](gpt/loss_curve.png)",
        "## Fine-tuning, scored on the held-out test split",
        markdown_table(
            ["task", "metric", "Kiln", "baselines"],
            [
                [
                    "translation (en → fr numbers)",
                    "BLEU (sacrebleu)",
                    _f(tr["bleu"], 1),
                    f"{_f(tr['copy_source_bleu'], 1)} (copy the source)",
                ],
                ["translation", "chrF", _f(tr["chrf"], 1), ""],
                ["translation", "exact match", _f(tr["exact_match"]), ""],
                *_classification_rows(cl),
            ],
        ),
        _classification_verdict(cl),
        f"Translation: beam {tr['beam_size']}, {tr['sentences']} test sentences; the encoder is the pretrained BERT, "
        f"the decoder the pretrained GPT, with {len(results['translation'].new_tensors)} freshly initialised "
        "cross-attention tensors.",
        "![translation loss](translation/loss_curve.png) ![classification loss](classification/loss_curve.png)",
        "### Sample translations",
        markdown_table(
            ["source", "reference", "Kiln"],
            [[s["source"], s["reference"], s["hypothesis"]] for s in samples],
        ),
        "## Time per stage (seconds)",
        markdown_table(list(timings), [[f"{v:.0f}" for v in timings.values()]]),
        "W&B runs (offline) are under each stage's `wandb/`; upload them all with `kiln wandb sync <this directory>`.",
    ]
    report = out / "report.md"
    report.write_text("\n\n".join(parts) + "\n")
    return report
