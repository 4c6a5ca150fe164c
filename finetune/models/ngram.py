"""A Markov n-gram language model with interpolated modified Kneser–Ney smoothing (Chen & Goodman 1999).

Read top to bottom: vocabulary → counting (raw counts at the highest order, continuation counts below) →
discounts from counts-of-counts → the interpolated probability → scoring → JSON save/load.

The model predicts units (words, or characters with `unit="char"`) one line at a time: every line is padded
on the left with `order - 1` `<s>` and ends with a predicted `</s>`, so the model pays for the line breaks
too, as a character model pays for "\\n". Units seen fewer than `min_count` times in training become `<unk>`
(WikiText already contains the literal word `<unk>`, which maps to the same id). Literal `<s>` / `</s>`
tokens in text are read as `<unk>`, since those names are the boundaries.

For each order k the probability of unit w after the k-1 units h is (Chen & Goodman 1999, eq. 17)

    P_k(w | h) = max(c_k(h w) - D_k(c_k(h w)), 0) / c_k(h •)  +  gamma_k(h) * P_{k-1}(w | h minus its first unit)
    gamma_k(h) = (D_k1 N1(h •) + D_k2 N2(h •) + D_k3+ N3+(h •)) / c_k(h •)

where c_k is the raw count at the highest order and, below it, the continuation count N1+(• h w) (how many
distinct units precede h w), except that an n-gram that starts with `<s>` keeps its raw count (nothing can
precede `<s>`; KenLM does the same). A context never seen at order k leaves P_{k-1} unchanged. P_0 is uniform
over the predictable vocabulary (every unit, `<unk>` and `</s>`; never `<s>`), so no unit has probability 0.
The three discounts per order come from the counts-of-counts n_1..n_4 of that order's (adjusted) counts:
Y = n1 / (n1 + 2 n2), D1 = 1 - 2Y n2/n1, D2 = 2 - 3Y n3/n2, D3+ = 3 - 4Y n4/n3. On corpora too small for
these to be defined or to lie in (0, r], a single discount D = Y (0.5 when Y is undefined) is used at that
order (the original Kneser–Ney); either way the distribution sums to one.

Pure Python. Fitting order 3 on WikiText-2 train (2.1M predicted words) takes about 10 s of CPU time on one
core (10.3 s wall on an idle 2-core machine) and 0.7 GB; orders 4 and 5 peak at 1.2 and 1.8 GB.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Literal, get_args

from pretrain.checkpoint import CheckpointError

SOS, EOS, UNK = "<s>", "</s>", "<unk>"
SOS_ID, EOS_ID, UNK_ID = 0, 1, 2  # the first three ids of every vocabulary
Unit = Literal["word", "char"]  # whitespace-separated words, or every character
UNITS: tuple[str, ...] = get_args(Unit)
FORMAT = "kiln-ngram"
FORMAT_VERSION = 1

NGram = tuple[int, ...]


def split_units(line: str, unit: str) -> list[str]:
    """A line as the model's units: whitespace-separated words, or every character (spaces included)."""
    return line.split() if unit == "word" else list(line)


def estimate_discounts(counts: Iterable[int]) -> tuple[float, float, float]:
    """(D1, D2, D3+) from the counts-of-counts of one order's counts (see the module docstring)."""
    n = Counter(c for c in counts if c <= 4)
    n1, n2, n3, n4 = (n[r] for r in (1, 2, 3, 4))
    if min(n1, n2, n3, n4) > 0:
        y = n1 / (n1 + 2 * n2)
        d = (1 - 2 * y * n2 / n1, 2 - 3 * y * n3 / n2, 3 - 4 * y * n4 / n3)
        if all(0 < dr <= r for r, dr in zip((1, 2, 3), d, strict=True)):
            return d
    y = n1 / (n1 + 2 * n2) if n1 > 0 and n2 > 0 else 0.5
    return (y, y, y)


