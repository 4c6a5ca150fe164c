"""Sequence classifiers; input is `[CLS] text [SEP]` (docs/design.md), right-padded, and every model returns
logits (B, num_labels), the loss living in finetune.module.

- `EncoderClassifier` ("bert_classifier"): a pretrained BERT encoder (Devlin et al., 2019, §4.1), the pooled
  [CLS] output, dropout, one linear layer. Names follow HF `BertForSequenceClassification` (`bert.*`, `classifier.*`).
  `pooling="mean"` reads the mean of the last hidden states over the real tokens instead (Reimers & Gurevych,
  2019): an encoder pretrained by MLM alone never trains [CLS] or the pooler (only NSP does).
- `DecoderClassifier` ("gpt_classifier"): a pretrained GPT whose hidden state at the last real token (a causal
  model has read the whole text only there; here it is [SEP]) feeds a linear head (Radford et al., 2018, §3.3).
  Names follow HF `GPT2ForSequenceClassification` (`transformer.*`, `score`).
- `LSTMClassifier` ("lstm_classifier"): the from-scratch baseline, embedding → biLSTM → max and mean pooling
  over the real tokens → linear (max+mean pooling as Howard & Ruder, 2018, ULMFiT's concat pooling).

Read top to bottom: BERT config → model; GPT config → model; LSTM config → model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from data_pipeline.configlib import check_fields
from finetune.models.rnn import real_lengths
from finetune.models.warm_start import copy_matching, load_pretrained
from pretrain.checkpoint import CheckpointError
from pretrain.models.bert import BertConfig, BertModel, init_bert_module
from pretrain.models.gpt import GPTConfig, GPTModel, init_gpt_module


def _check_head(
    where: str, num_labels: int, label_names: list[str], dropout_key: str, dropout: float | None
) -> None:
    """Checks shared by every classifier config; `where` is the config's class name."""
    if num_labels < 2:
        raise ValueError(f"{where}.num_labels must be >= 2, got {num_labels}")
    if label_names and len(label_names) != num_labels:
        raise ValueError(
            f"{where}.label_names has {len(label_names)} names for num_labels={num_labels}"
        )
    if dropout is not None and not 0.0 <= dropout < 1.0:
        raise ValueError(f"{where}.{dropout_key} must be in [0, 1), got {dropout}")


def mean_over_real(states: Tensor, attention_mask: Tensor | None) -> Tensor:
    """(B,T,H) → (B,H): the mean over the positions the mask marks real (all of them without a mask)."""
    if attention_mask is None:
        return states.mean(dim=1)
    mask = attention_mask.unsqueeze(-1).to(states.dtype)  # (B,T,1)
    return (states * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)


@dataclass
class ClassifierConfig:
    """Encoder config + head. Round-trips through `dataclasses.asdict` like Seq2SeqConfig."""

    arch: Literal["bert_classifier"] = "bert_classifier"
    encoder: BertConfig = field(default_factory=BertConfig)
    num_labels: int = 2
    classifier_dropout: float | None = None  # None = the encoder's hidden_dropout_prob (as HF)
    label_names: list[str] = field(default_factory=list)  # optional, index = label id; for reports
    # "cls": BERT's pooler on [CLS] (HF BertForSequenceClassification); "mean": the last hidden states averaged
    # over the real tokens, no pooler (not exportable to HF, which has no such head).
    pooling: Literal["cls", "mean"] = "cls"

    def __post_init__(self) -> None:
        check_fields(self)  # types, arch; an `encoder` mapping becomes a BertConfig
        _check_head(
            "ClassifierConfig",
            self.num_labels,
            self.label_names,
            "classifier_dropout",
            self.classifier_dropout,
        )


