"""Does a pretrained decoder pay? A GPT pretrained on WikiText-2 as the English decoder of a Multi30k German→English
Transformer, against the very same model from random initialisation, with all the pairs and with a small cut.

    kiln data prepare --config configs/data-multi30k.yaml --out runs/multi30k
    kiln data prepare --config configs/data-wikitext2-gpt-multi30k.yaml --out runs/wikitext2-gpt-multi30k
    kiln pretrain --config configs/gpt-decoder-wikitext2.yaml --out runs/gpt-decoder-wikitext2
    nice -n 10 .venv/bin/python benchmarks/decoder_pays.py --decoder runs/gpt-decoder-wikitext2 --data runs/multi30k

The GPT never saw a caption: it is pretrained (causal LM) on WikiText-2's articles, tokenised with the Multi30k
tokenizer, so its embedding rows are the translation model's target vocabulary. Nothing German is pretrained: the
encoder is a BERT of the GPT's shape (layers, width, heads) with random weights, saved once per seed as a checkpoint
under --work so that the warm start runs Kiln's own path (`encoder_checkpoint` + `decoder_checkpoint`: encoder,
decoder, fresh cross-attention). "random init" is that same model with every weight re-initialised (`init_weights`,
seeded): same architecture, data order and hyper-parameters. The decoder starts pretrained or random; the encoder and
the cross-attention are random in both, but drawn differently (and so are the dropout masks), so the seeds' spread
includes that noise.

Two data budgets: every training pair of --data, and a seeded cut of --few pairs of Multi30k's training files,
prepared again with --data's tokenizer. Each (budget, initialisation, seed) cell fine-tunes for a fixed number of
steps and is scored on the official test_2016_flickr set (beam 5, GNMT alpha 0.6, sacrebleu BLEU and chrF on
detokenised cased output). `--jobs` cells run at once, each in its own process with 1 thread; finished cells are
cached in <work>/cells.jsonl. Writes benchmarks/results/decoder_pays.md and its PNG.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
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

from benchmarks.cells import plot_grid, run_cells, train_cell, verdict  # noqa: E402
from benchmarks.translation_quality import MULTI30K  # noqa: E402

INITS = ("pretrained decoder", "random init")


@dataclass(frozen=True)
class Cell:
    pairs: str  # "all" or the size of the cut, e.g. "3000"
    init: str  # one of INITS
    seed: int
    steps: int
    lr: float
    data_dir: str
    encoder: str  # the seed's random BERT checkpoint
    decoder: str  # the pretrained GPT checkpoint
    batch_size: int
    test_limit: int | None  # None: the whole test set
    decoder_sha: (
        str  # what the paths held: a re-pretrained decoder or re-prepared data is another cell
    )
    data_sha: str


def random_encoder(decoder: Path, tokenizer: Path, seed: int, out: Path) -> Path:
    """A BERT of the GPT's shape with the seed's random weights, speaking `tokenizer`: the encoder half (nothing
    German is pretrained), saved as a checkpoint so the warm start is Kiln's own encoder + decoder path."""
    import torch
    from tokenizers import Tokenizer

    from pretrain.checkpoint import load_checkpoint, save_checkpoint
    from pretrain.models.bert import BertConfig, BertForPreTraining

    gpt = load_checkpoint(decoder, build_model=False).model_config
    config = BertConfig(
        vocab_size=Tokenizer.from_file(str(tokenizer)).get_vocab_size(),
        hidden_size=gpt.n_embd,
        num_hidden_layers=gpt.n_layer,
        num_attention_heads=gpt.n_head,
        intermediate_size=4 * gpt.n_embd,
        max_position_embeddings=gpt.n_positions,
    )
    if (out / "config.json").is_file():
        saved = load_checkpoint(out, build_model=False).model_config
        if saved != config:
            from data_pipeline.errors import DataError

            raise DataError(
                f"{out}: a random encoder of another shape than {decoder} needs (a stale --work); remove it "
                "or give another --work"
            )
        return out
    torch.manual_seed(seed)
    return save_checkpoint(out, BertForPreTraining(config), config, tokenizer)


def write_cut(n: int, seed: int, out: Path) -> list[Path]:
    """`n` seeded pairs of Multi30k's training files, as two line-aligned files (German, English)."""
    de, en = (
        (MULTI30K / f"train.{lang}").read_text(encoding="utf-8").splitlines()
        for lang in ("de", "en")
    )
    if not 0 < n <= len(de):
        from data_pipeline.errors import DataError

        raise DataError(f"--few: needs 1..{len(de)} pairs ({MULTI30K / 'train.de'}), got {n}")
    keep = sorted(random.Random(seed).sample(range(len(de)), n))
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "train.de", out / "train.en"]
    for path, lines in zip(paths, (de, en), strict=True):
        path.write_text("".join(lines[i] + "\n" for i in keep), encoding="utf-8")
    return paths


