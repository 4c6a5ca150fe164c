"""Pretraining objectives: BERT's masked LM + next-sentence prediction, and GPT's causal LM.

Models return logits; these functions turn logits + the batch labels of docs/design.md into a dict
with a differentiable `loss` and detached metrics (accuracies, perplexity) ready to log.
"""

from __future__ import annotations

from typing import Any, Protocol

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


# Rows of logits alive at once: 512 x 50257 fp32 is 103 MB, against 412 MB for a whole 16 x 128 batch.
FUSED_CHUNK_ROWS = 512


class _LinearCrossEntropy(torch.autograd.Function):
    """Sum-reduced cross-entropy of `hidden @ weight.T` whose gradients are computed chunk by chunk in the forward
    (Liger Kernel's fused linear cross-entropy): the (N, V) logits, their log-softmax and its gradient are never
    whole at once, and each chunk's probabilities become its own gradient in place."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, hidden: Tensor, weight: Tensor, targets: Tensor, count: Tensor, chunk: int
    ) -> tuple[Tensor, Tensor]:
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = torch.zeros_like(weight) if need_weight else None
        loss = hidden.new_zeros((), dtype=torch.promote_types(hidden.dtype, torch.float32))
        correct = hidden.new_zeros((), dtype=torch.long)
        for start in range(0, hidden.size(0), chunk):
            h, t = hidden[start : start + chunk], targets[start : start + chunk]
            logits = h @ weight.T  # (n, V)
            keep = t != IGNORE_INDEX
            picked = t.clamp(min=0).unsqueeze(1)
            target_logit = logits.gather(1, picked).squeeze(1)
            # One pass for the max and the argmax, then exp in place: no (n, V) temporaries beside the logits.
            best, guess = logits.max(dim=-1)
            probs = logits.sub_(best.unsqueeze(1)).exp_()
            total = probs.sum(dim=-1)
            loss += ((best + total.log() - target_logit) * keep).sum()
            correct += ((guess == t) & keep).sum()
            if grad_hidden is None and grad_weight is None:
                continue
            # d(mean CE)/d logits = (softmax - one-hot) / count, rows without a label zeroed.
            scale = keep.to(probs.dtype) / count
            grad = probs.mul_((scale / total).unsqueeze(1))
            grad.scatter_add_(1, picked, -scale.unsqueeze(1))
            if grad_hidden is not None:
                torch.mm(grad, weight, out=grad_hidden[start : start + chunk])
            if grad_weight is not None:
                grad_weight.addmm_(grad.T, h)
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.mark_non_differentiable(correct)
        return loss / count, correct / count

    @staticmethod
    def backward(ctx: Any, grad_loss: Tensor, _grad_acc: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        grad_hidden, grad_weight = ctx.saved_tensors
        return (
            None if grad_hidden is None else grad_hidden * grad_loss,
            None if grad_weight is None else grad_weight * grad_loss,
            None,
            None,
            None,
        )


def fused_clm_loss(
    hidden: Tensor, weight: Tensor, labels: Tensor, chunk: int = FUSED_CHUNK_ROWS
) -> dict[str, Tensor]:
    """`clm_loss(hidden @ weight.T, labels)` without the (B, T, V) logits: hidden (B, T, C) from the final layer
    norm, weight (V, C) the LM head's (tied to the token embeddings). Same loss, acc and ppl, and the same gradients
    up to float rounding; for fp32 training, outside autocast (`fused_clm_applies`)."""
    if hidden.shape[:-1] != labels.shape:
        raise ValueError(
            f"hidden {tuple(hidden.shape)} does not match labels {tuple(labels.shape)}"
        )
    flat_hidden, targets = hidden.reshape(-1, hidden.size(-1)), labels.reshape(-1)
    count = (targets != IGNORE_INDEX).sum().clamp(min=1)
    loss, acc = _LinearCrossEntropy.apply(flat_hidden, weight, targets, count, chunk)
    return {"loss": loss, "acc": acc, "ppl": torch.exp(loss.detach())}


def fused_clm_applies(weight: Tensor) -> bool:
    """Whether `fused_clm_loss` may replace the LM head + `clm_loss`: fp32 weights outside autocast (the fused path
    would compute bf16/fp16 logits without autocast's fp32 softmax), and not a ZeRO-3 partition (`ds_id`: the head's
    weight is whole only inside its own module's forward, which the fused path does not call)."""
    autocast = any(torch.is_autocast_enabled(device) for device in ("cpu", "cuda"))
    return weight.dtype == torch.float32 and not autocast and not hasattr(weight, "ds_id")