class EncoderClassifier(nn.Module):
    """BertModel → pooled [CLS] (or the real tokens' mean) (B,H) → dropout → linear → logits (B, num_labels)."""

    def __init__(self, config: ClassifierConfig) -> None:
        super().__init__()
        self.config = config
        self.bert = BertModel(config.encoder)
        p = (
            config.classifier_dropout
            if config.classifier_dropout is not None
            else config.encoder.hidden_dropout_prob
        )
        self.dropout = nn.Dropout(p)
        self.classifier = nn.Linear(config.encoder.hidden_size, config.num_labels)
        self._init_head()
        self.use_pooling(config.pooling)

    def use_pooling(self, pooling: Literal["cls", "mean"]) -> None:
        """Read [CLS] through the pooler, or the real tokens' mean. The mean leaves the pooler out of the graph,
        so it is frozen: DDP (find_unused_parameters=False) would wait forever for its gradients."""
        self.config.pooling = pooling
        self.bert.pooler.requires_grad_(pooling == "cls")

    def _init_head(self) -> None:
        init_bert_module(self.classifier, self.config.encoder.initializer_range)

    def init_weights(self) -> None:
        """(Re)initialise everything in place; the second half of a meta-device build."""
        self.bert.init_weights()
        self._init_head()

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        seq, pooled = self.bert(input_ids, attention_mask=attention_mask)  # (B,T,H), (B,H)
        if self.config.pooling == "mean":
            pooled = mean_over_real(seq, attention_mask)
        return self.classifier(self.dropout(pooled))  # (B, num_labels)

    @classmethod
    def from_pretrained(
        cls, bert_ckpt: Path, num_labels: int, label_names: list[str] | None = None
    ) -> tuple[EncoderClassifier, list[str]]:
        """Encoder (incl. the NSP-trained pooler) from a BERT pretraining checkpoint, a fresh head.

        Returns the model and the names of the freshly initialised tensors (the classifier head).
        """
        bert = load_pretrained(bert_ckpt, "bert")
        config = ClassifierConfig(
            encoder=bert.model_config, num_labels=num_labels, label_names=list(label_names or [])
        )
        model = cls(config)
        source = {
            k.removeprefix("bert."): v
            for k, v in bert.model.state_dict().items()
            if k.startswith("bert.")
        }
        copy_matching(model.bert, source, f"{bert_ckpt} (encoder)", lambda name: False)
        return model, [f"classifier.{name}" for name, _ in model.classifier.named_parameters()]


@dataclass
class GPTClassifierConfig:
    """Decoder config + head. Round-trips through `dataclasses.asdict` like ClassifierConfig."""

    arch: Literal["gpt_classifier"] = "gpt_classifier"
    decoder: GPTConfig = field(default_factory=GPTConfig)
    num_labels: int = 2
    classifier_dropout: float | None = None  # None = the decoder's resid_pdrop
    label_names: list[str] = field(default_factory=list)  # optional, index = label id; for reports

    def __post_init__(self) -> None:
        check_fields(self)  # types, arch; a `decoder` mapping becomes a GPTConfig
        if self.decoder.add_cross_attention:
            # nothing to attend to: the cross-attention weights would never get a gradient (DDP waits for them)
            raise ValueError("GPTClassifierConfig.decoder.add_cross_attention must be False")
        _check_head(
            "GPTClassifierConfig",
            self.num_labels,
            self.label_names,
            "classifier_dropout",
            self.classifier_dropout,
        )


class DecoderClassifier(nn.Module):
    """GPTModel → hidden state at the last real token (B,C) → dropout → linear (no bias, as HF) → logits."""

    def __init__(self, config: GPTClassifierConfig) -> None:
        super().__init__()
        self.config = config
        self.transformer = GPTModel(config.decoder)
        p = (
            config.classifier_dropout
            if config.classifier_dropout is not None
            else config.decoder.resid_pdrop
        )
        self.dropout = nn.Dropout(p)
        self.score = nn.Linear(config.decoder.n_embd, config.num_labels, bias=False)
        self._init_head()

    def _init_head(self) -> None:
        init_gpt_module(self.score, self.config.decoder.initializer_range)

    def init_weights(self) -> None:
        """(Re)initialise everything in place; the second half of a meta-device build."""
        self.transformer.init_weights()
        self._init_head()

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        # Causal: position i has read tokens 0..i only, so right padding never reaches the last real token and
        # GPTModel needs no attention mask. (Left padding would shift the positions; real_lengths refuses it.)
        hidden, _ = self.transformer(input_ids)  # (B,T,C)
        B, T = input_ids.shape
        if attention_mask is None:
            last = torch.full((B,), T - 1, dtype=torch.long, device=input_ids.device)
        else:
            last = real_lengths(attention_mask, "attention_mask") - 1  # (B,)
        pooled = hidden[torch.arange(B, device=input_ids.device), last]  # (B,C)
        return self.score(self.dropout(pooled))  # (B, num_labels)

    @classmethod
    def from_pretrained(
        cls, gpt_ckpt: Path, num_labels: int, label_names: list[str] | None = None
    ) -> tuple[DecoderClassifier, list[str]]:
        """Decoder from a GPT pretraining checkpoint (its `transformer.*` weights; the LM head is dropped), a
        fresh head. Returns the model and the names of the freshly initialised tensors (the head).
        """
        gpt = load_pretrained(gpt_ckpt, "gpt")
        if gpt.model_config.add_cross_attention:
            raise CheckpointError(
                f"{Path(gpt_ckpt) / 'config.json'}: add_cross_attention is true; a classifier "
                "needs a plain GPT (language-model) checkpoint"
            )
        config = GPTClassifierConfig(
            decoder=gpt.model_config, num_labels=num_labels, label_names=list(label_names or [])
        )
        model = cls(config)
        source = {
            k.removeprefix("transformer."): v
            for k, v in gpt.model.state_dict().items()
            if k.startswith("transformer.")
        }
        copy_matching(model.transformer, source, f"{gpt_ckpt} (decoder)", lambda name: False)
        return model, [f"score.{name}" for name, _ in model.score.named_parameters()]


