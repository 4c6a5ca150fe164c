"""One held-out text for a character GPT and the language-model baselines (issue 15, tiny-shakespeare):
`kiln data prepare` with `split: contiguous`, `dedupe: false` and `text_unit: line` holds out exactly
the lines `kiln lm-baseline` scores (`split_path`), and `kiln lm-baseline model=gpt` scores a
char-tokenizer GPT in nats per character, the same figure as the mean loss over the clm blocks."""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pytest
import ray
import torch
import torch.nn.functional as F

from cluster.config import load_config
from cluster.jobs import PrepareJob, PretrainJob
from data_pipeline.config import DataConfig
from data_pipeline.examples import BuildParams, build_clm
from data_pipeline.prepare import prepare
from data_pipeline.shards import read_split
from data_pipeline.tokenizer import load_tokenizer, special_token_ids, train_tokenizer
from finetune.lm_baselines import LMBaselineJob, gpt_lines_perplexity, load_texts, text_stats
from pretrain.checkpoint import save_checkpoint
from pretrain.models.gpt import GPTConfig, GPTLMHeadModel

REPO = Path(__file__).resolve().parents[2]
SPEAKERS = ("First Citizen:", "All:", "MENENIUS:")


def play(lines: int) -> str:
    """Shakespeare-shaped text: repeated speaker lines, blank lines between speeches, and the
    whitespace that cleaning normalises (a double space, a tab, trailing spaces)."""
    out = []
    for i in range(lines):
        if i % 4 == 0:
            out += ["", SPEAKERS[i % 3]]
        out.append(f"Speak {i},  speak!\tWe know't, we know't.  " if i % 7 == 0 else f"Line {i}.")
    return "\n".join(out) + "\n"


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    if ray.is_initialized():  # another test module's Ray: use it, leave it running
        yield
        return
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def _stream(blocks: list[list[int]]) -> list[int]:
    """The packed token stream back from clm blocks (consecutive blocks share one token)."""
    return [*blocks[0], *(t for block in blocks[1:] for t in block[1:])] if blocks else []


@pytest.mark.e2e
def test_prepared_clm_holds_out_exactly_the_lm_baseline_lines(
    local_ray: None, tmp_path: Path
) -> None:
    text = tmp_path / "play.txt"
    text.write_text(play(240), encoding="utf-8")
    cfg = DataConfig(
        source="text",
        paths=[str(text)],
        text_unit="line",
        tokenizer="char",
        vocab_size=128,
        seq_len=16,
        tasks=["clm"],
        split="contiguous",
        dedupe=False,
        validation_fraction=0.1,
        test_fraction=0.1,
    )
    manifest = prepare(cfg, tmp_path / "data")
    lines = load_texts(LMBaselineJob(split_path=str(text), valid_fraction=0.1, test_fraction=0.1))
    assert manifest["dropped"]["documents"]["duplicate"] == 0
    assert manifest["sources"]["documents"]["splits"] == {
        "train": len(lines["train"]),
        "validation": len(lines["valid"]),
        "test": len(lines["test"]),
    }
    tok = load_tokenizer(tmp_path / "data" / "tokenizer.json")
    for split, name in (("train", "train"), ("validation", "valid")):
        blocks = read_split(tmp_path / "data" / "clm", split, ["input_ids"]).column(0).to_pylist()
        got = [tok.id_to_token(i) for i in _stream(blocks)]
        want = [t for line in lines[name] for t in ("[BOS]", *line, "[EOS]")]
        # Every line, in order, cleaned alike (one space where the file had "  " or a tab); only the
        # tail shorter than a block is cut, as packing always does.
        assert got == want[: len(got)] and len(want) - len(got) <= cfg.seq_len
    assert "[UNK]" not in got and any(line == "All:" for line in lines["valid"] + lines["train"])


def _ends_a_block(lines: list[str], seq_len: int) -> list[str]:
    """`lines` plus one line sized so the packed stream `[BOS] line [EOS]`... is whole clm blocks."""
    extra = (1 - sum(len(s) + 2 for s in lines) - 2) % seq_len or seq_len
    return [*lines, "x" * extra]


