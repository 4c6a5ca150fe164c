"""Sequence classifier on a pretrained BERT encoder (Devlin et al., 2019, §4.1): the pooled [CLS] output,
dropout, and one linear layer to the labels. Parameter names follow HF `BertForSequenceClassification`
(`bert.*`, `classifier.*`), so an HF checkpoint maps by name.

Input is `[CLS] text [SEP]` (docs/design.md); the model returns logits, the loss lives in finetune.module.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from finetune.models.warm_start import config_from_dict, copy_matching, load_pretrained
from pretrain.models.bert import BertConfig, BertModel, init_bert_module


@dataclass
class ClassifierConfig:
    """Encoder config + head. Round-trips through `dataclasses.asdict` like Seq2SeqConfig."""

    arch: str = "bert_classifier"
    encoder: BertConfig = field(default_factory=BertConfig)
    num_labels: int = 2
    classifier_dropout: float | None = None  # None = the encoder's hidden_dropout_prob (as HF)
    label_names: list[str] = field(default_factory=list)  # optional, index = label id; for reports

    def __post_init__(self) -> None:
        if self.arch != "bert_classifier":
            raise ValueError(f"ClassifierConfig.arch must be 'bert_classifier', got {self.arch!r}")
        self.encoder = config_from_dict(BertConfig, self.encoder, "ClassifierConfig.encoder")
        if self.num_labels < 2:
            raise ValueError(f"ClassifierConfig.num_labels must be >= 2, got {self.num_labels}")
        if self.label_names and len(self.label_names) != self.num_labels:
            raise ValueError(f"ClassifierConfig.label_names has {len(self.label_names)} names for "
                             f"num_labels={self.num_labels}")
        if self.classifier_dropout is not None and not 0.0 <= self.classifier_dropout < 1.0:
            raise ValueError(f"ClassifierConfig.classifier_dropout must be in [0, 1), got {self.classifier_dropout}")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ClassifierConfig:
        """Inverse of `dataclasses.asdict` (used by pretrain.checkpoint.load_checkpoint)."""
        return config_from_dict(cls, values, "ClassifierConfig")


class EncoderClassifier(nn.Module):
    """BertModel → pooled [CLS] (B,H) → dropout → linear → logits (B, num_labels)."""

    def __init__(self, config: ClassifierConfig) -> None:
        super().__init__()
        self.config = config
        self.bert = BertModel(config.encoder)
        p = config.classifier_dropout if config.classifier_dropout is not None else config.encoder.hidden_dropout_prob
        self.dropout = nn.Dropout(p)
        self.classifier = nn.Linear(config.encoder.hidden_size, config.num_labels)
        self._init_head()

    def _init_head(self) -> None:
        init_bert_module(self.classifier, self.config.encoder.initializer_range)

    def init_weights(self) -> None:
        """(Re)initialise everything in place; the second half of a meta-device build."""
        self.bert.init_weights()
        self._init_head()

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        _, pooled = self.bert(input_ids, attention_mask=attention_mask)  # (B,H)
        return self.classifier(self.dropout(pooled))  # (B, num_labels)

    @classmethod
    def from_pretrained(cls, bert_ckpt: Path, num_labels: int,
                        label_names: list[str] | None = None) -> tuple[EncoderClassifier, list[str]]:
        """Encoder (incl. the NSP-trained pooler) from a BERT pretraining checkpoint, a fresh head.

        Returns the model and the names of the freshly initialised tensors (the classifier head).
        """
        bert = load_pretrained(bert_ckpt, "bert")
        config = ClassifierConfig(encoder=bert.model_config, num_labels=num_labels, label_names=list(label_names or []))
        model = cls(config)
        source = {k.removeprefix("bert."): v for k, v in bert.model.state_dict().items() if k.startswith("bert.")}
        copy_matching(model.bert, source, f"{bert_ckpt} (encoder)", lambda name: False)
        return model, [f"classifier.{name}" for name, _ in model.classifier.named_parameters()]
