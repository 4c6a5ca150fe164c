from __future__ import annotations

from collections import Counter

import sacrebleu

from data_pipeline import sample


def test_documents_are_deterministic_prose_with_one_segment_per_line() -> None:
    docs = sample.sample_documents(seed=1, n=30)
    assert docs == sample.sample_documents(seed=1, n=30)
    assert docs != sample.sample_documents(seed=2, n=30)
    assert len(docs) == 30 and len(set(docs)) == 30
    assert all("\n\n" not in d and d.strip() == d for d in docs)
    segments = [s for d in docs for s in d.split("\n")]
    assert len(segments) > 3 * len(docs)  # documents are split into sentences, not kept as one blob
    everything = sample.sample_documents(seed=0, n=100_000)  # capped at the pool
    assert 120 <= len(everything) < 100_000
    assert sum(map(len, everything)) > 400_000  # pydoc topics alone are ~465 KB of prose
    assert any(d.startswith('The "if" statement') for d in everything)


def test_pairs_are_distinct_number_verbalisations_unlike_their_source() -> None:
    pairs = sample.sample_pairs(seed=0, n=500)
    assert pairs == sample.sample_pairs(seed=0, n=500) and pairs != sample.sample_pairs(
        seed=1, n=500
    )
    assert len(set(pairs)) == 500
    assert sum(src == tgt for src, tgt in pairs) <= 1  # only "six" reads the same in both languages
    ordinals = [(s, t) for s, t in pairs if s.endswith(("th", "first", "second", "third"))]
    assert 150 < len(ordinals) < 350  # cardinals and ordinals are drawn about equally
    assert all(t.endswith(("ième", "premier")) for _, t in ordinals)
    assert all(not t.endswith("ième") for s, t in pairs if (s, t) not in ordinals)
    # Copying the source is a useless translation: BLEU near zero.
    copy_bleu = sacrebleu.corpus_bleu([s for s, _ in pairs], [[t for _, t in pairs]]).score
    assert copy_bleu < 5.0


def test_labelled_text_is_real_balanced_multiclass() -> None:
    rows, names = sample.sample_labelled(seed=0, n=1500)
    assert rows == sample.sample_labelled(seed=0, n=1500)[0]
    assert names == ["text", "network", "numbers", "files", "concurrency"]
    counts = Counter(label for _, label in rows)
    assert len(rows) == 1500 and set(counts) == set(range(len(names)))
    assert max(counts.values()) / len(rows) < 0.3  # majority class well below 100%
    assert min(counts.values()) >= 200
    assert len({text for text, _ in rows}) == len(rows)
    assert all(len(text.split()) >= 4 for text, _ in rows)
    sizes = sample.labelled_pool_sizes()
    assert sum(sizes.values()) > 1500 and min(sizes.values()) >= 250


def test_labelled_pool_has_no_text_under_two_labels() -> None:
    rows, _ = sample.sample_labelled(seed=3, n=100_000)  # the whole pool
    by_text: dict[str, set[int]] = {}
    for text, label in rows:
        by_text.setdefault(text, set()).add(label)
    assert all(len(labels) == 1 for labels in by_text.values())
    assert len(rows) == sum(sample.labelled_pool_sizes().values())


def test_paragraphs_to_document_drops_heading_rules_and_splits_sentences() -> None:
    text = "Title\n*****\n\nFirst sentence.  Second\n   sentence! third stays.\n\n\n(A note.)"
    assert (
        sample.paragraphs_to_document(text)
        == "Title\nFirst sentence.\nSecond sentence! third stays.\n(A note.)"
    )
