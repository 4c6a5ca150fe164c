"""EncoderClassifier: warm start from a BERT checkpoint, config round trip, learning a separable set."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from finetune_testlib import (
    CLS,
    SEP,
    Pretrained,
    bert_config,
    digit_id,
    fit_separable_set,
    separable_set,
)

from data_pipeline.configlib import from_dict
from finetune.evaluate import accuracy, majority_class_accuracy, predict_labels
from finetune.models import load_finetuned
from finetune.models.classifier import ClassifierConfig, EncoderClassifier
from pretrain.checkpoint import CheckpointError, save_checkpoint
from pretrain.models.meta import build_on_meta, materialize
from pretrain.optim import OptimConfig


def test_config_round_trip_and_validation() -> None:
    cfg = ClassifierConfig(encoder=bert_config(), num_labels=3, label_names=["a", "b", "c"])
    assert from_dict(ClassifierConfig, dataclasses.asdict(cfg)) == cfg
    with pytest.raises(ValueError, match="label_names has 2 names for num_labels=3"):
        ClassifierConfig(encoder=bert_config(), num_labels=3, label_names=["a", "b"])
    with pytest.raises(ValueError, match="num_labels must be >= 2"):
        ClassifierConfig(encoder=bert_config(), num_labels=1)


def test_from_pretrained_loads_encoder_bitwise_and_reports_the_head(pretrained: Pretrained) -> None:
    model, new = EncoderClassifier.from_pretrained(pretrained.bert_dir, num_labels=3)
    assert new == ["classifier.weight", "classifier.bias"]
    for name, tensor in pretrained.bert.bert.state_dict().items():
        assert torch.equal(model.bert.state_dict()[name], tensor), name
    logits = model.eval()(
        torch.tensor([[CLS, digit_id(1), SEP]]), torch.ones(1, 3, dtype=torch.long)
    )
    assert logits.shape == (1, 3)


def test_from_pretrained_refuses_a_gpt_checkpoint(pretrained: Pretrained) -> None:
    with pytest.raises(CheckpointError, match="arch is 'gpt', but a 'bert' checkpoint"):
        EncoderClassifier.from_pretrained(pretrained.gpt_dir, num_labels=3)


def test_meta_build_and_checkpoint_round_trip(tmp_path: Path) -> None:
    cfg = ClassifierConfig(encoder=bert_config(), num_labels=4)
    model = materialize(build_on_meta(EncoderClassifier, cfg), "cpu").eval()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    loaded = load_finetuned(save_checkpoint(tmp_path / "clf", model, cfg))
    b = separable_set(5, seed=3)
    with torch.no_grad():
        torch.testing.assert_close(
            loaded.model.eval()(b["input_ids"], b["attention_mask"]),
            model(b["input_ids"], b["attention_mask"]),
            atol=0,
            rtol=0,
        )


def test_learns_a_separable_set(pretrained: Pretrained) -> None:
    torch.manual_seed(0)
    model, _ = EncoderClassifier.from_pretrained(pretrained.bert_dir, num_labels=3)
    fitted = fit_separable_set(
        model, OptimConfig(lr=2e-3, warmup_steps=10, schedule="constant"), max_steps=120
    )  # ~30 suffice on this data
    train, test = fitted.train, fitted.test
    preds, gold = predict_labels(model, [test])  # held out: generalisation, not memorisation
    assert gold == test["labels"].tolist()
    assert accuracy(preds, gold) >= 0.95 > fitted.accuracy_before
    assert (
        majority_class_accuracy(train["labels"].tolist(), gold) < 0.5
    )  # the baseline cannot get there


def test_mean_pooling_reads_only_the_real_tokens(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = EncoderClassifier(
        ClassifierConfig(encoder=bert_config(), num_labels=3, pooling="mean")
    ).eval()
    b = separable_set(4, seed=5)
    ids, mask = b["input_ids"], b["attention_mask"]
    with torch.no_grad():
        seq, _ = model.bert(ids, attention_mask=mask)
        by_hand = torch.stack(
            [seq[i, mask[i].bool()].mean(0) for i in range(len(ids))]
        )  # each row's real positions
        logits = model(ids, mask)
        torch.testing.assert_close(logits, model.classifier(by_hand))
        # more padding changes nothing; the [CLS] read-out would give other logits
        padded = model(torch.nn.functional.pad(ids, (0, 5)), torch.nn.functional.pad(mask, (0, 5)))
        torch.testing.assert_close(padded, logits)
        model.use_pooling("cls")
        assert not torch.allclose(model(ids, mask), logits)
    model.use_pooling("mean")
    loaded = load_finetuned(save_checkpoint(tmp_path / "clf", model, model.config))
    assert loaded.model.config.pooling == "mean"
    with torch.no_grad():
        torch.testing.assert_close(loaded.model.eval()(ids, mask), logits, atol=0, rtol=0)
    with pytest.raises(ValueError, match="pooling"):
        ClassifierConfig(encoder=bert_config(), pooling="max")


def test_mean_pooling_freezes_the_pooler_so_ddp_sees_no_unused_parameter(tmp_path: Path) -> None:
    """Kiln's DDP runs with find_unused_parameters=False: every parameter that wants a gradient must get one,
    or the second step fails. One gloo process is enough for DDP to check."""
    import torch.distributed as dist

    torch.manual_seed(0)
    model = EncoderClassifier(ClassifierConfig(encoder=bert_config(), num_labels=3))
    model.use_pooling("mean")
    assert not any(p.requires_grad for p in model.bert.pooler.parameters())
    b = separable_set(8, seed=2)
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
    )
    try:
        ddp = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=False)
        for _ in range(2):
            loss = ddp(b["input_ids"], b["attention_mask"]).logsumexp(-1).mean()
            loss.backward()
    finally:
        dist.destroy_process_group()
    got = {n for n, p in model.named_parameters() if p.grad is not None}
    assert got == {n for n, p in model.named_parameters() if p.requires_grad}
    assert not any(n.startswith("bert.pooler.") for n in got)
    model.use_pooling("cls")  # and back: the pooler trains again
    assert all(p.requires_grad for p in model.bert.pooler.parameters())
