"""Fine-tuning model families, and `ARCHITECTURES`: the one registry of every Kiln architecture.

Adding an architecture is one entry here (docs/design.md, "Adding an architecture"); every list of
architectures is derived from this dict, and the `model` sections of `cluster.jobs` read it when a
config is built.
"""

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
from pretrain.checkpoint import LoadedCheckpoint, load_checkpoint
from pretrain.registry import PRETRAIN_ARCHITECTURES, ArchSpec, Registry

# arch -> its spec; load_finetuned passes it to pretrain.checkpoint.load_checkpoint.
ARCHITECTURES: Registry = {
    **PRETRAIN_ARCHITECTURES,  # bert, gpt
    # translation: every model here implements finetune.decode's decoding protocol
    "seq2seq_warm": ArchSpec(
        "seq2seq_warm", Seq2SeqConfig, WarmStartedSeq2Seq, "translation", pretrained=True
    ),
    "transformer": ArchSpec("transformer", TransformerConfig, TransformerSeq2Seq, "translation"),
    "lstm": ArchSpec("lstm", RNNSeq2SeqConfig, RNNSeq2Seq, "translation"),
    "lstm_attention": ArchSpec("lstm_attention", RNNSeq2SeqConfig, RNNSeq2Seq, "translation"),
    "convs2s": ArchSpec("convs2s", ConvS2SConfig, ConvS2S, "translation"),
    # classification: forward(input_ids, attention_mask) -> (B, num_labels) logits
    "bert_classifier": ArchSpec(
        "bert_classifier", ClassifierConfig, EncoderClassifier, "classification", pretrained=True
    ),
    # chosen by giving a fine-tuning job only `decoder_checkpoint`
    "gpt_classifier": ArchSpec(
        "gpt_classifier", GPTClassifierConfig, DecoderClassifier, "classification", pretrained=True
    ),
    "lstm_classifier": ArchSpec(
        "lstm_classifier", LSTMClassifierConfig, LSTMClassifier, "classification"
    ),
    # language-model baseline (finetune/lm_baselines.py); its character vocabulary sits beside it
    "char_lstm": ArchSpec("char_lstm", CharRNNConfig, CharRNNLM, "lm"),
}
TRANSLATION_ARCHES = tuple(
    name for name, spec in ARCHITECTURES.items() if spec.task == "translation"
)
CLASSIFICATION_ARCHES = tuple(
    name for name, spec in ARCHITECTURES.items() if spec.task == "classification"
)


def load_finetuned(path: Path | str) -> LoadedCheckpoint:
    """load_checkpoint with the fine-tuning architectures known (a fine-tuned or a pretrained
    checkpoint; a local directory or a URI, kept a `str`: Path() would turn `s3://` into `s3:/`)."""
    return load_checkpoint(path, ARCHITECTURES)


__all__ = [
    "ARCHITECTURES",
    "CLASSIFICATION_ARCHES",
    "TRANSLATION_ARCHES",
    "ArchSpec",
    "ClassifierConfig",
    "EncoderClassifier",
    "Seq2SeqConfig",
    "WarmStartedSeq2Seq",
    "load_finetuned",
]