def prepare_cut(data: Path, n: int, out: Path) -> Path:
    """The cut prepared like --data (configs/data-multi30k.yaml) with --data's tokenizer; every pair trains
    (the cells are scored on test_2016_flickr, not on a carved split) but for a few held out for validation."""
    from cluster.config import load_config
    from cluster.jobs import PrepareJob
    from data_pipeline.prepare import prepare

    if (out / "manifest.json").is_file():
        return out
    de, en = write_cut(n, 0, out.parent / f"{out.name}-text")
    job = load_config(
        PrepareJob,
        ROOT / "configs" / "data-multi30k.yaml",
        [
            f"data.paths=[{de}, {en}]",
            f"data.tokenizer_path={data / 'tokenizer.json'}",
            "data.validation_fraction=0.01",
            "data.test_fraction=0.0",
        ],
    )
    prepare(job.data, out)
    return out


def run_cell(cell: Cell) -> dict:
    """Fine-tune one cell in this (worker) process; score it on test_2016_flickr."""
    import torch

    from benchmarks.translation_quality import score

    torch.set_num_threads(1)
    model, row = train_cell(finetune_job(cell), cell, fresh=cell.init == "random init")
    row["params"] = sum(p.numel() for p in model.parameters())
    row.update(score(model, Path(cell.data_dir), cell.test_limit))
    print(
        f"[{cell.pairs} pairs, {cell.init}, seed {cell.seed}] BLEU {row['bleu']:.1f} chrF {row['chrf']:.1f} after "
        f"{row['done']} steps in {row['minutes']:.1f} min (load {row['load']:.2f} at start)",
        flush=True,
    )
    return row


def finetune_job(cell: Cell) -> object:
    """The cell's translation job: the seed's random encoder, the pretrained decoder, the budget's data."""
    from cluster.config import load_config
    from cluster.jobs import FinetuneJob

    return load_config(
        FinetuneJob,
        None,
        [
            f"data_dir={cell.data_dir}",
            "task=translation",
            f"encoder_checkpoint={cell.encoder}",
            f"decoder_checkpoint={cell.decoder}",
            f"trainer.batch_size={cell.batch_size}",
            f"trainer.max_steps={cell.steps}",
            f"trainer.seed={cell.seed}",
            f"optim.lr={cell.lr}",
            f"optim.warmup_steps={max(1, cell.steps // 10)}",
        ],
    )


def plot(chosen: dict[str, dict[str, list[dict]]], path: Path) -> None:
    plot_grid(
        chosen,
        path,
        lambda pairs: f"Multi30k de→en, {pairs} pairs",
        ("bleu", 1.0, "test_2016_flickr BLEU"),
    )


def table_row(cells: list[dict]) -> str:
    r0 = cells[0]
    bleu, chrf = [r["bleu"] for r in cells], [r["chrf"] for r in cells]
    first = statistics.mean(statistics.mean(r["losses"][:10]) for r in cells)
    last = statistics.mean(statistics.mean(r["losses"][-10:]) for r in cells)
    return (
        f"| {r0['pairs']} | {r0['init']} | {r0['steps']} | {', '.join(f'{b:.1f}' for b in bleu)} | "
        f"**{statistics.mean(bleu):.1f}** | {max(bleu) - min(bleu):.1f} | {statistics.mean(chrf):.1f} | "
        f"{first:.2f} → {last:.2f} | {statistics.mean(r['minutes'] for r in cells):.1f} |"
    )


