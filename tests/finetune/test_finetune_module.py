"""Fine-tuning losses against hand computations, and a tiny Lightning fit of both modules."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
from finetune_testlib import BOS, CLS, EOS, PAD, SEP, VOCAB, bert_config, gpt_config
from torch.utils.data import DataLoader

from finetune.models.classifier import ClassifierConfig, EncoderClassifier
from finetune.models.seq2seq import Seq2SeqConfig, WarmStartedSeq2Seq
from finetune.module import (
    ClassificationModule,
    TranslationModule,
    classification_loss,
    translation_loss,
)
from pretrain.optim import OptimConfig


def test_translation_loss_matches_hand_computation() -> None:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 5, generator=gen)
    tgt = torch.tensor([[1, 4, -100], [0, 2, 3]])
    real = tgt != -100
    logp = torch.log_softmax(logits, dim=-1)[real]  # (5 real positions, V)
    gold = tgt[real]
    nll = -logp[torch.arange(5), gold].mean()
    eps = 0.1
    # label smoothing spreads eps uniformly over all V classes: (1-eps) * nll + eps * mean_v(-log p_v)
    smoothed = (1 - eps) * nll + eps * (-logp.mean(dim=-1)).mean()
    out = translation_loss(logits, tgt, eps)
    assert float(out["loss"]) == pytest.approx(float(smoothed), abs=1e-6)
    assert float(out["nll"]) == pytest.approx(float(nll), abs=1e-6)
    assert float(out["ppl"]) == pytest.approx(math.exp(float(nll)), rel=1e-6)
    hits = (logits.argmax(-1)[real] == gold).float().mean()
    assert float(out["acc"]) == pytest.approx(float(hits))
    assert float(translation_loss(logits, tgt, 0.0)["loss"]) == pytest.approx(float(nll), abs=1e-6)
    # what the model says at ignored positions cannot matter
    logits2 = logits.clone()
    logits2[0, 2] += 100.0
    assert float(translation_loss(logits2, tgt, eps)["loss"]) == pytest.approx(
        float(out["loss"]), abs=1e-6
    )


def test_classification_loss_known_values() -> None:
    logits = torch.tensor([[2.0, 0.0], [0.0, 0.0], [0.0, 3.0]])
    labels = torch.tensor([0, 1, 0])
    out = classification_loss(logits, labels)
    expected = (math.log(1 + math.exp(-2)) + math.log(2) + math.log(1 + math.exp(3))) / 3
    assert float(out["loss"]) == pytest.approx(expected, abs=1e-6)
    assert float(out["acc"]) == pytest.approx(1 / 3)  # row 1 is a tie: argmax picks 0, wrong


def translation_batches(n: int) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    batches = []
    for i in range(n):
        src = torch.randint(7, VOCAB, (4, 6), generator=gen)
        src[:, -1] = EOS
        y = torch.randint(7, VOCAB, (4, 5), generator=gen)
        tgt_in = torch.cat([torch.full((4, 1), BOS), y], dim=1)
        tgt_out = torch.cat([y, torch.full((4, 1), EOS)], dim=1)
        src_mask = torch.ones_like(src)
        src[0, 3:], src_mask[0, 3:] = PAD, 0
        tgt_in[0, 4:], tgt_out[0, 4:] = PAD, -100
        batches.append(
            {
                "src_ids": src,
                "src_mask": src_mask,
                "tgt_in": tgt_in,
                "tgt_out": tgt_out,
                "sample_id": torch.arange(4) + 4 * i,
            }
        )
    return batches


def classification_batches(n: int) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    batches = []
    for i in range(n):
        ids = torch.randint(7, VOCAB, (4, 7), generator=gen)
        ids[:, 0], ids[:, -1] = CLS, SEP
        batches.append(
            {
                "input_ids": ids,
                "attention_mask": torch.ones_like(ids),
                "labels": torch.randint(0, 3, (4,), generator=gen),
                "sample_id": torch.arange(4) + 4 * i,
            }
        )
    return batches


def fit(
    module: L.LightningModule, batches: list[dict[str, torch.Tensor]]
) -> dict[str, torch.Tensor]:
    trainer = L.Trainer(
        max_steps=5,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=2,
        num_sanity_val_steps=0,
        gradient_clip_val=1.0,
        val_check_interval=2,
    )
    loader = DataLoader(batches, batch_size=None)
    trainer.fit(
        module, train_dataloaders=loader, val_dataloaders=DataLoader(batches[:2], batch_size=None)
    )
    assert trainer.global_step == 5
    return {k: v for k, v in trainer.callback_metrics.items()}


def test_translation_module_fits_with_lightning() -> None:
    torch.manual_seed(0)
    cfg = Seq2SeqConfig(
        encoder=bert_config(), decoder=gpt_config(n_embd=32, add_cross_attention=True)
    )
    module = TranslationModule(
        WarmStartedSeq2Seq(cfg), OptimConfig(lr=1e-3, warmup_steps=2), total_steps=5
    )
    before = [p.detach().clone() for p in module.model.decoder.parameters()]
    metrics = fit(module, translation_batches(6))
    for key in (
        "train/loss",
        "train/nll",
        "train/acc",
        "train/ppl",
        "train/lr",
        "val/loss",
        "val/ppl",
        "val/acc",
    ):
        assert key in metrics and torch.isfinite(metrics[key]), key
    assert float(metrics["val/ppl"]) == pytest.approx(math.exp(float(metrics["val/nll"])), rel=1e-5)
    assert float(metrics["train/loss"]) > float(
        metrics["train/nll"]
    )  # smoothing raises the optimised loss
    assert any(
        not torch.equal(a, b)
        for a, b in zip(before, module.model.decoder.parameters(), strict=True)
    )
    assert module.count_tokens(translation_batches(1)[0]) == (4 * 6 - 3) + (4 * 6 - 2)
    # the frozen pooler (no path to the loss) is left alone and never blocks DDP
    assert all(p.grad is None for p in module.model.encoder.pooler.parameters())


def test_classification_module_fits_with_lightning() -> None:
    torch.manual_seed(0)
    model = EncoderClassifier(ClassifierConfig(encoder=bert_config(), num_labels=3))
    module = ClassificationModule(model, OptimConfig(lr=1e-3, warmup_steps=2), total_steps=5)
    metrics = fit(module, classification_batches(6))
    for key in ("train/loss", "train/acc", "val/loss", "val/acc"):
        assert key in metrics and torch.isfinite(metrics[key]), key
    assert all(p.grad is not None for p in module.model.parameters())  # every tensor is trained


def test_modules_name_missing_batch_keys() -> None:
    cfg = Seq2SeqConfig(encoder=bert_config(), decoder=gpt_config(add_cross_attention=True))
    module = TranslationModule(WarmStartedSeq2Seq(cfg), OptimConfig(), total_steps=5)
    with pytest.raises(KeyError, match=r"TranslationModule: batch is missing \['tgt_out'\]"):
        module.compute(
            {k: v for k, v in translation_batches(1)[0].items() if k != "tgt_out"}, "train"
        )
    with pytest.raises(ValueError, match="label_smoothing"):
        TranslationModule(
            WarmStartedSeq2Seq(cfg), OptimConfig(), total_steps=5, label_smoothing=1.0
        )
