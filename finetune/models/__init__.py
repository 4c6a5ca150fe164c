"""Fine-tuning model families and the checkpoint architecture registry that includes them."""

from __future__ import annotations

from pathlib import Path

from finetune.models.classifier import ClassifierConfig, EncoderClassifier
from finetune.models.seq2seq import Seq2SeqConfig, WarmStartedSeq2Seq
from pretrain.checkpoint import ARCHITECTURES as PRETRAIN_ARCHITECTURES
from pretrain.checkpoint import LoadedCheckpoint, Registry, load_checkpoint

# arch -> (config dataclass, model class): pass to pretrain.checkpoint.load_checkpoint(path, ARCHITECTURES).
ARCHITECTURES: Registry = {
    **PRETRAIN_ARCHITECTURES,
    "seq2seq_warm": (Seq2SeqConfig, WarmStartedSeq2Seq),
    "bert_classifier": (ClassifierConfig, EncoderClassifier),
}


def load_finetuned(path: Path) -> LoadedCheckpoint:
    """load_checkpoint with the fine-tuning architectures known (a fine-tuned or a pretrained checkpoint)."""
    return load_checkpoint(Path(path), ARCHITECTURES)


__all__ = [
    "ARCHITECTURES",
    "ClassifierConfig",
    "EncoderClassifier",
    "Seq2SeqConfig",
    "WarmStartedSeq2Seq",
    "load_finetuned",
]
