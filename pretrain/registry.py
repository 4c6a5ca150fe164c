"""One entry per model architecture: the `arch` that a config or a checkpoint's config.json names.

An `ArchSpec` says what an architecture is (its config and model classes), which task trains it, and
whether fine-tuning starts it from pretrained checkpoints or from random weights. This module holds
pretrain's two families; `finetune.models.ARCHITECTURES` adds the fine-tuning ones and is the
registry the rest of Kiln reads (pretrain may not import finetune, docs/design.md). Every list of
architectures is derived from these two dicts: `pretrain.checkpoint.load_checkpoint`'s default,
`finetune.models.TRANSLATION_ARCHES` / `CLASSIFICATION_ARCHES`, and in `cluster.jobs` the family a
pretraining task trains and the `model.arch` choices of both job kinds.

Tables that only some architectures have are keyed by the same name and checked against the
registry by tests/finetune/test_registry.py: the Hugging Face export
(`pretrain.hf_export.HF_FAMILIES`, which reads only config.json and so cannot import finetune's
entries) and the FLOP counts of the MFU (`finetune.flops.FLOPS`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torch import nn

from pretrain.models.bert import BertConfig, BertForPreTraining
from pretrain.models.gpt import GPTConfig, GPTLMHeadModel

# What trains an architecture: a pretraining objective (mlm_nsp, clm), a fine-tuning task, or the
# language-model baselines of finetune/lm_baselines.py (lm).
Task = Literal["mlm_nsp", "clm", "translation", "classification", "lm"]


@dataclass(frozen=True)
class ArchSpec:
    name: str  # the `arch` of configs and checkpoints: a value of the config's `arch` Literal
    config: type  # the config dataclass
    model: type[nn.Module]  # built as `model(config)`
    task: Task
    # Fine-tuning starts it from pretrained checkpoints (encoder_checkpoint / decoder_checkpoint: a
    # job without a `model` section); otherwise its weights are random and a fine-tuning job picks
    # it by `model.arch`.
    pretrained: bool = False


Registry = dict[str, ArchSpec]
PRETRAIN_ARCHITECTURES: Registry = {
    "bert": ArchSpec("bert", BertConfig, BertForPreTraining, task="mlm_nsp"),
    "gpt": ArchSpec("gpt", GPTConfig, GPTLMHeadModel, task="clm"),
}