class NGramLM:
    """Interpolated modified Kneser–Ney n-gram LM over words or characters. `fit(lines)` then score."""

    def __init__(self, order: int = 3, unit: str = "word", min_count: int = 1) -> None:
        if order < 1:
            raise ValueError(f"NGramLM.order must be >= 1, got {order}")
        if unit not in UNITS:
            raise ValueError(f"NGramLM.unit must be one of {UNITS}, got {unit!r}")
        if min_count < 1:
            raise ValueError(f"NGramLM.min_count must be >= 1, got {min_count}")
        self.order, self.unit, self.min_count = order, unit, min_count
        self.vocab: list[str] = [SOS, EOS, UNK]  # id -> unit
        self._ids: dict[str, int] = {u: i for i, u in enumerate(self.vocab)}
        # Per order k (index k-1): n-gram -> adjusted count; context -> [c(h •), N1(h •), N2(h •), N3+(h •)].
        self._counts: list[dict[NGram, int]] = []
        self._contexts: list[dict[NGram, list[int]]] = []
        self.discounts: list[tuple[float, float, float]] = []

    # ------------------------------------------------------------------ vocabulary
    @property
    def vocab_size(self) -> int:
        """Units the model can predict: the vocabulary with `<unk>` and `</s>`, without `<s>`."""
        return len(self.vocab) - 1

    @property
    def fitted(self) -> bool:
        return bool(self._counts)

    def _build_vocab(self, lines: list[str]) -> None:
        freq = Counter(u for line in lines for u in split_units(line, self.unit))
        kept = sorted(
            (u for u, c in freq.items() if c >= self.min_count and u not in (SOS, EOS, UNK)),
            key=lambda u: (-freq[u], u),
        )
        self.vocab = [SOS, EOS, UNK, *kept]
        self._ids = {u: i for i, u in enumerate(self.vocab)}

    def encode_line(self, line: str) -> list[int]:
        """`<s>`^(order-1), the line's unit ids (unknown → `<unk>`), `</s>`."""
        ids = self._ids
        body = [
            ids.get(u, UNK_ID) if u not in (SOS, EOS) else UNK_ID
            for u in split_units(line, self.unit)
        ]
        return [SOS_ID] * (self.order - 1) + body + [EOS_ID]

    # ------------------------------------------------------------------ fitting
    def fit(self, lines: Iterable[str]) -> NGramLM:
        """Vocabulary, counts and discounts from the training lines (one sentence / paragraph each)."""
        lines = list(lines)
        if not lines:
            raise ValueError("NGramLM.fit: no training lines")
        self._build_vocab(lines)
        n = self.order
        top: Counter[NGram] = Counter()
        for line in lines:
            seq = self.encode_line(line)
            top.update(
                zip(*(seq[j : len(seq) - n + 1 + j] for j in range(n)), strict=True)
            )  # every n-gram
        self._counts = [{} for _ in range(n)]
        self._counts[n - 1] = dict(top)
        for k in range(n - 1, 0, -1):
            self._counts[k - 1] = _continuation_counts(self._counts[k])
        self._index()
        return self

    def _index(self) -> None:
        """Discounts and context statistics from the adjusted counts (fit and load share this)."""
        self.discounts = [estimate_discounts(c.values()) for c in self._counts]
        self._contexts = []
        for counts in self._counts:
            stats: dict[NGram, list[int]] = {}
            for gram, c in counts.items():  # the hot loop of fitting: no function calls in it
                h = gram[:-1]
                s = stats.get(h)
                if s is None:
                    s = stats[h] = [0, 0, 0, 0]
                s[0] += c
                s[c if c < 3 else 3] += 1
            self._contexts.append(stats)

    # ------------------------------------------------------------------ probabilities
    def _prob(self, context: NGram, w: int) -> float:
        """P(w | the last order-1 ids of `context`), interpolated from order 1 up."""
        p = 1.0 / self.vocab_size
        for k in range(1, self.order + 1):
            h = context[len(context) - k + 1 :] if k > 1 else ()
            stats = self._contexts[k - 1].get(h)
            if stats is None:  # an unseen context at order k is unseen at every higher order too
                break
            total, n1, n2, n3 = stats
            d1, d2, d3 = self.discounts[k - 1]
            c = self._counts[k - 1].get(h + (w,), 0)
            d = 0.0 if c == 0 else d1 if c == 1 else d2 if c == 2 else d3
            p = max(c - d, 0.0) / total + (d1 * n1 + d2 * n2 + d3 * n3) / total * p
        return p

    def _context_ids(self, context: Sequence[str]) -> NGram:
        ids = (
            [self._ids.get(u, UNK_ID) if u != SOS else SOS_ID for u in context][-(self.order - 1) :]
            if self.order > 1
            else []
        )
        return tuple([SOS_ID] * (self.order - 1 - len(ids)) + ids)

    def prob(self, word: str, context: Sequence[str] = ()) -> float:
        """P(word | context); `word` may be `</s>`; a context shorter than order-1 is padded with `<s>`."""
        self._require_fitted()
        if word == SOS:
            raise ValueError("NGramLM: <s> is never predicted")
        return self._prob(self._context_ids(context), self._ids.get(word, UNK_ID))

    def logprob(self, word: str, context: Sequence[str] = ()) -> float:
        """Natural log of `prob(word, context)`."""
        return math.log(self.prob(word, context))

    def score_lines(self, lines: Iterable[str]) -> tuple[float, int]:
        """(total negative log-likelihood in nats, number of predicted units: the lines' units plus one
        `</s>` per line)."""
        self._require_fitted()
        nll, count, m = 0.0, 0, self.order - 1
        for line in lines:
            seq = self.encode_line(line)
            for i in range(m, len(seq)):
                nll -= math.log(self._prob(tuple(seq[i - m : i]), seq[i]))
            count += len(seq) - m
        return nll, count

    def count_oov(self, lines: Iterable[str]) -> int:
        """How many units of `lines` the model reads as `<unk>` without them being the literal `<unk>`: it pays
        only P(<unk>) for these, not for their spelling, which flatters its per-character figure."""
        self._require_fitted()
        return sum(
            u not in self._ids or u in (SOS, EOS)
            for line in lines
            for u in split_units(line, self.unit)
        )

    def _require_fitted(self) -> None:
        if not self.fitted:
            raise ValueError("NGramLM: call fit(lines) (or NGramLM.load) before scoring")

    # ------------------------------------------------------------------ JSON (never pickle)
    def save(self, path: str | Path) -> Path:
        """Write the vocabulary and the adjusted counts of every order as JSON; discounts are re-derived."""
        self._require_fitted()
        doc = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "order": self.order,
            "unit": self.unit,
            "min_count": self.min_count,
            "vocab": self.vocab,
            "counts": [[[*gram, c] for gram, c in counts.items()] for counts in self._counts],
        }
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(
            json.dumps(doc, ensure_ascii=False, separators=(",", ":")), encoding="utf-8"
        )
        return path

    @classmethod
    def load(cls, path: str | Path) -> NGramLM:
        path = Path(path)
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise CheckpointError(f"{path}: n-gram model file not found") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path}: not a JSON n-gram model ({e})") from None
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise CheckpointError(f"{path}: not a {FORMAT} file (needs 'format': {FORMAT!r})")
        try:
            model = cls(doc["order"], doc["unit"], doc["min_count"])
            model.vocab = list(doc["vocab"])
            model._counts = [{tuple(row[:-1]): row[-1] for row in rows} for rows in doc["counts"]]
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{path}: malformed n-gram model: {e!r}") from None
        if model.vocab[:3] != [SOS, EOS, UNK] or len(model._counts) != model.order:
            raise CheckpointError(
                f"{path}: vocabulary must start with {[SOS, EOS, UNK]} and 'counts' hold "
                f"{model.order} orders"
            )
        model._ids = {u: i for i, u in enumerate(model.vocab)}
        model._index()
        return model


def _continuation_counts(higher: dict[NGram, int]) -> dict[NGram, int]:
    """Order-k adjusted counts from order k+1's: N1+(• g) distinct left extensions of g, except that a g
    starting with `<s>` keeps its raw count, which is the count of its only extension `<s> g`."""
    counts: dict[NGram, int] = {}
    for gram, c in higher.items():
        suffix = gram[1:]
        if suffix[0] == SOS_ID:
            counts[suffix] = c  # gram is (<s>, *suffix), adjusted = raw at every order above
        else:
            counts[suffix] = counts.get(suffix, 0) + 1
    return counts
