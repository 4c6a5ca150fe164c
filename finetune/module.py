"""Fine-tuning LightningModules on top of `pretrain.module.KilnModule` (which logs, times and builds AdamW).

Each module implements `compute(batch, stage)` with the batch formats of docs/design.md; the losses are plain
functions below so that they can be tested and reused without Lightning. BLEU needs decoding, which is far
slower than a teacher-forced validation step, so it is computed after training with
`finetune.translate.evaluate_translation`, not per validation epoch.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from finetune.flops import BatchShape, training_flops
from finetune.scheduled_sampling import ScheduledSampling, mix_decoder_inputs
from pretrain.flops import TRAIN_MULTIPLIER
from pretrain.module import KilnModule, require_keys
from pretrain.optim import OptimConfig

IGNORE_INDEX = -100  # tgt_out at padding (docs/design.md)


def translation_loss(logits: Tensor, tgt_out: Tensor, label_smoothing: float) -> dict[str, Tensor]:
    """Label-smoothed cross-entropy over the non-ignored target positions.

    logits (B,U,V), tgt_out (B,U) with -100 at padding. `loss` is what is optimised (smoothed); `nll` is the
    plain cross-entropy, so `ppl` = exp(nll) is a true perplexity and comparable across smoothing settings.
    """
    flat_logits = logits.reshape(-1, logits.size(-1)).float()  # (B*U, V)
    flat_tgt = tgt_out.reshape(-1)  # (B*U,)
    loss = F.cross_entropy(
        flat_logits, flat_tgt, ignore_index=IGNORE_INDEX, label_smoothing=label_smoothing
    )
    with torch.no_grad():
        nll = F.cross_entropy(flat_logits, flat_tgt, ignore_index=IGNORE_INDEX)
        real = flat_tgt != IGNORE_INDEX
        acc = (flat_logits.argmax(dim=-1)[real] == flat_tgt[real]).float().mean()
    return {"loss": loss, "nll": nll, "acc": acc, "ppl": torch.exp(nll)}


def classification_loss(logits: Tensor, labels: Tensor) -> dict[str, Tensor]:
    """Cross-entropy and accuracy; logits (B, num_labels), labels (B,)."""
    loss = F.cross_entropy(logits.float(), labels)
    with torch.no_grad():
        acc = (logits.argmax(dim=-1) == labels).float().mean()
    return {"loss": loss, "acc": acc}


class TranslationModule(KilnModule):
    """Teacher-forced training of an encoder-decoder (e.g. WarmStartedSeq2Seq) on `translation` batches, with
    optional scheduled sampling (finetune/scheduled_sampling.py) in training steps; evaluation is always teacher
    forced, so validation losses compare across settings.

    Logs `{stage}/loss` (label-smoothed), `nll`, `acc` (token accuracy) and `ppl`; with scheduled sampling also
    `train/sampling_prob`, the p of that step.
    """

    PERPLEXITY_OF: ClassVar[dict[str, str]] = {"ppl": "nll"}
    PROG_BAR: ClassVar[tuple[str, ...]] = ("loss", "acc")
    BATCH_KEYS: ClassVar[tuple[str, ...]] = ("src_ids", "src_mask", "tgt_in", "tgt_out")

    def __init__(
        self,
        model: nn.Module,
        optim_cfg: OptimConfig,
        total_steps: int,
        label_smoothing: float = 0.1,
        scheduled_sampling: ScheduledSampling | None = None,
        pretrained: Collection[str] = frozenset(),
    ) -> None:
        super().__init__(model, optim_cfg, total_steps, pretrained=pretrained)
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        self.label_smoothing = label_smoothing
        self.scheduled_sampling = scheduled_sampling
        # The schedule's step under a Lightning Trainer is its optimizer-step count (restored on resume, so the
        # schedule resumes with it); a loop that drives `compute` without a Trainer (benchmarks) sets this instead.
        self.manual_step = 0
        self._sampled = (
            False  # whether the last training step ran scheduled sampling's extra forward pass
        )

    def compute(self, batch: dict[str, Tensor], stage: str) -> dict[str, Tensor]:
        require_keys(batch, self.BATCH_KEYS, "TranslationModule")
        tgt_in, extra = batch["tgt_in"], {}
        if stage == "train" and self.scheduled_sampling is not None:
            prob = self.scheduled_sampling.probability(
                self.global_step if self._trainer else self.manual_step
            )
            tgt_in = self.sampled_decoder_inputs(batch, prob)
            extra = {"sampling_prob": torch.tensor(prob)}
            self._sampled = prob > 0.0
        logits = self.model(batch["src_ids"], batch["src_mask"], tgt_in)  # (B,U,V)
        return {**translation_loss(logits, batch["tgt_out"], self.label_smoothing), **extra}

    def sampled_decoder_inputs(self, batch: dict[str, Tensor], prob: float) -> Tensor:
        """Scheduled sampling's first pass: the model's argmax predictions, teacher forced and without gradients
        (in training mode, so dropout makes them a little noisier than at inference), mixed into tgt_in with
        probability `prob`. At prob 0 nothing runs and no random number is drawn: exactly teacher forcing."""
        if prob <= 0.0:
            return batch["tgt_in"]
        with torch.no_grad():
            predicted = self.model(batch["src_ids"], batch["src_mask"], batch["tgt_in"]).argmax(
                dim=-1
            )  # (B,U)
        return mix_decoder_inputs(batch["tgt_in"], batch["tgt_out"], predicted, prob)

    def count_tokens(self, batch: dict[str, Tensor]) -> int:
        return int(batch["src_mask"].sum()) + int((batch["tgt_out"] != IGNORE_INDEX).sum())

    def flops_per_token(self, batch: dict[str, Tensor]) -> float | None:
        """Training FLOPs of the batch (finetune/flops.py) per counted token, for train/mfu; with scheduled
        sampling the extra no-grad forward pass too (a third of a training step's count)."""
        shape = BatchShape(
            sequences=batch["src_ids"].size(0),
            src_tokens=int(batch["src_mask"].sum()),
            src_len=batch["src_ids"].size(1),
            tgt_tokens=int((batch["tgt_out"] != IGNORE_INDEX).sum()),
            tgt_len=batch["tgt_in"].size(1),
        )
        flops = training_flops(getattr(self.model, "config", None), shape)
        if flops is None:
            return None
        if self._sampled:
            flops += flops / TRAIN_MULTIPLIER
        return flops / max(shape.src_tokens + shape.tgt_tokens, 1)


class ClassificationModule(KilnModule):
    """Sequence classification (e.g. EncoderClassifier) on `classification` batches; logs loss and acc."""

    PERPLEXITY_OF: ClassVar[dict[str, str]] = {}
    PROG_BAR: ClassVar[tuple[str, ...]] = ("loss", "acc")
    BATCH_KEYS: ClassVar[tuple[str, ...]] = ("input_ids", "attention_mask", "labels")

    def compute(self, batch: dict[str, Tensor], stage: str) -> dict[str, Tensor]:
        require_keys(batch, self.BATCH_KEYS, "ClassificationModule")
        logits = self.model(batch["input_ids"], batch["attention_mask"])  # (B, num_labels)
        return classification_loss(logits, batch["labels"])

    def flops_per_token(self, batch: dict[str, Tensor]) -> float | None:
        """Training FLOPs of the batch (finetune/flops.py) per real input token, for train/mfu."""
        tokens = int(batch["attention_mask"].sum())  # what count_tokens counts
        shape = BatchShape(
            sequences=batch["input_ids"].size(0),
            src_tokens=tokens,
            src_len=batch["input_ids"].size(1),
        )
        flops = training_flops(getattr(self.model, "config", None), shape)
        return None if flops is None else flops / max(tokens, 1)
