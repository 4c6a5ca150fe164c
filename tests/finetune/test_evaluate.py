"""Metrics against values known by hand."""

from __future__ import annotations

import pytest
import torch

from finetune.evaluate import (
    accuracy,
    bleu,
    chrf,
    classification_report,
    copy_source_bleu,
    macro_f1,
    majority_class,
    majority_class_accuracy,
    mcc,
)

# corpus BLEU needs at least one 4-gram somewhere in the corpus (else it is 0 even for a perfect match)
REFS = ["trois cent quarante-deux", "mille deux cent trente et un", "quatre-vingt-dix-neuf mille"]


def test_bleu_identical_is_100_and_disjoint_is_0() -> None:
    assert bleu(REFS, REFS) == pytest.approx(100.0)
    assert bleu(["alpha beta gamma delta"] * 3, REFS) == pytest.approx(0.0)
    partial = bleu(
        ["trois cent quarante", "mille deux cent trente et un", "quatre-vingt-dix-neuf"], REFS
    )
    assert 0.0 < partial < 100.0


def test_chrf_identical_is_100_and_partial_in_between() -> None:
    assert chrf(REFS, REFS) == pytest.approx(100.0)
    assert chrf(["xyz"] * 3, REFS) < 5.0
    assert 20.0 < chrf(["trois cent", "mille", "quatre-vingt"], REFS) < 100.0


def test_copy_source_bleu_of_english_against_french_is_near_zero() -> None:
    srcs = [
        "three hundred and forty-two",
        "one thousand two hundred and thirty-one",
        "ninety-nine thousand",
    ]
    assert copy_source_bleu(srcs, REFS) < 5.0
    assert copy_source_bleu(REFS, REFS) == pytest.approx(100.0)


def test_bleu_rejects_misaligned_inputs() -> None:
    with pytest.raises(ValueError, match="2 hypotheses but 3 references"):
        bleu(REFS[:2], REFS)


def test_classification_metrics_known_values() -> None:
    labels = [0, 0, 1, 1, 2, 2]
    preds = [0, 1, 1, 1, 2, 0]
    assert accuracy(preds, labels) == pytest.approx(4 / 6)
    # per-class F1: class 0 P=1/2 R=1/2 -> 0.5; class 1 P=2/3 R=1 -> 0.8; class 2 P=1 R=1/2 -> 2/3
    assert macro_f1(preds, labels) == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)
    assert mcc(labels, labels) == pytest.approx(1.0)
    assert mcc([0] * 6, labels) == pytest.approx(0.0)
    # binary MCC = (TP*TN - FP*FN) / sqrt(...) with TP=2 TN=1 FP=1 FN=0 -> 2 / sqrt(3*2*2*1)
    assert mcc([1, 1, 1, 0], [1, 1, 0, 0]) == pytest.approx(2 / 12**0.5, abs=1e-6)
    report = classification_report(torch.tensor(preds), torch.tensor(labels))
    assert report["accuracy"] == pytest.approx(4 / 6)


def test_mcc_of_a_constant_predictor_is_zero_at_any_size() -> None:
    # torchmetrics' binary eps smoothing gave +-0.005 on 3,357 rows (the SST-2 validation split), growing with size
    gold = [1] * 1926 + [0] * 1431
    assert mcc([1] * len(gold), gold) == 0.0
    assert mcc([0] * len(gold), gold) == 0.0
    assert mcc([1, 0, 1, 0], [1] * 4) == 0.0  # constant labels: also 0/0
    assert mcc([1] * 4, [1] * 4) == pytest.approx(1.0)  # all right or all wrong keep their limits
    assert mcc([0] * 4, [1] * 4) == pytest.approx(-1.0)


def test_macro_f1_ignores_classes_absent_from_labels_and_predictions() -> None:
    assert macro_f1([0, 1], [0, 1], num_classes=10) == pytest.approx(1.0)


def test_metric_input_errors() -> None:
    with pytest.raises(ValueError, match="3 predictions but 2 labels"):
        accuracy([0, 1, 1], [0, 1])
    with pytest.raises(ValueError, match="num_classes=2"):
        accuracy([0, 3], [0, 1], num_classes=2)


def test_majority_baseline() -> None:
    assert majority_class([2, 1, 2, 0, 2, 1]) == 2
    assert majority_class([1, 0, 0, 1]) == 0  # tie -> smallest label
    assert majority_class_accuracy([2, 1, 2, 0, 2, 1], [2, 2, 0, 1]) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="empty"):
        majority_class_accuracy([], [1])
