"""benchmarks/decoder_pays.py at toy size: Multi30k's first pairs prepared with a small BPE, a 1-layer GPT
"pretrained" for 0 steps in its vocabulary, every cell of the grid fine-tuned for 2 steps in 2 worker processes and
scored on 4 test sentences, and the report, its verdicts and PNG written."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks import decoder_pays as bench

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def data(tmp_path: Path) -> Path:
    if not bench.MULTI30K.is_dir():
        pytest.skip(f"{bench.MULTI30K} is absent")
    from cluster.config import load_config
    from cluster.jobs import PrepareJob
    from data_pipeline.prepare import prepare

    files = []
    for lang in ("de", "en"):
        lines = (bench.MULTI30K / f"train.{lang}").read_text(encoding="utf-8").splitlines()[:400]
        files.append(tmp_path / f"train.{lang}")
        files[-1].write_text("\n".join(lines) + "\n", encoding="utf-8")
    job = load_config(
        PrepareJob,
        ROOT / "configs" / "data-multi30k.yaml",
        [f"data.paths=[{files[0]}, {files[1]}]", "data.vocab_size=600"],
    )
    prepare(job.data, tmp_path / "multi30k")
    return tmp_path / "multi30k"


def tiny_decoder(data: Path, out: Path, n_embd: int = 32) -> Path:
    from tokenizers import Tokenizer

    from pretrain.checkpoint import save_checkpoint
    from pretrain.models.gpt import GPTConfig, GPTLMHeadModel

    tokenizer = data / "tokenizer.json"
    config = GPTConfig(
        vocab_size=Tokenizer.from_file(str(tokenizer)).get_vocab_size(),
        n_embd=n_embd,
        n_layer=1,
        n_head=2,
        n_positions=128,
    )
    return save_checkpoint(out, GPTLMHeadModel(config), config, tokenizer)


def argv(decoder: Path, data: Path, tmp_path: Path) -> list[str]:
    return [
        "--decoder",
        str(decoder),
        "--data",
        str(data),
        "--few",
        "120",
        "--steps-few",
        "2",
        "--steps-all",
        "2",
        "--seeds",
        "0,1",
        "--batch-size",
        "8",
        "--jobs",
        "2",
        "--test-limit",
        "4",
        "--work",
        str(tmp_path / "work"),
        "--out",
        str(tmp_path / "result.md"),
    ]


def test_the_grid_runs_and_reports_every_cell(data: Path, tmp_path: Path) -> None:
    decoder = tiny_decoder(data, tmp_path / "gpt" / "step-0000000")
    args = argv(decoder, data, tmp_path)
    assert bench.main(args) == 0
    text = (tmp_path / "result.md").read_text()
    rows = [line for line in text.splitlines() if line.startswith(("| 120 |", "| all |"))]
    assert len(rows) == 4  # 2 budgets x 2 initialisations, seeds within a row
    assert all(len(row.split("|")[4].split(",")) == 2 for row in rows)  # BLEU of each seed
    assert "- 120 pairs: " in text and "- all pairs: " in text
    assert (tmp_path / "result.png").stat().st_size > 10_000
    cut = tmp_path / "work" / "multi30k-120"
    assert (cut / "tokenizer.json").read_bytes() == (data / "tokenizer.json").read_bytes()
    # the cut trains on (nearly) every one of its pairs: 1% is held out for validation
    from data_pipeline.loader import read_manifest

    assert read_manifest(cut / "translation" / "manifest.json")["splits"]["train"]["rows"] >= 115
    # each seed's encoder is random, and differs between seeds
    from pretrain.checkpoint import load_checkpoint

    enc = [load_checkpoint(tmp_path / "work" / "encoders" / f"seed-{s}").model for s in (0, 1)]
    assert enc[0].config.hidden_size == 32 and enc[0].config.num_hidden_layers == 1
    w0, w1 = (m.state_dict()["bert.embeddings.word_embeddings.weight"] for m in enc)
    assert not w0.equal(w1)
    assert len((tmp_path / "work" / "cells.jsonl").read_text().splitlines()) == 8
    assert bench.main(args) == 0  # a second run fine-tunes nothing: every cell is cached
    assert len((tmp_path / "work" / "cells.jsonl").read_text().splitlines()) == 8
    # a decoder of another shape into the same --work: its random encoders no longer fit; one line, exit 2
    wider = tiny_decoder(data, tmp_path / "gpt2" / "step-0000000", n_embd=48)
    assert bench.main(["--decoder", str(wider), *args[2:]]) == 2


def test_a_decoder_of_another_vocabulary_is_one_line_and_exit_2(
    data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from tokenizers import Tokenizer

    from data_pipeline.tokenizer import train_tokenizer

    other = tmp_path / "other"
    other.mkdir()
    texts = (bench.MULTI30K / "train.en").read_text(encoding="utf-8").splitlines()[:300]
    train_tokenizer("bpe", texts, vocab_size=300).save(str(other / "tokenizer.json"))
    assert Tokenizer.from_file(str(other / "tokenizer.json")).get_vocab_size() <= 300
    decoder = tiny_decoder(other, tmp_path / "gpt" / "step-0000000")
    assert bench.main(argv(decoder, data, tmp_path)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--decoder" in err


def test_a_missing_decoder_is_one_line_and_exit_2(
    data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert bench.main(argv(tmp_path / "nope", data, tmp_path)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(tmp_path / "nope") in err
