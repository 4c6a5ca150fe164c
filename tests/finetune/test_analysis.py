"""Beam-search error analysis on hand-built probability tables with known verdicts, and on a real model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from finetune_testlib import make_tokenizer, tiny_seq2seq
from kiln_testlib import word_tokenizer
from torch import Tensor, nn

from finetune.analysis import analyze_beam, classify, score_sequences, write_analysis
from finetune.decode import beam_search

PAD, BOS, EOS = 0, 5, 6  # kiln_testlib.SPECIALS
WORDS = ["a", "b", "c"]
A, B, C = 7, 8, 9  # the ids of WORDS
VOCAB = 10

TABLES: dict[tuple[int, tuple[int, ...]], dict[int, float]] = {
    # source "a": greedy takes a (0.6) and stops, P(a) = 0.24; the reference "b" has P = 0.36 -> search error at B=1
    (A, ()): {A: 0.6, B: 0.4},
    (A, (A,)): {EOS: 0.4, A: 0.3, B: 0.3},
    (A, (B,)): {EOS: 0.9, A: 0.05, B: 0.05},
    # source "b": the model prefers "a" (0.63) to the reference "b" (0.27) -> model error at every width
    (B, ()): {A: 0.7, B: 0.3},
    (B, (A,)): {EOS: 0.9, A: 0.05, B: 0.05},
    (B, (B,)): {EOS: 0.9, A: 0.05, B: 0.05},
    # source "c": output "a" (P .275, 2 tokens) vs reference "b b" (P .2025, 3 tokens): raw log-prob prefers the
    # output, the per-token ("avg") score the reference
    (C, ()): {A: 0.55, B: 0.45},
    (C, (A,)): {EOS: 0.5, A: 0.25, B: 0.25},
    (C, (B,)): {B: 0.9, EOS: 0.05, A: 0.05},
    (C, (B, B)): {EOS: 0.5, A: 0.25, B: 0.25},
}
DEFAULT = {EOS: 0.5, A: 0.25, B: 0.25}


class TableModel(nn.Module):
    """The translation interface over TABLES: the first source id picks the table, the target prefix the row.

    forward (teacher forcing) and decode_step read the same table, as a real model's two paths must agree.
    """

    def __init__(self) -> None:
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(1))  # a device, and eval()/train() to toggle

    def _row(self, table: int, prefix: tuple[int, ...]) -> Tensor:
        probs = torch.full((VOCAB,), 1e-12)
        for tok, p in TABLES.get((table, prefix), DEFAULT).items():
            probs[tok] = p
        return probs.log()

    def encode(self, src_ids: Tensor, src_mask: Tensor) -> Tensor:
        return src_ids[:, :1].float().unsqueeze(-1)  # (B,1,1): the table id

    def forward(self, src_ids: Tensor, src_mask: Tensor, tgt_in: Tensor) -> Tensor:
        rows = [
            [
                self._row(int(src_ids[b, 0]), tuple(tgt_in[b, 1 : u + 1].tolist()))
                for u in range(tgt_in.size(1))
            ]
            for b in range(tgt_in.size(0))
        ]
        return torch.stack([torch.stack(r) for r in rows])  # (B,U,V)

    def decode_step(
        self, tgt_ids: Tensor, memory: Tensor, *, src_mask: Tensor, cache: Any | None
    ) -> tuple[Tensor, Any]:
        if cache is None:
            cache, tgt_ids = (
                [(int(memory[i, 0, 0]), ()) for i in range(tgt_ids.size(0))],
                tgt_ids[:, 1:],
            )
        cache = [(t, prefix + tuple(tgt_ids[i].tolist())) for i, (t, prefix) in enumerate(cache)]
        return torch.stack([self._row(*key) for key in cache]), cache

    def reorder_cache(self, cache: Any, index: Tensor) -> Any:
        return [cache[i] for i in index.tolist()]


def test_score_sequences_sums_the_table_log_probs() -> None:
    src = torch.tensor([[A, EOS], [B, EOS], [C, EOS]])
    got = score_sequences(
        TableModel(), src, torch.ones_like(src), [[B, EOS], [A], [B, B, EOS]], BOS, PAD
    )
    want = torch.tensor(
        [0.4 * 0.9, 0.7, 0.45 * 0.9 * 0.5]
    ).log()  # [A] alone: cut off, no [EOS] scored
    torch.testing.assert_close(got, want)
    with pytest.raises(ValueError, match="2 targets for 3 sources"):
        score_sequences(TableModel(), src, torch.ones_like(src), [[A], [B]], BOS, PAD)


def test_classify() -> None:
    assert classify(True, True, -5.0, -1.0) == "correct"
    assert classify(False, True, -2.0, -1.0) == "search"
    assert classify(False, True, -1.0, -2.0) == "model"
    assert (
        classify(False, True, -1.0, -1.0) == "model"
    )  # a tie: the search found what the model likes as much
    assert classify(False, False, -1.0, None) == "unreachable"


def test_greedy_trap_is_a_search_error_that_a_wider_beam_fixes() -> None:
    result = analyze_beam(
        TableModel(),
        word_tokenizer(WORDS),
        ["a", "b"],
        ["b", "b"],
        beam_sizes=(1, 2, 3),
        length_penalty="none",
        max_len=6,
    )
    trap, wrong = result.sentences
    assert trap["outputs"]["1"]["hypothesis"] == "a" and trap["outputs"]["1"]["verdict"] == "search"
    assert trap["outputs"]["1"]["logprob"] == pytest.approx(
        torch.tensor(0.24).log().item(), abs=1e-5
    )
    assert trap["ref_logprob"] == pytest.approx(torch.tensor(0.36).log().item(), abs=1e-5)
    for beam in ("2", "3"):
        assert trap["outputs"][beam] | {"verdict": "correct"} == trap["outputs"][beam]
        assert (
            wrong["outputs"][beam]["hypothesis"] == "a"
            and wrong["outputs"][beam]["verdict"] == "model"
        )
    counts = {r.beam_size: r.counts for r in result.rows}
    assert counts[1] == {"correct": 0, "search": 1, "model": 1, "unreachable": 0}
    assert counts[2] == counts[3] == {"correct": 1, "search": 0, "model": 1, "unreachable": 0}
    assert [r.exact for r in result.rows] == [0.0, 0.5, 0.5]
    assert all(
        r.counts == r.counts_raw for r in result.rows
    )  # without a length penalty both comparisons agree
    assert result.max_rescoring_diff < 1e-5


def test_normalised_and_raw_comparisons_can_disagree() -> None:
    result = analyze_beam(
        TableModel(),
        word_tokenizer(WORDS),
        ["c"],
        ["b b"],
        beam_sizes=(1, 2),
        length_penalty="avg",
        alpha=1.0,
        max_len=6,
    )
    [sent] = result.sentences
    narrow = sent["outputs"]["1"]
    assert narrow["hypothesis"] == "a"
    assert (
        narrow["verdict"] == "search"
    )  # per token the reference (-0.532) beats the output (-0.645) ...
    assert (
        narrow["verdict_raw"] == "model"
    )  # ... in total log-prob the output (-1.29) beats it (-1.60)
    assert narrow["score"] == pytest.approx(torch.tensor(0.275).log().item() / 2, abs=1e-5)
    assert sent["ref_score"] == pytest.approx(torch.tensor(0.2025).log().item() / 3, abs=1e-5)
    assert sent["outputs"]["2"]["verdict"] == "correct"


def test_references_longer_than_max_len_are_unreachable() -> None:
    result = analyze_beam(
        TableModel(),
        word_tokenizer(WORDS),
        ["a", "a"],
        ["b b b b", "b"],
        beam_sizes=(2,),
        length_penalty="none",
        max_len=4,
    )
    assert [s["outputs"]["2"]["verdict"] for s in result.sentences] == ["unreachable", "correct"]
    assert result.sentences[0]["ref_logprob"] is None
    assert result.rows[0].counts["unreachable"] == 1


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="line-aligned"):
        analyze_beam(TableModel(), word_tokenizer(WORDS), ["a"], ["a", "b"])
    with pytest.raises(ValueError, match="beam_sizes"):
        analyze_beam(TableModel(), word_tokenizer(WORDS), ["a"], ["a"], beam_sizes=(0,))
    with pytest.raises(ValueError, match="length_penalty"):
        analyze_beam(TableModel(), word_tokenizer(WORDS), ["a"], ["a"], length_penalty="cubic")


def test_real_model_rescoring_matches_the_search_and_files_are_written(tmp_path: Path) -> None:
    model = tiny_seq2seq("seq2seq_warm", initializer_range=0.3, encoder=dict(initializer_range=0.3))
    srcs = ["1 2 3", "4 5", "6 7 8 9", "0"]
    refs = ["3 2 1", "5 4", "9 8 7 6", "0"]
    result = analyze_beam(
        model,
        make_tokenizer(),
        srcs,
        refs,
        beam_sizes=(1, 3),
        length_penalty="gnmt",
        alpha=0.6,
        max_len=8,
        batch_size=3,
    )
    assert (
        result.max_rescoring_diff < 1e-4
    )  # teacher-forced rescoring == the search's own cached log-probs
    assert all(set(sent["outputs"]) == {"1", "3"} for sent in result.sentences)
    assert sum(r.counts[v] for r in result.rows for v in r.counts) == 2 * len(srcs)
    files = write_analysis(result, tmp_path / "out")
    assert [f.name for f in files] == [
        "analysis.json",
        "summary.md",
        "bleu_vs_beam.png",
        "errors_vs_beam.png",
    ]
    doc = json.loads(files[0].read_text())
    assert doc["settings"]["beam_sizes"] == [1, 3] and len(doc["sentences"]) == 4
    table = files[1].read_text()
    assert "| 1 |" in table and "| 3 |" in table and "search errors" in table
    for png in files[2:]:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


def test_beam_hypotheses_keep_their_ranking_under_rescoring() -> None:
    # n-best lists from beam_search, rescored teacher forced, come back in the same order with the same scores
    src = torch.tensor([[A, EOS], [C, EOS]])
    mask = torch.ones_like(src)
    for hyps, row in zip(
        beam_search(
            TableModel(), src, mask, BOS, EOS, 6, beam_size=3, length_penalty="none", n_best=3
        ),
        range(2),
        strict=True,
    ):
        targets = [[*h.tokens, EOS] for h in hyps]
        got = score_sequences(
            TableModel(), src[[row] * len(hyps)], mask[[row] * len(hyps)], targets, BOS, PAD
        )
        torch.testing.assert_close(got, torch.tensor([h.logprob for h in hyps]))


def test_beam_search_runs_its_first_step_on_one_row_per_source() -> None:
    """The K beams of a source are identical before the first token; the search expands the cache afterwards."""
    rows_seen: list[int] = []
    model = TableModel()
    step = model.decode_step

    def counting(
        tgt_ids: Tensor, memory: Tensor, *, src_mask: Tensor, cache: Any | None
    ) -> tuple[Tensor, Any]:
        rows_seen.append(tgt_ids.size(0))
        assert memory.size(0) == src_mask.size(0) == tgt_ids.size(0)
        return step(tgt_ids, memory, src_mask=src_mask, cache=cache)

    model.decode_step = counting  # type: ignore[method-assign]
    src = torch.tensor([[A, EOS], [C, EOS]])
    [[trap], _] = beam_search(
        model, src, torch.ones_like(src), BOS, EOS, 6, beam_size=3, length_penalty="none"
    )
    assert rows_seen[0] == 2 and set(rows_seen[1:]) <= {3, 6} and rows_seen[1] == 6
    assert trap.tokens == [B] and trap.logprob == pytest.approx(
        torch.tensor(0.36).log().item(), abs=1e-5
    )
