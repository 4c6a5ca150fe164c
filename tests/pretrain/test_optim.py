from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from data_pipeline.configlib import from_preset
from pretrain.models.bert import BertConfig, BertForPreTraining
from pretrain.optim import OptimConfig, WarmupDecay, build_optimizer, param_groups


def lrs(cfg: OptimConfig, total_steps: int) -> list[float]:
    """Learning rate used at each optimizer step 0..total_steps-1."""
    opt, sched = build_optimizer(torch.nn.Linear(2, 2), cfg, total_steps)
    out = []
    for _ in range(total_steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_weight_decay_groups_follow_bert_practice() -> None:
    model = BertForPreTraining(from_preset(BertConfig, "tiny", vocab_size=30))
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert "bert.embeddings.word_embeddings.weight" in decayed  # embeddings are matrices: decayed
    assert "bert.encoder.layer.0.attention.self.query.weight" in decayed
    not_decayed = {names[id(p)] for p in no_decay["params"]}
    assert (
        "bert.embeddings.LayerNorm.weight" in not_decayed and "cls.predictions.bias" in not_decayed
    )
    assert all(n.endswith("bias") or "LayerNorm" in n for n in not_decayed)
    # every parameter exactly once; the tied decoder is the embedding, not a second entry
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    assert "cls.predictions.decoder.weight" not in decayed | not_decayed


def test_warmup_then_linear_decay_to_min() -> None:
    got = lrs(
        OptimConfig(lr=1.0, warmup_steps=4, schedule="linear", min_lr_ratio=0.1), total_steps=14
    )
    assert got[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    # 10 decay steps from 1.0 towards 0.1: 1.0, 0.91, ..., 0.19
    assert got[4:] == pytest.approx([0.1 + 0.9 * (1 - k / 10) for k in range(10)])


def test_cosine_shape() -> None:
    got = lrs(OptimConfig(lr=2.0, warmup_steps=2, schedule="cosine"), total_steps=12)
    assert got[:2] == pytest.approx([1.0, 2.0])
    assert got[2] == pytest.approx(2.0)
    assert got[2 + 5] == pytest.approx(1.0)  # halfway through the decay: half the peak
    assert got[-1] == pytest.approx(2.0 * 0.5 * (1 + math.cos(math.pi * 9 / 10)))
    f = WarmupDecay(warmup_steps=2, total_steps=12, schedule="cosine", min_lr_ratio=0.0)
    assert f(12) == pytest.approx(0.0) and f(1000) == pytest.approx(0.0)  # clamped after the end


def test_constant_and_no_warmup() -> None:
    assert lrs(OptimConfig(lr=0.5, warmup_steps=0, schedule="constant"), total_steps=5) == [0.5] * 5
    assert lrs(
        OptimConfig(lr=1.0, warmup_steps=0, schedule="linear"), total_steps=4
    ) == pytest.approx([1.0, 0.75, 0.5, 0.25])


def test_config_errors_name_the_key() -> None:
    with pytest.raises(ValueError, match="OptimConfig.schedule.*'cosine'"):
        OptimConfig(schedule="exponential")
    with pytest.raises(ValueError, match="OptimConfig.lr"):
        OptimConfig(lr=0.0)
    with pytest.raises(ValueError, match="OptimConfig.beta2"):
        OptimConfig(beta2=1.0)
    with pytest.raises(ValueError, match="total_steps"):
        build_optimizer(torch.nn.Linear(2, 2), OptimConfig(), 0)
    for bad in (-0.5, math.nan, math.inf):
        with pytest.raises(
            ValueError, match="OptimConfig.pretrained_lr_ratio must be finite and >= 0"
        ):
            OptimConfig(pretrained_lr_ratio=bad)


def test_pretrained_lr_ratio_needs_pretrained_parameters() -> None:
    model = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match="optim.pretrained_lr_ratio is 0.5, but no parameter"):
        build_optimizer(model, OptimConfig(pretrained_lr_ratio=0.5), 10)
    opt, _ = build_optimizer(model, OptimConfig(lr=0.2, pretrained_lr_ratio=0.5), 10, {"weight"})
    # the bias (new) at lr, the weight (pretrained) at lr * 0.5; the schedule starts from these
    assert [(g["initial_lr"], len(g["params"])) for g in opt.param_groups] == [(0.2, 1), (0.1, 1)]


def test_optimizer_and_scheduler_state_round_trip_with_weights_only(tmp_path: Path) -> None:
    model = torch.nn.Linear(3, 2)
    opt, sched = build_optimizer(model, OptimConfig(lr=0.1, warmup_steps=2), total_steps=10)
    for _ in range(3):
        model(torch.randn(4, 3)).sum().backward()
        opt.step()
        sched.step()
    torch.save({"optimizer": opt.state_dict(), "scheduler": sched.state_dict()}, tmp_path / "s.pt")
    state = torch.load(tmp_path / "s.pt", weights_only=True)
    opt2, sched2 = build_optimizer(model, OptimConfig(lr=0.1, warmup_steps=2), total_steps=10)
    opt2.load_state_dict(state["optimizer"])
    sched2.load_state_dict(state["scheduler"])
    assert sched2.last_epoch == 3 and opt2.param_groups[0]["lr"] == pytest.approx(
        opt.param_groups[0]["lr"]
    )
    torch.testing.assert_close(
        opt2.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"]
    )
