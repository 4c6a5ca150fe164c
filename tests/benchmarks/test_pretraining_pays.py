"""benchmarks/pretraining_pays.py at toy size: a 1-layer BERT "pretrained" for 0 steps on a cut of SST-2, every
cell of the grid fine-tuned for 3 steps in 2 worker processes, and the report, its verdicts and PNG written."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from benchmarks import pretraining_pays as bench

ROOT = Path(__file__).resolve().parents[2]
SST2 = ROOT.parent / "shared" / "data" / "sst2" / "train.tsv"


@pytest.fixture
def sst2_cut(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    if not SST2.is_file():
        pytest.skip(f"{SST2} is absent")
    cut = tmp_path / "sst2.tsv"
    with SST2.open(encoding="utf-8") as f:
        cut.write_text("".join(next(f) for _ in range(500)), encoding="utf-8")
    monkeypatch.setattr(bench, "SST2", cut)
    return cut


def tiny_encoder(sst2: Path, out: Path, vocab_size: int = 400) -> Path:
    from data_pipeline.tokenizer import train_tokenizer
    from pretrain.checkpoint import save_checkpoint
    from pretrain.models.bert import BertForPreTraining

    texts = [line.split("\t")[0] for line in sst2.read_text(encoding="utf-8").splitlines()[1:]]
    tok = train_tokenizer("wordpiece_uncased", texts, vocab_size=vocab_size)
    out.parent.mkdir(parents=True)
    tok.save(str(out.parent / "tokenizer.json"))
    config = tiny_bert_config(tok.get_vocab_size())
    return save_checkpoint(out, BertForPreTraining(config), config, out.parent / "tokenizer.json")


def tiny_bert_config(vocab_size: int) -> object:
    from pretrain.models.bert import BertConfig

    return BertConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
    )


def test_the_grid_runs_and_reports_every_cell(sst2_cut: Path, tmp_path: Path) -> None:
    encoder = tiny_encoder(sst2_cut, tmp_path / "enc" / "step-0000000")
    out = tmp_path / "result.md"
    argv = ["--encoder", str(encoder), "--few", "60", "--steps-few", "3", "--steps-all", "3"]
    argv += [
        "--seeds",
        "0",
        "--lrs",
        "1e-3,3e-4",
        "--batch-size",
        "8",
        "--jobs",
        "2",
        "--work",
        str(tmp_path / "work"),
    ]
    argv += ["--out", str(out)]
    assert bench.main(argv) == 0
    text = out.read_text()
    rows = [line for line in text.splitlines() if line.startswith(("| 60 |", "| all |"))]
    # 60 labels: 2 initialisations x 2 learning rates; all labels: each initialisation at its chosen one
    assert len(rows) == 6 and sum("(chosen)" in row for row in rows) == 4
    assert all(0.0 <= float(row.split("|")[7]) <= 100.0 for row in rows)  # the seed's test accuracy
    assert "- 60 labels: " in text and "- all labels: " in text
    assert out.with_suffix(".png").stat().st_size > 10_000
    # the cut holds exactly --few training phrases and the full split's validation rows (checked by main)
    assert len(bench.split_rows(tmp_path / "work" / "sst2-60", "train")) == 60
    cached = (tmp_path / "work" / "cells.jsonl").read_text().splitlines()
    assert len(cached) == 6
    assert bench.main(argv) == 0  # a second run fine-tunes nothing: every cell is cached
    assert len((tmp_path / "work" / "cells.jsonl").read_text().splitlines()) == 6
    assert (
        "--pretrained-lr-ratio" not in text and "encoder ×" not in text
    )  # the default reads as before
    # the encoder frozen: only the pretrained cells are new (3 of them); random init trains everything at lr as before
    assert bench.main([*argv, "--pretrained-lr-ratio", "0"]) == 0
    cached = [
        json.loads(line) for line in (tmp_path / "work" / "cells.jsonl").read_text().splitlines()
    ]
    assert len(cached) == 9 and [r["pretrained_lr_ratio"] for r in cached[6:]] == [0.0] * 3
    assert all(r["init"] == "pretrained" for r in cached[6:])
    text = out.read_text()
    assert "--pretrained-lr-ratio 0`" in text and "the encoder (every parameter loaded" in text
    rows = [line for line in text.splitlines() if line.startswith(("| 60 |", "| all |"))]
    assert len(rows) == 6
    assert all(("(encoder × 0)" in row) == ("| pretrained |" in row) for row in rows)
    # mean pooling: every cell is new (2 x 2 on the cut, 2 on all labels) and says so
    assert bench.main([*argv, "--pooling", "mean"]) == 0
    cached = [
        json.loads(line) for line in (tmp_path / "work" / "cells.jsonl").read_text().splitlines()
    ]
    assert len(cached) == 15 and {r["pooling"] for r in cached[9:]} == {"mean"}
    assert {r.get("pooling", "cls") for r in cached[:9]} == {"cls"}
    text = out.read_text()
    assert "--pooling mean`" in text and "(`classifier_pooling=mean`" in text
    # another encoder's vocabulary into the same --work: one line naming the stale directory, exit 2
    other = tiny_encoder(sst2_cut, tmp_path / "enc2" / "step-0000000", vocab_size=300)
    assert bench.main(["--encoder", str(other), *argv[2:]]) == 2


def test_a_missing_encoder_is_one_line_and_exit_2(
    sst2_cut: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--encoder", str(tmp_path / "nope"), "--work", str(tmp_path / "work")]
    assert bench.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(tmp_path / "nope") in err


def test_verdict_needs_every_seed_above_every_other() -> None:
    def chosen(pre: list[float], scratch: list[float]) -> dict[str, list[dict]]:
        return {
            "pretrained": [{"test_accuracy": a} for a in pre],
            "random init": [{"test_accuracy": a} for a in scratch],
        }

    assert bench.verdict(chosen([0.80, 0.82], [0.70, 0.79])).startswith("pretrained, by 6.5")
    assert bench.verdict(chosen([0.60, 0.65], [0.70, 0.71])).startswith("random init")
    assert bench.verdict(chosen([0.80, 0.70], [0.75, 0.76])).startswith("neither")


def test_the_learning_rate_is_chosen_on_validation_not_test() -> None:
    rows = [
        {
            "labels": "9",
            "init": "pretrained",
            "lr": lr,
            "validation_accuracy": v,
            "test_accuracy": t,
        }
        for lr, v, t in (
            (1e-3, 0.70, 0.90),
            (1e-3, 0.72, 0.90),
            (3e-4, 0.75, 0.10),
            (3e-4, 0.71, 0.1),
        )
    ]
    assert bench.best_lr(rows, "9", "pretrained") == 3e-4


def test_pretrained_lr_ratio_must_be_a_finite_number_at_least_0(tmp_path: Path) -> None:
    for bad in ("-1", "nan"):
        with pytest.raises(SystemExit) as info:
            bench.parse_args(["--encoder", str(tmp_path), "--pretrained-lr-ratio", bad])
        assert info.value.code == 2
    assert bench.parse_args(["--encoder", str(tmp_path)]).pretrained_lr_ratio == 1.0


def test_cells_cached_before_the_ratio_existed_are_reused_at_ratio_1(tmp_path: Path) -> None:
    from benchmarks.cells import run_cells

    cell = bench.Cell("60", "pretrained", 0, 3, 1e-3, "data", "enc")
    old = {k: v for k, v in dataclasses.asdict(cell).items() if k != "pretrained_lr_ratio"}
    cache = tmp_path / "cells.jsonl"
    cache.write_text(json.dumps({**old, "validation_accuracy": 0.5}) + "\n")
    (row,) = run_cells(
        [cell], bench.run_cell, [8], 1, cache
    )  # nothing to run: run_cell would fail here
    assert row["validation_accuracy"] == 0.5 and row["pretrained_lr_ratio"] == 1.0


def test_the_report_names_the_text_the_encoder_was_pretrained_on(tmp_path: Path) -> None:
    """From the checkpoint's data manifest (`data.paths` of its prepare), not assumed: the WikiText-2 and the
    WikiText-2 + Tatoeba encoders must not read alike; a checkpoint without one says so."""
    from pretrain.checkpoint import save_checkpoint
    from pretrain.models.bert import BertForPreTraining

    config = tiny_bert_config(50)
    data = tmp_path / "data" / "manifest.json"
    data.parent.mkdir()
    paths = ["/x/shared/data/wikitext2/train.txt", "runs/tatoeba-en.txt"]
    data.write_text(json.dumps({"config": {"paths": paths}}))
    with_data = save_checkpoint(
        tmp_path / "a", BertForPreTraining(config), config, data_manifest=data
    )
    assert bench.pretraining_text(with_data) == "`wikitext2/train.txt`, `runs/tatoeba-en.txt`"
    without = save_checkpoint(tmp_path / "b", BertForPreTraining(config), config)
    assert bench.pretraining_text(without) == "not recorded"
    data.unlink()  # the data directory deleted since: the manifest's path leads nowhere
    assert bench.pretraining_text(with_data) == "not recorded"