def report(args: argparse.Namespace, chosen: dict[str, dict[str, list[dict]]], facts: dict) -> str:
    n_all = facts["n_train"]
    steps = {args.few_label: args.steps_few, "all": args.steps_all}
    sizes = {args.few_label: facts["n_few"], "all": n_all}
    epochs = ", ".join(
        f"{b} pairs: {s} steps (~{s * args.batch_size / sizes[b]:.2g} epochs)"
        for b, s in steps.items()
    )
    test = f"the first {args.test_limit} sentences of " if args.test_limit else ""
    lines = [
        "# Does a pretrained decoder pay? GPT pretrained on WikiText-2 vs random init, Multi30k de→en",
        "",
        f"- date: {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC; {os.cpu_count()} cores, {args.jobs} cells at once, "
        f"1 thread each; whole command {facts['minutes']:.0f} min; load average at start {facts['load_start']}, "
        f"at end {' '.join(f'{x:.2f}' for x in os.getloadavg())}",
        f"- command: `nice -n 10 .venv/bin/python benchmarks/decoder_pays.py --decoder {args.decoder} --data "
        f"{args.data} --few {args.few} --steps-few {args.steps_few} --steps-all {args.steps_all} --seeds "
        f"{args.seeds} --lr {args.lr:g} --batch-size {args.batch_size} --jobs {args.jobs}"
        + (f" --test-limit {args.test_limit}" if args.test_limit else "")
        + "`",
        f"- decoder: `{args.decoder}` ({facts['checkpoint']}), {facts['decoder_shape']}; it saw WikiText-2 only. "
        "Encoder: a BERT of its shape, random (seeded); cross-attention new in both",
        f"- model {facts['params'] / 1e6:.1f} M parameters; batch {args.batch_size} pairs, AdamW {args.lr:g}, "
        f"label smoothing 0.1, warm-up 10% of the steps then linear decay; {epochs}; seeds set the encoder, the "
        "cross-attention, data order, dropout and (random init) every weight",
        f"- scored on {test}test_2016_flickr (1,000 sentences), beam 5, GNMT alpha 0.6, sacrebleu BLEU / chrF on "
        f"detokenised cased output; copying the German source scores BLEU {facts['copy_bleu']:.1f}",
        f"- the decoder alone, as a language model of the data's English validation captions: "
        f"{facts['caption_loss']['pretrained']:.2f} nats per token (perplexity "
        f"{math.exp(facts['caption_loss']['pretrained']):.0f}); the same GPT with random weights "
        f"{facts['caption_loss']['random']:.2f}",
        "",
        "| pairs | init | steps | BLEU per seed | BLEU mean | spread (max - min) | chrF mean "
        "| train loss, first 10 → last 10 steps | min per cell |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    lines += [table_row(chosen[b][i]) for b in chosen for i in INITS]
    lines += ["", "Winner on BLEU, by more than the seeds' spread or not:", ""]
    lines += [f"- {b} pairs: {verdict(chosen[b], 'bleu', 'BLEU')}" for b in chosen]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--decoder", type=Path, required=True, help="a Kiln GPT run directory or checkpoint"
    )
    parser.add_argument(
        "--data", type=Path, required=True, help="Multi30k prepared by configs/data-multi30k.yaml"
    )
    parser.add_argument("--few", type=int, default=3000, help="training pairs in the small cut")
    parser.add_argument("--steps-few", type=int, default=300)
    parser.add_argument("--steps-all", type=int, default=300)
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument(
        "--jobs", type=int, default=2, help="cells fine-tuned at once (1 thread each)"
    )
    parser.add_argument(
        "--test-limit", type=int, default=None, help="score only this many test sentences (smoke)"
    )
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "bench-decoder-pays")
    parser.add_argument(
        "--out", type=Path, default=ROOT / "benchmarks" / "results" / "decoder_pays.md"
    )
    args = parser.parse_args(argv)
    try:
        args.seed_list = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        parser.error(f"--seeds: expected comma-separated integers, got {args.seeds!r}")
    counts = (
        args.few,
        args.jobs,
        args.steps_few,
        args.steps_all,
        args.batch_size,
        args.test_limit or 1,
    )
    if min(counts) < 1 or args.lr <= 0:
        parser.error(
            "--few, --jobs, --steps-few, --steps-all, --batch-size and --test-limit must be at least 1, "
            "and --lr > 0"
        )
    if len(set(args.seed_list)) != len(args.seed_list):
        parser.error(f"--seeds: each seed once, got {args.seeds!r}")
    args.few_label = str(args.few)
    return args


def prepared(args: argparse.Namespace) -> tuple[Path, Path, dict]:
    """(decoder checkpoint, the small cut) and facts about the data and the model; checks that the decoder speaks
    --data's target vocabulary (one line naming both, exit 2, when not)."""
    from cluster.tasks import data_paths
    from data_pipeline.loader import read_manifest
    from finetune.models.warm_start import load_pretrained
    from pretrain.checkpoint import resolve_checkpoint
    from pretrain.hf_import import check_tokenizer_matches_data

    checkpoint = resolve_checkpoint(str(args.decoder))
    gpt = load_pretrained(checkpoint, "gpt").model_config
    data_paths(args.data, "translation")  # prepared, with a translation task
    check_tokenizer_matches_data(checkpoint, args.data, "--decoder", target=True)
    cut = prepare_cut(args.data, args.few, args.work / f"multi30k-{args.few}")
    rows = {
        name: read_manifest(d / "translation" / "manifest.json")["splits"]["train"]["rows"]
        for name, d in (("n_train", args.data), ("n_few", cut))
    }
    facts = {
        "checkpoint": f"{checkpoint.parent.name}/{checkpoint.name}",
        "decoder_shape": f"{gpt.n_layer} layers × {gpt.n_embd}, {gpt.n_head} heads",
        "decoder_sha": fingerprint(checkpoint / "manifest.json"),
        **rows,
    }
    return checkpoint, cut, facts


