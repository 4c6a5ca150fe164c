"""Evaluation metrics for the fine-tuning tasks, and the trivial baselines every score is reported against.

Translation is scored with sacrebleu on *detokenised* text (the strings a user would read), never on token
ids: BLEU over BPE pieces is not comparable across tokenizers. Classification metrics come from torchmetrics
so that they agree with what a user computes elsewhere.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence

import sacrebleu
import torch
from torch import Tensor

# torchmetrics is imported where a classification metric is computed: importing it loads scipy.signal
# and transformers (seconds of CPU) that `kiln translate`/`evaluate` of a translation model never use.


def _check_pairs(hyps: Sequence[str], refs: Sequence[str]) -> None:
    if len(hyps) != len(refs):
        raise ValueError(
            f"got {len(hyps)} hypotheses but {len(refs)} references; they must be line-aligned"
        )
    if not hyps:
        raise ValueError("cannot score an empty list of hypotheses")


def bleu(hyps: Sequence[str], refs: Sequence[str]) -> float:
    """Corpus BLEU (sacrebleu defaults: 13a tokenisation, exp smoothing) on 0..100, one reference per line.

    Corpus BLEU is 0 when no line has four tokens (no 4-gram to count), however good the output.
    """
    _check_pairs(hyps, refs)
    return float(sacrebleu.corpus_bleu(list(hyps), [list(refs)]).score)


def chrf(hyps: Sequence[str], refs: Sequence[str]) -> float:
    """Corpus chrF (character 6-grams, beta 2) on 0..100, one reference per line."""
    _check_pairs(hyps, refs)
    return float(sacrebleu.corpus_chrf(list(hyps), [list(refs)]).score)


def copy_source_bleu(srcs: Sequence[str], refs: Sequence[str]) -> float:
    """BLEU of 'translating' by copying the source: the floor a translation model has to clear."""
    return bleu(srcs, refs)


def _as_label_tensors(
    preds: Sequence[int] | Tensor, labels: Sequence[int] | Tensor, num_classes: int | None
) -> tuple[Tensor, Tensor, int]:
    p = torch.as_tensor(preds, dtype=torch.long).flatten()
    t = torch.as_tensor(labels, dtype=torch.long).flatten()
    if p.numel() != t.numel():
        raise ValueError(f"got {p.numel()} predictions but {t.numel()} labels")
    if p.numel() == 0:
        raise ValueError("cannot score an empty list of predictions")
    if bool((p < 0).any()) or bool((t < 0).any()):
        raise ValueError("labels and predictions must be non-negative class indices")
    needed = int(max(p.max().item(), t.max().item())) + 1
    n = needed if num_classes is None else num_classes
    if n < needed:
        raise ValueError(f"num_classes={num_classes} but a label/prediction {needed - 1} occurs")
    # torchmetrics' multiclass metrics need at least two classes even when the data has one
    return p, t, max(n, 2)


def accuracy(
    preds: Sequence[int] | Tensor, labels: Sequence[int] | Tensor, num_classes: int | None = None
) -> float:
    """Fraction of predictions equal to the label (micro accuracy)."""
    from torchmetrics.functional.classification import multiclass_accuracy

    p, t, n = _as_label_tensors(preds, labels, num_classes)
    return float(multiclass_accuracy(p, t, num_classes=n, average="micro"))


def macro_f1(
    preds: Sequence[int] | Tensor, labels: Sequence[int] | Tensor, num_classes: int | None = None
) -> float:
    """Unweighted mean of per-class F1 over the classes that occur in labels or predictions."""
    from torchmetrics.functional.classification import multiclass_f1_score

    p, t, n = _as_label_tensors(preds, labels, num_classes)
    # classes that never occur would count as F1 = 0 and punish a model for the label set's size
    present = torch.unique(torch.cat([p, t]))
    per_class = multiclass_f1_score(p, t, num_classes=n, average="none")
    return float(per_class[present].mean())


def mcc(
    preds: Sequence[int] | Tensor, labels: Sequence[int] | Tensor, num_classes: int | None = None
) -> float:
    """Matthews correlation coefficient (multi-class form, Gorodkin 2004); 0 for a constant predictor."""
    from torchmetrics.functional.classification import multiclass_matthews_corrcoef

    p, t, n = _as_label_tensors(preds, labels, num_classes)
    right = int((p == t).sum())
    if (p.unique().numel() == 1 or t.unique().numel() == 1) and 0 < right < p.numel():
        # MCC is 0/0 here (0 by convention, as sklearn); torchmetrics' binary path smooths it with eps into a small
        # value that grows with the rows: +0.005 for always-positive on the 3,357 SST-2 validation rows
        return 0.0
    return float(multiclass_matthews_corrcoef(p, t, num_classes=n))


def majority_class(train_labels: Sequence[int]) -> int:
    """The most frequent training label; ties go to the smallest label so the baseline is deterministic."""
    if len(train_labels) == 0:
        raise ValueError("cannot take the majority class of an empty training set")
    counts = Counter(int(x) for x in train_labels)
    return min(counts, key=lambda label: (-counts[label], label))


def majority_class_accuracy(train_labels: Sequence[int], test_labels: Sequence[int]) -> float:
    """Test accuracy of always predicting the training set's majority class: the floor for a classifier."""
    if len(test_labels) == 0:
        raise ValueError("cannot score an empty test set")
    top = majority_class(train_labels)
    return sum(int(x) == top for x in test_labels) / len(test_labels)


def classification_report(
    preds: Sequence[int] | Tensor, labels: Sequence[int] | Tensor, num_classes: int | None = None
) -> dict[str, float]:
    """accuracy, macro_f1 and mcc in one dict (the keys the fine-tuning report prints)."""
    return {
        "accuracy": accuracy(preds, labels, num_classes),
        "macro_f1": macro_f1(preds, labels, num_classes),
        "mcc": mcc(preds, labels, num_classes),
    }


@torch.no_grad()
def predict_labels(
    model: torch.nn.Module, batches: Iterable[dict[str, Tensor]]
) -> tuple[list[int], list[int]]:
    """Argmax predictions and gold labels over classification batches (docs/design.md batch format).

    The model is called as `model(input_ids, attention_mask)` in eval mode, then returned to its previous mode.
    """
    device = next(model.parameters()).device
    preds: list[int] = []
    gold: list[int] = []
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            logits = model(
                batch["input_ids"].to(device), batch["attention_mask"].to(device)
            )  # (B, num_labels)
            preds += logits.argmax(dim=-1).tolist()
            gold += batch["labels"].tolist()
    finally:
        model.train(was_training)
    return preds, gold
