"""Pretraining objectives: BERT's masked LM + next-sentence prediction, and GPT's causal LM.

Models return logits; these functions turn logits + the batch labels of docs/design.md into a dict
with a differentiable `loss` and detached metrics (accuracies, perplexity) ready to log.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

IGNORE_INDEX = (
    -100
)  # label value that contributes no loss (HF / PyTorch convention, docs/design.md)


class PreTrainingLogits(Protocol):
    mlm_logits: Tensor
    nsp_logits: Tensor


def masked_positions_from_labels(mlm_labels: Tensor) -> Tensor:
    """1-D long indices into the flattened (B*T) positions whose label is not -100 (the masked tokens)."""
    return (mlm_labels.reshape(-1) != IGNORE_INDEX).nonzero(as_tuple=True)[0]


def _token_ce(logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """Mean cross-entropy and accuracy over targets != -100. Summed then divided by max(count, 1), so a
    batch in which no token happens to be masked gives 0 rather than NaN, without a host sync."""
    keep = targets != IGNORE_INDEX
    count = keep.sum().clamp(min=1)
    loss = (
        F.cross_entropy(logits.float(), targets, ignore_index=IGNORE_INDEX, reduction="sum") / count
    )
    with torch.no_grad():
        acc = ((logits.argmax(-1) == targets) & keep).sum() / count
    return loss, acc


def mlm_nsp_loss(
    model_out: PreTrainingLogits,
    mlm_labels: Tensor,
    next_sentence_label: Tensor,
    *,
    masked_positions: Tensor | None = None,
    nsp_weight: float = 1.0,
) -> dict[str, Tensor]:
    """BERT's loss: mean MLM cross-entropy over masked tokens + nsp_weight × NSP cross-entropy (1: BERT's
    unweighted sum; 0: MLM only, as RoBERTa, with NSP still measured).

    model_out.mlm_logits is (N, V) when the model ran its MLM head only at `masked_positions`
    (indices into the flattened (B*T) labels), else (B, T, V).
    Returns loss, mlm_loss, nsp_loss, mlm_acc, nsp_acc, mlm_ppl (all but `loss` detached).
    """
    mlm_logits = model_out.mlm_logits
    if masked_positions is not None:
        targets = mlm_labels.reshape(-1).index_select(0, masked_positions)  # (N,)
        if mlm_logits.dim() != 2 or mlm_logits.size(0) != targets.size(0):
            raise ValueError(
                f"mlm_logits {tuple(mlm_logits.shape)} do not match {targets.size(0)} masked positions"
            )
    else:
        if mlm_logits.shape[:-1] != mlm_labels.shape:
            raise ValueError(
                f"mlm_logits {tuple(mlm_logits.shape)} do not match mlm_labels {tuple(mlm_labels.shape)}"
            )
        targets = mlm_labels.reshape(-1)
        mlm_logits = mlm_logits.reshape(-1, mlm_logits.size(-1))  # (B, T, V) -> (B*T, V)
    mlm_loss, mlm_acc = _token_ce(mlm_logits, targets)
    nsp_logits = model_out.nsp_logits
    nsp_loss = F.cross_entropy(nsp_logits.float(), next_sentence_label)
    with torch.no_grad():
        nsp_acc = (nsp_logits.argmax(-1) == next_sentence_label).float().mean()
    return {
        # Multiplied even at 0, not left out: 0 × nsp_loss keeps the NSP head and the pooler in the graph, so
        # they get gradients (zeros) and DDP (find_unused_parameters=False) finds every parameter it waits for.
        "loss": mlm_loss + nsp_weight * nsp_loss,
        "mlm_loss": mlm_loss.detach(),
        "nsp_loss": nsp_loss.detach(),
        "mlm_acc": mlm_acc,
        "nsp_acc": nsp_acc,
        "mlm_ppl": torch.exp(mlm_loss.detach()),
    }


def clm_loss(logits: Tensor, labels: Tensor) -> dict[str, Tensor]:
    """Causal-LM loss. `labels` are already the next tokens (docs/design.md: the loader shifts), -100 = none.

    logits (B, T, V), labels (B, T). Returns loss, acc, ppl (acc and ppl detached)."""
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} do not match labels {tuple(labels.shape)}")
    loss, acc = _token_ce(
        logits.reshape(-1, logits.size(-1)), labels.reshape(-1)
    )  # (B*T, V), (B*T,)
    return {"loss": loss, "acc": acc, "ppl": torch.exp(loss.detach())}