@dataclass
class LSTMClassifierConfig:
    """Flat config of the from-scratch baseline. `preset` is applied by `configlib.from_preset` / the
    config loader."""

    # "small": one 256-wide biLSTM layer, the size of the usual SST-2 LSTM baselines (Wang et al., 2019, GLUE
    # used a 1500-wide BiLSTM with ELMo; far beyond this CPU's budget).
    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        "tiny": dict(embedding_dim=32, hidden_size=32, num_layers=1),
        "small": dict(embedding_dim=256, hidden_size=256, num_layers=1),
    }

    arch: Literal["lstm_classifier"] = "lstm_classifier"
    preset: str | None = None
    vocab_size: int = 8000
    pad_id: int = 0
    embedding_dim: int = 256
    hidden_size: int = 256  # per direction
    num_layers: int = 1
    dropout: float = 0.3  # embeddings, between LSTM layers, and on the pooled features
    init_range: float = 0.1  # every weight ~ U(-r, r)
    num_labels: int = 2
    label_names: list[str] = field(default_factory=list)  # optional, index = label id; for reports

    def __post_init__(self) -> None:
        check_fields(self)  # types, arch, preset name
        for key in ("vocab_size", "embedding_dim", "hidden_size", "num_layers", "init_range"):
            if getattr(self, key) <= 0:
                raise ValueError(
                    f"LSTMClassifierConfig.{key} must be > 0, got {getattr(self, key)}"
                )
        if not 0 <= self.pad_id < self.vocab_size:
            raise ValueError(
                f"LSTMClassifierConfig.pad_id must be in [0, vocab_size={self.vocab_size}), "
                f"got {self.pad_id}"
            )
        _check_head(
            "LSTMClassifierConfig", self.num_labels, self.label_names, "dropout", self.dropout
        )


class LSTMClassifier(nn.Module):
    """Embedding → biLSTM (packed) → [max; mean] over the real tokens (B,4H) → dropout → linear → logits."""

    def __init__(self, config: LSTMClassifierConfig) -> None:
        super().__init__()
        self.config = config
        self.embedding = nn.Embedding(config.vocab_size, config.embedding_dim)
        self.lstm = nn.LSTM(
            config.embedding_dim,
            config.hidden_size,
            config.num_layers,
            batch_first=True,
            bidirectional=True,
            dropout=config.dropout if config.num_layers > 1 else 0.0,
        )
        self.dropout = nn.Dropout(config.dropout)
        self.classifier = nn.Linear(4 * config.hidden_size, config.num_labels)
        self.init_weights()

    def init_weights(self) -> None:
        """(Re)initialise every parameter in place; also the second half of a meta-device build."""
        if self.embedding.weight.is_meta:
            return  # shapes only; materialize() calls this again on real storage
        r = self.config.init_range
        with torch.no_grad():
            for p in self.parameters():
                p.uniform_(-r, r)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        lengths = real_lengths(mask, "attention_mask")  # (B,)
        emb = self.dropout(self.embedding(input_ids))  # (B,T,E)
        packed = pack_padded_sequence(emb, lengths.cpu(), batch_first=True, enforce_sorted=False)
        out, _ = pad_packed_sequence(
            self.lstm(packed)[0], batch_first=True, total_length=input_ids.size(1)
        )  # (B,T,2H)
        real = mask.bool().unsqueeze(-1)  # (B,T,1)
        max_pool = out.masked_fill(~real, float("-inf")).amax(dim=1)  # (B,2H)
        mean_pool = out.sum(dim=1) / lengths.unsqueeze(1).to(
            out.dtype
        )  # (B,2H); out is 0 at padding
        return self.classifier(
            self.dropout(torch.cat([max_pool, mean_pool], dim=-1))
        )  # (B, num_labels)