def fingerprint(manifest: Path) -> str:
    """A short sha256 of a manifest (it lists the sha256 of every file it covers)."""
    return hashlib.sha256(manifest.read_bytes()).hexdigest()[:16]


def caption_loss(checkpoint: Path, data: Path) -> dict[str, float]:
    """The pretrained decoder alone as a language model of --data's English validation targets (no source): mean
    next-token loss in nats, and the same for a GPT of its shape with random weights (what the scratch model's
    decoder starts from). How much of the captions' English the pretraining text taught it."""
    import torch
    import torch.nn.functional as F

    from data_pipeline.collators import IGNORE_INDEX
    from data_pipeline.loader import make_loader
    from pretrain.checkpoint import load_checkpoint

    gpt = load_checkpoint(checkpoint).model.eval()
    torch.manual_seed(0)
    fresh = type(gpt)(gpt.config).eval()  # the model's own initialisation
    loader = make_loader(data, "translation", "validation", 128, shuffle=False, drop_last=False)
    totals = {"pretrained": 0.0, "random": 0.0}
    count = 0
    with torch.no_grad():
        for batch in loader:
            for name, model in (("pretrained", gpt), ("random", fresh)):
                logits, _ = model(batch["tgt_in"])
                totals[name] += F.cross_entropy(
                    logits.flatten(0, 1),
                    batch["tgt_out"].flatten(),
                    ignore_index=IGNORE_INDEX,
                    reduction="sum",
                ).item()
            count += int((batch["tgt_out"] != IGNORE_INDEX).sum())
    return {name: total / count for name, total in totals.items()}


def check_same_tokenizer(data: Path, derived: list[Path]) -> None:
    """A --work left by a run on data with another tokenizer would fine-tune on ids that mean other tokens."""
    from data_pipeline.errors import DataError

    want = (data / "tokenizer.json").read_bytes()
    for d in derived:
        if (d / "tokenizer.json").read_bytes() != want:
            raise DataError(
                f"{d}: made with another tokenizer than {data / 'tokenizer.json'} (a stale --work); "
                "remove it or give another --work"
            )


def main(argv: list[str] | None = None) -> int:
    from cluster.tasks import preflight
    from data_pipeline.errors import DataError
    from pretrain.checkpoint import CheckpointError

    args = parse_args(argv)
    if not MULTI30K.is_dir():
        print(
            f"{MULTI30K}: not found (../shared/data is needed for this benchmark)", file=sys.stderr
        )
        return 2
    begin, load_start = time.monotonic(), " ".join(f"{x:.2f}" for x in os.getloadavg())
    try:
        decoder, cut, facts = prepared(args)
        tokenizer = args.data / "tokenizer.json"
        encoders = {
            s: random_encoder(decoder, tokenizer, s, args.work / "encoders" / f"seed-{s}")
            for s in args.seed_list
        }
        check_same_tokenizer(args.data, [cut, *encoders.values()])
        budgets = ((args.few_label, args.steps_few, cut), ("all", args.steps_all, args.data))
        grid = [
            Cell(
                b,
                init,
                s,
                steps,
                args.lr,
                str(d),
                str(encoders[s]),
                str(decoder),
                args.batch_size,
                args.test_limit,
                facts["decoder_sha"],
                fingerprint(Path(d) / "manifest.json"),
            )
            for b, steps, d in budgets
            for s in args.seed_list
            for init in INITS  # the two initialisations of a seed side by side: they share the load
        ]
        for cell in grid[
            :: 2 * len(args.seed_list)
        ]:  # one per budget: what every worker would refuse
            preflight(finetune_job(cell))
        facts["caption_loss"] = caption_loss(decoder, args.data)
    except (DataError, CheckpointError) as err:
        print(err, file=sys.stderr)
        return 2
    finally:
        import ray

        if (
            ray.is_initialized()
        ):  # prepare() started a local Ray; the cells run in their own processes
            ray.shutdown()
    facts["load_start"] = load_start
    rows = run_cells(grid, run_cell, [], args.jobs, args.work / "cells.jsonl")
    chosen = {
        b: {i: [r for r in rows if r["pairs"] == b and r["init"] == i] for i in INITS}
        for b, _, _ in budgets
    }
    facts.update(
        params=rows[0]["params"],
        copy_bleu=rows[0]["copy_source_bleu"],
        minutes=(time.monotonic() - begin) / 60,
    )
    text = report(args, chosen, facts)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    plot(chosen, args.out.with_suffix(".png"))
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
