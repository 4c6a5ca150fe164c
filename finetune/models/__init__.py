"""Fine-tuning model families and the checkpoint architecture registry that includes them."""

from __future__ import annotations

from pathlib import Path

from finetune.models.char_rnn import CharRNNConfig, CharRNNLM
from finetune.models.classifier import (
    ClassifierConfig,
    DecoderClassifier,
    EncoderClassifier,
    GPTClassifierConfig,
    LSTMClassifier,
    LSTMClassifierConfig,
)
from finetune.models.convs2s import ConvS2S, ConvS2SConfig
from finetune.models.rnn import RNNSeq2Seq, RNNSeq2SeqConfig
from finetune.models.seq2seq import Seq2SeqConfig, WarmStartedSeq2Seq
from finetune.models.transformer import TransformerConfig, TransformerSeq2Seq
from pretrain.checkpoint import ARCHITECTURES as PRETRAIN_ARCHITECTURES
from pretrain.checkpoint import LoadedCheckpoint, Registry, load_checkpoint

# arch -> (config dataclass, model class): pass to pretrain.checkpoint.load_checkpoint(path, ARCHITECTURES).
ARCHITECTURES: Registry = {
    **PRETRAIN_ARCHITECTURES,
    # translation: every model here implements finetune.decode's encode / decode_step / reorder_cache
    "seq2seq_warm": (Seq2SeqConfig, WarmStartedSeq2Seq),
    "transformer": (TransformerConfig, TransformerSeq2Seq),
    "lstm": (RNNSeq2SeqConfig, RNNSeq2Seq),
    "lstm_attention": (RNNSeq2SeqConfig, RNNSeq2Seq),
    "convs2s": (ConvS2SConfig, ConvS2S),
    # classification: forward(input_ids, attention_mask) -> (B, num_labels) logits
    "bert_classifier": (ClassifierConfig, EncoderClassifier),
    "gpt_classifier": (GPTClassifierConfig, DecoderClassifier),
    "lstm_classifier": (LSTMClassifierConfig, LSTMClassifier),
    # language-model baseline (finetune/lm_baselines.py); its character vocabulary sits beside it
    "char_lstm": (CharRNNConfig, CharRNNLM),
}
TRANSLATION_ARCHES = ("seq2seq_warm", "transformer", "lstm", "lstm_attention", "convs2s")
CLASSIFICATION_ARCHES = ("bert_classifier", "gpt_classifier", "lstm_classifier")


def load_finetuned(path: Path) -> LoadedCheckpoint:
    """load_checkpoint with the fine-tuning architectures known (a fine-tuned or a pretrained checkpoint)."""
    return load_checkpoint(Path(path), ARCHITECTURES)


__all__ = [
    "ARCHITECTURES",
    "CLASSIFICATION_ARCHES",
    "TRANSLATION_ARCHES",
    "ClassifierConfig",
    "EncoderClassifier",
    "Seq2SeqConfig",
    "WarmStartedSeq2Seq",
    "load_finetuned",
]