def test_lm_baseline_scores_a_char_gpt_in_nats_per_character(tmp_path: Path) -> None:
    train = ["First Citizen:", "Before we proceed any further, hear me speak.", "All:", "Speak."]
    held = _ends_a_block(["All:", "Resolved. resolved.", "First Citizen:", "You know."], 16)
    tok = train_tokenizer("char", train + held, 80)
    tok.save(str(tmp_path / "tokenizer.json"))
    special = special_token_ids(tok)
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=tok.get_vocab_size(), n_positions=16, n_embd=32, n_layer=2, n_head=2)
    model = GPTLMHeadModel(cfg).eval()
    ckpt = save_checkpoint(tmp_path / "gpt", model, cfg, tmp_path / "tokenizer.json")

    # Windows as long as the stride: each token is scored with the context a clm block gives it.
    score = gpt_lines_perplexity(ckpt, held, window=16, stride=16)
    stats = text_stats(held)
    assert score["units"] == stats["chars"] == sum(len(s) + 1 for s in held)  # one [EOS] per "\n"
    assert score["nats_per_char"] == pytest.approx(score["nll"] / stats["chars"])
    assert score["nats_per_char"] == pytest.approx(math.log(score["ppl_char"]))

    # The same text as `kiln data prepare` packs it: the mean loss over its blocks, [BOS] not a target.
    params = BuildParams(16, 64, 64, special)
    ids = pa.table({"ids": pa.array([tok.encode(s).ids for s in held], pa.list_(pa.int32()))})
    blocks, counters = build_clm(ids, params, None)  # type: ignore[arg-type]
    assert counters == {"tail_tokens_dropped": 0}
    x = torch.tensor(blocks.column("input_ids").to_pylist())  # (B, 17)
    labels = x[:, 1:].masked_fill(x[:, 1:] == special["[BOS]"], -100)
    with torch.no_grad():
        logits, _ = model(x[:, :-1])  # (B, 16, V)
    nll = F.cross_entropy(logits.transpose(1, 2), labels, reduction="sum", ignore_index=-100)
    assert int((labels != -100).sum()) == score["units"]
    assert float(nll) == pytest.approx(score["nll"], rel=1e-5)
    # Counting [BOS] as a target, as the clm collator does today, adds one per line but the first.
    assert int((x[:, 1:] == special["[BOS]"]).sum()) == len(held) - 1


def test_shakespeare_recipes_never_train_on_the_scored_lines() -> None:
    """The GPT data either cuts the file itself exactly as lm-baseline does (split: contiguous, no
    de-duplication), or reads only the train lines lm-baseline wrote; a hash split of the whole file
    would put ~95% of the valid and test lines into training."""
    ngram = load_config(LMBaselineJob, REPO / "configs/lm-ngram-shakespeare.yaml")
    data = load_config(PrepareJob, REPO / "configs/data-shakespeare-char.yaml").data
    cuts_alike = (
        data.paths == [ngram.split_path]
        and (data.split, data.dedupe) == ("contiguous", False)
        and (data.validation_fraction, data.test_fraction)
        == (ngram.valid_fraction, ngram.test_fraction)
    )
    baseline_train = Path(ngram.out_dir).name + "/splits/train.txt"
    assert cuts_alike or (len(data.paths) == 1 and data.paths[0].endswith(baseline_train))
    assert (data.text_unit, data.tokenizer, data.tasks) == ("line", "char", ["clm"])
    for recipe in ("gpt-char-shakespeare.yaml", "gpt-char-shakespeare-30min.yaml"):
        job = load_config(PretrainJob, REPO / "configs" / recipe)
        assert job.task == "clm" and not job.document_attention  # context spans lines
        # The data command in the recipe's header prepares blocks as long as the model's context.
        header = (REPO / "configs" / recipe).read_text(encoding="utf-8")
        shown = re.search(r"data-shakespeare-char.yaml (?:data.seq_len=(\d+) )?--out (\S+)", header)
        assert shown is not None and job.data_dir.endswith(f"/{shown.group(2)}")
        assert job.model.n_positions == int(shown.group(1) or data.seq_len)
