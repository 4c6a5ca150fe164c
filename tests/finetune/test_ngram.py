"""The Kneser–Ney n-gram LM: hand-checked probabilities, normalisation, <unk>, JSON round trip, and that it
beats add-one smoothing on held-out text."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import pytest

from data_pipeline.sample import sample_documents
from finetune.models.ngram import EOS, SOS, UNK, NGramLM, estimate_discounts
from pretrain.checkpoint import CheckpointError

TINY = ["a b", "a c", "b a"]
# Counts by hand (each line is <s>.. w1 w2 </s>). Bigrams: (<s> a)=2, the seven others once: n1=7, n2=1, so
# the modified estimates are undefined and D = Y = 7/9 at order 2 (and at order 3, whose counts look alike).
# Unigram continuation counts N1+(• w): a 2 (after <s>, b), b 2, c 1, </s> 3; total 8; n1=1, n2=2, n3=1,
# n4=0 → D = Y = 1/5; gamma() = 0.2 * 4 types / 8 = 0.1, spread over 5 predictable units (<unk> </s> a b c).
D, D1 = 7 / 9, 1 / 5
P1 = {
    "a": (2 - D1) / 8 + 0.1 / 5,
    "b": (2 - D1) / 8 + 0.1 / 5,
    "c": (1 - D1) / 8 + 0.1 / 5,
    EOS: (3 - D1) / 8 + 0.1 / 5,
    UNK: 0.1 / 5,
}


def held_out_split() -> tuple[list[str], list[str]]:
    docs = sample_documents(0, 1000)
    lines = [[s for s in d.split("\n") if s.strip()] for d in docs]
    cut = len(lines) * 9 // 10
    return [s for d in lines[:cut] for s in d], [s for d in lines[cut:] for s in d]


def test_discounts_follow_chen_goodman_and_fall_back_on_tiny_counts() -> None:
    counts = [1] * 10 + [2] * 5 + [3] * 3 + [4] * 2 + [9] * 4
    y = 10 / (10 + 2 * 5)
    assert estimate_discounts(counts) == pytest.approx(
        (1 - 2 * y * 5 / 10, 2 - 3 * y * 3 / 5, 3 - 4 * y * 2 / 3)
    )
    assert estimate_discounts([1] * 7 + [2]) == pytest.approx(
        (D, D, D)
    )  # n3 = n4 = 0: one KN discount
    assert estimate_discounts([5, 6]) == (0.5, 0.5, 0.5)  # no singletons at all


def test_unigram_probabilities_by_hand() -> None:
    lm = NGramLM(order=1).fit(TINY)
    # Order 1 alone uses raw counts: a 3, b 2, c 1, </s> 3 of 9; n1=1, n2=1, n3=2 → D = Y = 1/3.
    d, gamma = 1 / 3, (1 / 3) * 4 / 9
    for w, c in {"a": 3, "b": 2, "c": 1, EOS: 3, UNK: 0}.items():
        assert lm.prob(w) == pytest.approx(max(c - d, 0) / 9 + gamma / 5)


def test_bigram_and_trigram_probabilities_by_hand() -> None:
    bigram = NGramLM(order=2).fit(TINY)
    assert bigram.discounts[0] == pytest.approx((D1, D1, D1)) and bigram.discounts[
        1
    ] == pytest.approx((D, D, D))
    for (
        w,
        p,
    ) in P1.items():  # an unseen context (zzz is <unk>, never a context in training) → the unigram
        assert bigram.prob(w, ["zzz"]) == pytest.approx(p)
    # after "a": a b, a c, a </s> once each → total 3, n1 = 3, gamma = D
    assert bigram.prob("b", ["a"]) == pytest.approx((1 - D) / 3 + D * P1["b"])
    assert bigram.prob(UNK, ["a"]) == pytest.approx(D * P1[UNK])
    # after <s>: a twice, b once → gamma = D (1 + 1) / 3
    p2_a_after_sos = (2 - D) / 3 + D * 2 / 3 * P1["a"]
    assert bigram.prob("a", []) == pytest.approx(p2_a_after_sos)

    trigram = NGramLM(order=3).fit(TINY)
    # (<s> a) keeps its raw count 2 at order 2 (nothing precedes <s>), so P2(a | <s>) is the bigram's.
    assert trigram.prob("a", []) == pytest.approx((2 - D) / 3 + D * 2 / 3 * p2_a_after_sos)
    p2_b_after_a = (1 - D) / 3 + D * P1["b"]
    assert trigram.prob("b", [SOS, "a"]) == pytest.approx((1 - D) / 2 + D * p2_b_after_a)
    assert trigram.logprob("b", ["a"]) == pytest.approx(math.log((1 - D) / 2 + D * p2_b_after_a))


@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("unit", ["word", "char"])
def test_distribution_sums_to_one_for_seen_and_unseen_contexts(order: int, unit: str) -> None:
    train, _ = held_out_split()
    lm = NGramLM(order=order, unit=unit, min_count=2).fit(train[:400])
    predictable = lm.vocab[1:]  # everything but <s>: the units, <unk> and </s>
    assert SOS not in predictable and {UNK, EOS} <= set(predictable)
    first = train[0].split() if unit == "word" else list(train[0])
    contexts = [
        [],
        first[:1],
        first[:2],
        [SOS, first[0]],
        ["never-seen-unit", "and-another"],
        [UNK, UNK],
    ]
    for context in contexts:
        assert sum(lm.prob(w, context) for w in predictable) == pytest.approx(1.0, abs=1e-9), (
            context
        )


def test_unseen_and_rare_units_map_to_unk() -> None:
    lm = NGramLM(order=2, min_count=2).fit(TINY)  # c occurs once: below min_count
    assert "c" not in lm.vocab and lm.vocab_size == 4  # <unk> </s> a b
    assert lm.prob("c", ["a"]) == lm.prob(UNK, ["a"]) == lm.prob("zebra", ["a"]) > 0
    assert lm.prob("a", ["c"]) == lm.prob("a", ["zebra"])
    assert lm.score_lines(["a zebra"]) == lm.score_lines(["a c"])
    assert (
        lm.count_oov(["a zebra c", "<unk> b </s>"]) == 3
    )  # zebra, c, and the literal </s>; not <unk>


def test_score_lines_counts_units_and_end_of_line() -> None:
    lm = NGramLM(order=2).fit(TINY)
    nll, n = lm.score_lines(["a b", "c"])
    assert n == 5  # a b </s> c </s>
    expected = -sum(
        lm.logprob(w, ctx)
        for w, ctx in [("a", []), ("b", ["a"]), (EOS, ["b"]), ("c", []), (EOS, ["c"])]
    )
    assert nll == pytest.approx(expected)
    chars = NGramLM(order=3, unit="char").fit(["abc", "cab"])
    assert chars.score_lines(["ab c"])[1] == 5  # four characters (the space too) and </s>


def test_json_round_trip_gives_identical_scores(tmp_path: Path) -> None:
    train, held = held_out_split()
    lm = NGramLM(order=3, unit="word", min_count=2).fit(train[:500])
    file = lm.save(tmp_path / "kn.json")
    assert (
        json.loads(file.read_text(encoding="utf-8"))["format"] == "kiln-ngram"
    )  # plain JSON, no pickle
    again = NGramLM.load(file)
    assert (again.order, again.unit, again.min_count, again.vocab) == (
        lm.order,
        lm.unit,
        lm.min_count,
        lm.vocab,
    )
    assert again.discounts == lm.discounts
    assert again.score_lines(held[:50]) == lm.score_lines(held[:50])


def test_load_rejects_bad_files_naming_them(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="missing.json"):
        NGramLM.load(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text('{"format": "something-else"}', encoding="utf-8")
    with pytest.raises(CheckpointError, match="bad.json"):
        NGramLM.load(bad)
    bad.write_text("{not json", encoding="utf-8")
    with pytest.raises(CheckpointError, match="bad.json"):
        NGramLM.load(bad)


def test_misuse_is_refused() -> None:
    with pytest.raises(ValueError, match="fit"):
        NGramLM().score_lines(["a"])
    with pytest.raises(ValueError, match="no training lines"):
        NGramLM().fit([])
    with pytest.raises(ValueError, match="unit"):
        NGramLM(unit="byte")
    with pytest.raises(ValueError, match="never predicted"):
        NGramLM(order=2).fit(TINY).prob(SOS, ["a"])


def add_one_nll(train: list[str], held: list[str], order: int, vocab: set[str]) -> float:
    """Laplace-smoothed n-gram NLL over the same units (<unk> for words outside `vocab`, </s> per line)."""

    def seq(line: str) -> list[str]:
        return [SOS] * (order - 1) + [w if w in vocab else UNK for w in line.split()] + [EOS]

    grams: Counter[tuple[str, ...]] = Counter()
    contexts: Counter[tuple[str, ...]] = Counter()
    for line in train:
        s = seq(line)
        for i in range(order - 1, len(s)):
            grams[tuple(s[i - order + 1 : i + 1])] += 1
            contexts[tuple(s[i - order + 1 : i])] += 1
    v = len(vocab | {UNK, EOS})
    nll = 0.0
    for line in held:
        s = seq(line)
        for i in range(order - 1, len(s)):
            nll -= math.log(
                (grams[tuple(s[i - order + 1 : i + 1])] + 1)
                / (contexts[tuple(s[i - order + 1 : i])] + v)
            )
    return nll


@pytest.mark.parametrize("order", [2, 3])
def test_kneser_ney_beats_add_one_on_held_out_text(order: int) -> None:
    train, held = held_out_split()
    kn = NGramLM(order=order, min_count=2).fit(train)
    kn_nll, n = kn.score_lines(held)
    laplace_nll = add_one_nll(train, held, order, set(kn.vocab[3:]))
    assert n > 5000
    assert math.exp(kn_nll / n) < 0.5 * math.exp(laplace_nll / n)
