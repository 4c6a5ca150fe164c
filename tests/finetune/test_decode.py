"""Greedy decoding and beam search on hand-written next-token tables with known best hypotheses."""

from __future__ import annotations

import itertools
import math
from typing import Any

import pytest
import torch
from torch import Tensor

from finetune.decode import beam_search, greedy_decode, normalised_score

BOS, EOS, A, B = 0, 1, 2, 3
VOCAB = 4


class TableModel:
    """Implements the decoding protocol from {(table, prefix): {token: prob}}; src_ids[:, 0] picks the table.

    The cache is the list of (table, prefix) per row, so reorder_cache is list indexing: exactly the operation
    beam search asks of a real model's KV cache.
    """

    def __init__(
        self, tables: dict[tuple[int, tuple[int, ...]], dict[int, float]], default: dict[int, float]
    ):
        self.tables = tables
        self.default = default
        self.calls = 0

    def encode(self, src_ids: Tensor, src_mask: Tensor) -> Tensor:
        return src_ids[:, :1].float().unsqueeze(-1)  # (B,1,1): the table id

    def _row(self, key: tuple[int, tuple[int, ...]]) -> Tensor:
        probs = torch.zeros(VOCAB)
        for tok, p in self.tables.get(key, self.default).items():
            probs[tok] = p
        return probs.log()

    def decode_step(
        self, tgt_ids: Tensor, memory: Tensor, *, src_mask: Tensor, cache: Any | None
    ) -> tuple[Tensor, Any]:
        self.calls += 1
        if cache is None:
            assert bool((tgt_ids[:, 0] == BOS).all()), "first step must feed [BOS]"
            cache = [(int(memory[i, 0, 0]), ()) for i in range(tgt_ids.size(0))]
            tgt_ids = tgt_ids[:, 1:]
        cache = [(t, prefix + tuple(tgt_ids[i].tolist())) for i, (t, prefix) in enumerate(cache)]
        return torch.stack([self._row(key) for key in cache]), cache

    def reorder_cache(self, cache: Any, index: Tensor) -> Any:
        return [cache[i] for i in index.tolist()]


def src(*tables: int) -> tuple[Tensor, Tensor]:
    ids = torch.tensor([[t, 9] for t in tables])
    return ids, torch.ones_like(ids)


# Greedy takes A (0.6) and then stops (P = 0.24); the best sequence is B EOS (P = 0.36).
GREEDY_TRAP = {
    (0, ()): {A: 0.6, B: 0.4},
    (0, (A,)): {EOS: 0.4, A: 0.3, B: 0.3},
    (0, (B,)): {EOS: 0.9, A: 0.05, B: 0.05},
}
# Short [A] (P = 0.2, |Y| = 2) beats long [B B B] (P = 0.175, |Y| = 4) only without length normalisation.
SHORT_VS_LONG = {
    (1, ()): {A: 0.5, B: 0.5},
    (1, (A,)): {EOS: 0.4, A: 0.3, B: 0.3},
    (1, (B,)): {B: 1.0},
    (1, (B, B)): {B: 1.0},
    (1, (B, B, B)): {EOS: 0.35, A: 0.325, B: 0.325},
}
DEFAULT = {EOS: 0.1, A: 0.45, B: 0.45}


def test_greedy_falls_in_the_trap_and_beam_does_not() -> None:
    model = TableModel(GREEDY_TRAP, DEFAULT)
    ids, mask = src(0)
    assert greedy_decode(model, ids, mask, BOS, EOS, max_len=10) == [[A]]
    [[best]] = beam_search(
        model, ids, mask, BOS, EOS, max_len=10, beam_size=2, length_penalty="none"
    )
    assert best.tokens == [B]
    assert best.logprob == pytest.approx(math.log(0.36), abs=1e-5)
    assert best.score == pytest.approx(math.log(0.36), abs=1e-5)


def test_stops_once_no_alive_beam_can_win() -> None:
    # after step 2 the finished [B] (0.36) beats every alive beam (<= 0.18): no third decode step
    model = TableModel(GREEDY_TRAP, DEFAULT)
    ids, mask = src(0)
    beam_search(model, ids, mask, BOS, EOS, max_len=10, beam_size=2, length_penalty="none")
    assert model.calls == 2


def test_n_best_returns_ranked_hypotheses() -> None:
    model = TableModel(GREEDY_TRAP, DEFAULT)
    ids, mask = src(0)
    [hyps] = beam_search(
        model, ids, mask, BOS, EOS, max_len=10, beam_size=2, length_penalty="none", n_best=2
    )
    assert [h.tokens for h in hyps] == [[B], [A]]
    assert [h.logprob for h in hyps] == pytest.approx([math.log(0.36), math.log(0.24)], abs=1e-5)


@pytest.mark.parametrize(
    ("penalty", "alpha", "tokens", "score"),
    [
        ("none", 1.0, [A], math.log(0.2)),
        ("avg", 1.0, [B, B, B], math.log(0.175) / 4),  # -0.43624 beats [A]: -0.80472
        (
            "gnmt",
            1.0,
            [B, B, B],
            math.log(0.175) / 1.5,
        ),  # ((5+4)/6)^1 = 1.5; [A]: -1.6094 / (7/6) = -1.3795
        ("avg", 0.0, [A], math.log(0.2)),  # alpha 0 switches normalisation off
    ],
)
def test_length_normalisation_picks_the_known_best(
    penalty: str, alpha: float, tokens: list[int], score: float
) -> None:
    model = TableModel(SHORT_VS_LONG, DEFAULT)
    ids, mask = src(1)
    [[best]] = beam_search(
        model, ids, mask, BOS, EOS, max_len=12, beam_size=2, length_penalty=penalty, alpha=alpha
    )
    assert best.tokens == tokens
    assert best.score == pytest.approx(score, abs=1e-5)
    assert best.logprob == pytest.approx(math.log(0.2 if tokens == [A] else 0.175), abs=1e-5)


