"""The LM-baseline runner: comparable perplexities, text input and its errors, the n-gram and char-LSTM runs on
the built-in sample, GPT checkpoint scoring, the recipes."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from finetune_testlib import BOS, EOS, Pretrained
from tokenizers import Tokenizer

from cluster.config import load_config
from data_pipeline.configlib import ConfigError, from_preset
from data_pipeline.errors import DataError
from data_pipeline.sample import sample_documents
from finetune.lm_baselines import (
    LMBaselineJob,
    _windows,
    format_summary,
    gpt_text_perplexity,
    load_texts,
    perplexities,
    read_text_lines,
    run_lm_baseline,
    stream_nll,
    text_stats,
)
from finetune.models import ARCHITECTURES
from finetune.models.char_rnn import CharRNNConfig, CharRNNLM, CharVocab
from finetune.models.ngram import NGramLM
from pretrain.checkpoint import CheckpointError, load_checkpoint

REPO = Path(__file__).resolve().parents[2]
QUIET = {"log": lambda msg: None}


def test_per_word_and_per_char_conversions_on_a_hand_example() -> None:
    lines = ["a b", "c"]  # 3 words; 6 characters: "a b\n" and "c\n"
    assert text_stats(lines) == {"lines": 2, "words": 3, "chars": 6}
    m = perplexities(6.0, 5, lines)
    assert m["ppl_word"] == pytest.approx(math.exp(2.0))
    assert m["ppl_char"] == pytest.approx(math.e)
    assert m["ppl_unit"] == pytest.approx(math.exp(6.0 / 5))
    assert m["bits_per_char"] == pytest.approx(1 / math.log(2))
    with pytest.raises(ValueError):
        perplexities(1.0, 0, lines)


def test_ngram_conversions_agree_with_its_own_units() -> None:
    train, held = ["the cat sat", "the dog sat", "a cat ran"], ["the cat ran", "a dog sat"]
    words = NGramLM(order=2).fit(train)
    nll, units = words.score_lines(held)
    m = perplexities(nll, units, held)
    assert units == 6 + 2 and m["words"] == 6
    assert m["ppl_word"] == pytest.approx(m["ppl_unit"] ** (units / m["words"]))
    chars = NGramLM(order=3, unit="char").fit(train)
    m = perplexities(*chars.score_lines(held), held)
    assert (
        m["units"] == m["chars"] == len("the cat ran\na dog sat\n")
    )  # </s> stands for the newline
    assert m["ppl_unit"] == pytest.approx(m["ppl_char"])


def test_bad_text_files_raise_data_error_naming_the_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="nowhere.txt"):
        read_text_lines(tmp_path / "nowhere.txt")
    (tmp_path / "blank.txt").write_text("  \n\n", encoding="utf-8")
    with pytest.raises(DataError, match="blank.txt.*empty"):
        read_text_lines(tmp_path / "blank.txt")
    (tmp_path / "latin1.txt").write_bytes("ok\ncaf\xe9\n".encode("latin-1"))
    with pytest.raises(DataError, match="latin1.txt:2.*UTF-8"):
        read_text_lines(tmp_path / "latin1.txt")
    (tmp_path / "ok.txt").write_text(" = Heading = \n \n para one \n", encoding="utf-8")
    assert read_text_lines(tmp_path / "ok.txt") == ["= Heading =", "para one"]
    with pytest.raises(DataError, match="nowhere.txt"):
        run_lm_baseline(
            LMBaselineJob(split_path=str(tmp_path / "nowhere.txt")), tmp_path / "out", **QUIET
        )


def test_text_sources_and_job_validation(tmp_path: Path) -> None:
    texts = load_texts(LMBaselineJob(sample_docs=40))
    assert all(texts[k] for k in ("train", "valid", "test"))
    assert load_texts(LMBaselineJob(sample_docs=40)) == texts  # deterministic
    docs = sample_documents(0, 40)  # 36 train, 2 valid, 2 test documents, in order; every line once
    assert texts["test"] == [s.strip() for d in docs[-2:] for s in d.split("\n") if s.strip()]
    assert texts["train"] + texts["valid"] + texts["test"] == [
        s.strip() for d in docs for s in d.split("\n") if s.strip()
    ]
    file = tmp_path / "lines.txt"
    file.write_text("".join(f"line {i}\n\n" for i in range(100)), encoding="utf-8")
    cut = load_texts(LMBaselineJob(split_path=str(file), valid_fraction=0.1, test_fraction=0.2))
    assert cut["train"] == [f"line {i}" for i in range(70)] and cut["test"][0] == "line 80"
    with pytest.raises(ValueError, match="go together"):
        LMBaselineJob(train_path=str(file))
    with pytest.raises(ConfigError, match=r"model: must be one of \['ngram', 'char_lstm', 'gpt'\]"):
        LMBaselineJob(model="transformer")
    with pytest.raises(ConfigError, match="ngram_unit: .*did you mean 'char'"):
        LMBaselineJob(ngram_unit="chars")
    with pytest.raises(ValueError, match="gpt_checkpoint"):
        LMBaselineJob(model="gpt")


def test_recipes_load_as_jobs() -> None:
    ngram = load_config(LMBaselineJob, REPO / "configs/lm-ngram-wikitext2.yaml")
    assert (ngram.model, ngram.ngram_order) == ("ngram", 3) and ngram.test_path.endswith(
        "wikitext2/test.txt"
    )
    lstm = load_config(
        LMBaselineJob, REPO / "configs/lm-charlstm-shakespeare.yaml", ["char_model.hidden=128"]
    )
    assert lstm.model == "char_lstm" and lstm.char_model.preset == "small"
    assert (lstm.char_model.layers, lstm.char_model.hidden) == (
        2,
        128,
    )  # the preset, then the override


def test_ngram_run_on_the_built_in_sample(tmp_path: Path) -> None:
    job = LMBaselineJob(model="ngram", ngram_order=2, sample_docs=40)
    metrics = run_lm_baseline(job, tmp_path, **QUIET)
    on_disk = json.loads((tmp_path / "metrics.json").read_text(encoding="utf-8"))
    assert on_disk["test"] == pytest.approx(metrics["test"]) and on_disk["job"]["ngram_order"] == 2
    test = metrics["test"]
    assert (
        test["units"] == test["words"] + test["lines"] and 0 < test["oov_units"] < test["words"] / 2
    )
    assert 1 < test["ppl_char"] < test["ppl_unit"] < test["ppl_word"] < metrics["vocab_size"]
    reloaded = NGramLM.load(tmp_path / "ngram.json")
    assert reloaded.score_lines(load_texts(job)["test"])[0] == pytest.approx(test["nll"], rel=1e-12)
    assert "ppl/word" in format_summary(metrics) and "test" in format_summary(metrics)


def test_char_lstm_run_on_the_built_in_sample(tmp_path: Path) -> None:
    job = LMBaselineJob(
        model="char_lstm",
        char_model=from_preset(CharRNNConfig, "tiny"),
        sample_docs=12,
        steps=8,
        batch_size=4,
        seq_len=32,
        eval_every=4,
        eval_chars=2000,
        log_every=4,
        sample_chars=40,
    )
    lines: list[str] = []
    metrics = run_lm_baseline(job, tmp_path, log=lines.append)
    assert any("step 8/8" in line for line in lines)
    assert (tmp_path / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    samples = (tmp_path / "samples.txt").read_text(encoding="utf-8").split("\n\n=====\n\n")
    assert len(samples) == 3 and all(s.startswith("\n") and len(s) >= 41 for s in samples)
    test = metrics["test"]
    assert test["units"] == test["chars"] and test["ppl_unit"] == pytest.approx(test["ppl_char"])
    assert metrics["train"]["steps"] == 8 and 1 < test["ppl_char"] < metrics["vocab_size"] * 2
    loaded = load_checkpoint(tmp_path / "checkpoint", ARCHITECTURES)
    vocab = CharVocab.load(tmp_path / "char_vocab.json")
    text = "\n" + "\n".join(load_texts(job)["test"]) + "\n"
    nll, n = stream_nll(loaded.model, torch.tensor(vocab.encode(text)))  # type: ignore[arg-type]
    assert (n, nll) == (test["units"], pytest.approx(test["nll"], rel=1e-9))


def test_stream_segments_score_like_one_pass() -> None:
    torch.manual_seed(0)
    model = CharRNNLM(from_preset(CharRNNConfig, "tiny", vocab_size=9)).eval()
    ids = torch.randint(0, 9, (5000,))
    logits, _ = model(ids[None, :-1])
    exact = F.cross_entropy(logits[0].double(), ids[1:], reduction="sum").item()
    one, n = stream_nll(model, ids, streams=1)
    many, _ = stream_nll(
        model, ids, streams=4, burn_in=10**6
    )  # burn-in back to the start: exact again
    approx, _ = stream_nll(model, ids, streams=4, burn_in=64)
    assert (
        n == 4999
        and one == pytest.approx(exact, rel=1e-5)
        and many == pytest.approx(exact, rel=1e-5)
    )
    assert approx == pytest.approx(exact, rel=1e-2)


def test_windows_score_every_target_once_with_enough_context() -> None:
    for n, window, stride in [(10, 4, 2), (3, 8, 4), (200, 16, 16), (101, 32, 5)]:
        spans = _windows(n, window, stride)
        scored = [t for _, end, first in spans for t in range(first, end)]
        assert scored == list(range(1, n))
        for begin, end, first in spans:
            assert end - 1 - begin <= window and begin < first
            assert begin == 0 or first - begin >= window - stride + 1


def gpt_reference_nll(p: Pretrained, lines: list[str]) -> tuple[float, int]:
    """One window over the whole stream `[BOS] line [EOS]`...: the exact full-context NLL, [BOS] unscored."""
    tok = Tokenizer.from_file(str(p.tokenizer_file))
    ids = [i for line in lines for i in [BOS, *tok.encode(line).ids, EOS]]
    x = torch.tensor(ids)
    with torch.no_grad():
        logits, _ = p.gpt.eval()(x[None, :-1])
    targets = x[1:].clone()
    targets[targets == BOS] = -100
    return F.cross_entropy(logits[0], targets, reduction="sum", ignore_index=-100).item(), int(
        (targets >= 0).sum()
    )


def test_gpt_checkpoint_scores_a_text_file(pretrained: Pretrained, tmp_path: Path) -> None:
    lines = ["1 2 3", "4 5", "6 7 8 9 0", "3 3"]
    text = tmp_path / "digits.txt"
    text.write_text("\n\n".join(lines) + "\n", encoding="utf-8")
    ref_nll, ref_units = gpt_reference_nll(pretrained, lines)
    assert ref_units == 12 + 4  # digits, and one [EOS] per line
    whole = gpt_text_perplexity(pretrained.gpt_dir, text)
    assert whole["window"] == 128 and whole["units"] == ref_units and whole["words"] == 12
    assert whole["nll"] == pytest.approx(ref_nll, rel=1e-5)
    assert whole["ppl_word"] == pytest.approx(math.exp(ref_nll / 12), rel=1e-5)
    sliding = gpt_text_perplexity(pretrained.gpt_dir, text, window=6, stride=3, batch_size=2)
    assert sliding["units"] == ref_units and sliding["nll"] != pytest.approx(ref_nll, rel=1e-9)
    assert sliding["nll"] == pytest.approx(
        ref_nll, rel=0.2
    )  # less context, a similar score for a random net
    run = run_lm_baseline(
        LMBaselineJob(
            model="gpt",
            gpt_checkpoint=str(pretrained.gpt_dir),
            train_path=str(text),
            valid_path=str(text),
            test_path=str(text),
        ),
        tmp_path / "run",
        **QUIET,
    )
    assert run["test"]["nll"] == pytest.approx(ref_nll, rel=1e-5)
    with pytest.raises(CheckpointError, match="GPT"):
        gpt_text_perplexity(pretrained.bert_dir, text)
    with pytest.raises(DataError, match="absent.txt"):
        gpt_text_perplexity(pretrained.gpt_dir, tmp_path / "absent.txt")