def test_normalisation_formulas() -> None:
    assert normalised_score(-3.0, 4, "none", 0.6) == -3.0
    assert normalised_score(-3.0, 4, "avg", 0.5) == pytest.approx(-1.5)  # -3 / 4^0.5
    assert normalised_score(-3.0, 4, "gnmt", 0.6) == pytest.approx(
        -2.352158, abs=1e-6
    )  # -3 / 1.5^0.6 = -3 / 1.275434
    assert normalised_score(-3.0, 1, "gnmt", 0.6) == pytest.approx(-3.0)  # (5+1)/6 = 1
    with pytest.raises(ValueError, match="length_penalty"):
        normalised_score(-3.0, 4, "wu", 0.6)


def test_batched_sources_match_one_at_a_time() -> None:
    model = TableModel({**GREEDY_TRAP, **SHORT_VS_LONG}, DEFAULT)
    ids, mask = src(1, 0, 1)
    batched = beam_search(
        model, ids, mask, BOS, EOS, max_len=12, beam_size=3, length_penalty="gnmt", n_best=2
    )
    for i in range(3):
        single = beam_search(
            model,
            ids[i : i + 1],
            mask[i : i + 1],
            BOS,
            EOS,
            max_len=12,
            beam_size=3,
            length_penalty="gnmt",
            n_best=2,
        )[0]
        assert [h.tokens for h in batched[i]] == [h.tokens for h in single]
        assert [h.score for h in batched[i]] == pytest.approx([h.score for h in single], abs=1e-6)
    assert batched[1][0].tokens == [B]
    assert batched[0][0].tokens == [B, B, B]


def test_max_len_cuts_hypotheses_without_eos() -> None:
    model = TableModel({}, {EOS: 0.01, A: 0.9, B: 0.09})
    ids, mask = src(0)
    [[best]] = beam_search(
        model, ids, mask, BOS, EOS, max_len=3, beam_size=2, length_penalty="none"
    )
    assert best.tokens == [A, A, A]
    assert best.logprob == pytest.approx(3 * math.log(0.9), abs=1e-5)
    assert greedy_decode(model, ids, mask, BOS, EOS, max_len=3) == [[A, A, A]]


class RandomTableModel(TableModel):
    """Every prefix gets its own fixed random distribution (seeded by the prefix)."""

    def __init__(self) -> None:
        super().__init__({}, {})

    def _row(self, key: tuple[int, tuple[int, ...]]) -> Tensor:
        gen = torch.Generator().manual_seed(hash(key) % (2**31))
        logits = torch.randn(VOCAB, generator=gen) * 2
        logits[BOS] = -math.inf
        return torch.log_softmax(logits, dim=-1)


def test_greedy_equals_beam_of_one_without_normalisation() -> None:
    model = RandomTableModel()
    ids, mask = src(*range(20))
    greedy = greedy_decode(model, ids, mask, BOS, EOS, max_len=8)
    beams = beam_search(model, ids, mask, BOS, EOS, max_len=8, beam_size=1, length_penalty="none")
    assert [b[0].tokens for b in beams] == greedy
    assert len({tuple(g) for g in greedy}) > 5  # the tables really differ per source


def test_rejects_bad_arguments() -> None:
    model = TableModel(GREEDY_TRAP, DEFAULT)
    ids, mask = src(0)
    with pytest.raises(ValueError, match="n_best"):
        beam_search(model, ids, mask, BOS, EOS, max_len=5, beam_size=2, n_best=3)
    with pytest.raises(ValueError, match="beam_size"):
        beam_search(model, ids, mask, BOS, EOS, max_len=5, beam_size=0)
    with pytest.raises(ValueError, match="max_len"):
        greedy_decode(model, ids, mask, BOS, EOS, max_len=0)


def brute_force_best(
    model: RandomTableModel, table: int, max_len: int, penalty: str, alpha: float
) -> tuple:
    """Score every possible output: y [EOS] with |y| + 1 <= max_len, or y cut off at |y| = max_len."""
    best: tuple = (-math.inf, None)
    for n in range(max_len + 1):
        for y in itertools.product([A, B], repeat=n):
            logprob = sum(float(model._row((table, y[:i]))[y[i]]) for i in range(n))
            if n < max_len:
                logprob += float(model._row((table, y))[EOS])
                length = n + 1
            else:
                length = n
            best = max(
                best,
                (normalised_score(logprob, length, penalty, alpha), list(y)),
                key=lambda t: t[0],
            )
    return best


@pytest.mark.parametrize(
    ("penalty", "alpha"), [("none", 1.0), ("avg", 1.0), ("gnmt", 0.6), ("gnmt", 2.0)]
)
def test_wide_beam_is_exact_against_brute_force(penalty: str, alpha: float) -> None:
    # with beam_size = 2^(max_len-1) no prefix is ever pruned, so beam search must find the true optimum
    model = RandomTableModel()
    ids, mask = src(*range(8))
    results = beam_search(
        model, ids, mask, BOS, EOS, max_len=4, beam_size=8, length_penalty=penalty, alpha=alpha
    )
    for table, [best] in enumerate(results):
        score, tokens = brute_force_best(model, table, 4, penalty, alpha)
        assert best.tokens == tokens
        assert best.score == pytest.approx(score, abs=1e-5)
