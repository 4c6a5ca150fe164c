"""optim.pretrained_lr_ratio on warm-started models: the parameters loaded from a checkpoint train at lr * ratio,
the new ones (head, cross-attention) at lr, decay / no-decay split kept; 0 freezes the loaded ones, also under
DDP (two gloo ranks, no Ray); 1 is exactly the optimizer of before."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from finetune_testlib import Pretrained, separable_set
from kiln_testlib import fit_steps
from torch import nn

from finetune.models.classifier import EncoderClassifier
from finetune.models.seq2seq import WarmStartedSeq2Seq
from finetune.models.warm_start import pretrained_names
from finetune.module import ClassificationModule, classification_loss
from pretrain.optim import OptimConfig, build_optimizer, param_groups

LR, RATIO = 1e-2, 0.1


def classifier(pretrained: Pretrained) -> tuple[EncoderClassifier, frozenset[str], list[str]]:
    torch.manual_seed(0)
    model, new = EncoderClassifier.from_pretrained(pretrained.bert_dir, 3)
    return model, pretrained_names(model, new), new


def named_groups(model: nn.Module, groups: list[dict]) -> list[set[str]]:
    names = {id(p): n for n, p in model.named_parameters()}
    return [{names[id(p)] for p in g["params"]} for g in groups]


def test_pretrained_parameters_train_at_lr_times_the_ratio_and_new_ones_at_lr(
    pretrained: Pretrained,
) -> None:
    model, loaded, new = classifier(pretrained)
    assert new and set(new) == {n for n, _ in model.named_parameters()} - loaded
    assert all(n.startswith("classifier.") for n in new)
    cfg = OptimConfig(lr=LR, pretrained_lr_ratio=RATIO, weight_decay=0.01)
    optimizer, _ = build_optimizer(model, cfg, 10, loaded)
    groups = optimizer.param_groups
    names = named_groups(model, groups)
    # (new | pretrained) x (decay | no decay), before the schedule; group 0 (train/lr) is the new ones, at optim.lr
    assert [g["initial_lr"] for g in groups] == [LR, LR, LR * RATIO, LR * RATIO]
    assert [g["weight_decay"] for g in groups] == [0.01, 0.0, 0.01, 0.0]
    assert names[0] | names[1] == set(new) and names[2] | names[3] == loaded
    # the decay split is the one without the option
    decay, no_decay = named_groups(model, param_groups(model, 0.01))
    assert names[0] | names[2] == decay and names[1] | names[3] == no_decay
    # every trainable parameter in exactly one group
    counts = Counter(id(p) for g in groups for p in g["params"])
    assert set(counts) == {id(p) for p in model.parameters()} and set(counts.values()) == {1}


def test_the_schedule_keeps_the_ratio_through_warmup_and_decay(pretrained: Pretrained) -> None:
    model, loaded, _ = classifier(pretrained)
    cfg = OptimConfig(lr=LR, pretrained_lr_ratio=RATIO, warmup_steps=3, min_lr_ratio=0.1)
    optimizer, scheduler = build_optimizer(model, cfg, 10, loaded)
    seen = []
    for _ in range(10):
        new_lr, old_lr = optimizer.param_groups[0]["lr"], optimizer.param_groups[-1]["lr"]
        assert old_lr == pytest.approx(new_lr * RATIO, rel=1e-12)
        seen.append(new_lr)
        optimizer.step()
        scheduler.step()
    assert (
        seen[2] == pytest.approx(LR) == seen[3] and seen[-1] < seen[3]
    )  # the peak after warm-up, then the decay


def test_ratio_0_freezes_the_pretrained_parameters(pretrained: Pretrained) -> None:
    model, loaded, new = classifier(pretrained)
    cfg = OptimConfig(lr=LR, pretrained_lr_ratio=0.0, warmup_steps=0)
    module = ClassificationModule(model, cfg, 3, pretrained=loaded)
    params = dict(model.named_parameters())
    assert not any(
        params[n].requires_grad for n in loaded
    )  # frozen at construction, before any strategy
    assert all(params[n].requires_grad for n in new)
    before = {n: p.detach().clone() for n, p in params.items()}
    data = separable_set(96, seed=0)
    batches = [{k: v[i * 32 : i * 32 + 32] for k, v in data.items()} for i in range(3)]
    trainer = fit_steps(module, batches)
    assert all(torch.equal(params[n], before[n]) for n in loaded)
    assert all(not torch.equal(params[n], before[n]) for n in new)
    assert all(params[n].grad is None for n in loaded)
    optimizer = trainer.optimizers[0]
    in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert in_optimizer == {id(params[n]) for n in new}
    assert {id(p) for p in optimizer.state} == in_optimizer  # no moments for the frozen ones


def test_ratio_1_is_exactly_the_old_optimizer(pretrained: Pretrained) -> None:
    model, loaded, _ = classifier(pretrained)
    cfg = OptimConfig(lr=LR)
    with_names, _ = build_optimizer(model, cfg, 10, loaded)
    without, _ = build_optimizer(model, cfg, 10)
    assert with_names.state_dict()["param_groups"] == without.state_dict()["param_groups"]
    assert [[id(p) for p in g["params"]] for g in with_names.param_groups] == [
        [id(p) for p in g["params"]] for g in without.param_groups
    ]


def test_a_warm_started_translation_model_keeps_cross_attention_at_lr(
    pretrained_narrow_decoder: Pretrained,
) -> None:
    p = pretrained_narrow_decoder
    model, new = WarmStartedSeq2Seq.from_pretrained(p.bert_dir, p.gpt_dir)
    loaded = pretrained_names(model, new)
    params = dict(model.named_parameters())
    fresh = set(params) - loaded
    assert fresh and all(
        "crossattention" in n or "ln_cross_attn" in n or "enc_to_dec_proj" in n for n in fresh
    )
    assert (
        "decoder.transformer.wte.weight" in loaded
    )  # the tied LM head is this tensor, listed once
    assert "decoder.lm_head.weight" not in params
    optimizer, _ = build_optimizer(model, OptimConfig(lr=LR, pretrained_lr_ratio=RATIO), 10, loaded)
    at_lr = set().union(*named_groups(model, optimizer.param_groups[:2]))
    assert at_lr == fresh


def test_pretrained_names_match_tied_parameters_by_tensor() -> None:
    model = nn.ModuleDict({"emb": nn.Embedding(5, 4), "out": nn.Linear(4, 5, bias=False)})
    model["out"].weight = model["emb"].weight  # tied: named_parameters lists it once, as emb.weight
    assert pretrained_names(model, ["out.weight"]) == frozenset()  # new under its other name: new
    assert pretrained_names(model, []) == {"emb.weight"}


def _ddp_rank(rank: int, bert_dir: Path, out: Path) -> None:
    """One DDP rank as Lightning runs it: the module built (and frozen) first, then wrapped, then its optimizer."""
    # a file rendezvous, not a port: a free port chosen before the spawn can be taken by then (the suite's Ray
    # processes open many)
    store = f"file://{out / 'rendezvous'}"
    torch.distributed.init_process_group("gloo", init_method=store, rank=rank, world_size=2)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model, new = EncoderClassifier.from_pretrained(bert_dir, 3)
    loaded = pretrained_names(model, new)
    cfg = OptimConfig(lr=LR, pretrained_lr_ratio=0.0, warmup_steps=0)
    module = ClassificationModule(model, cfg, 3, pretrained=loaded)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ddp = nn.parallel.DistributedDataParallel(module, find_unused_parameters=False)
    optimizer = module.configure_optimizers()["optimizer"]
    data = separable_set(64, seed=rank)
    for step in range(3):  # a parameter DDP waits for in vain fails the second step
        rows = slice(step * 16, step * 16 + 16)
        logits = ddp(data["input_ids"][rows], data["attention_mask"][rows])
        loss = classification_loss(logits, data["labels"][rows])["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = {n: p.detach().clone() for n, p in model.named_parameters()}
    torch.save({"before": before, "after": after, "new": new}, out / f"rank-{rank}.pt")
    torch.distributed.destroy_process_group()


def test_ratio_0_trains_under_ddp(pretrained: Pretrained, tmp_path: Path) -> None:
    mp.spawn(_ddp_rank, args=(pretrained.bert_dir, tmp_path), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank-{r}.pt", weights_only=True) for r in range(2)]
    new = set(ranks[0]["new"])
    for r in ranks:
        for name, tensor in r["after"].items():
            assert torch.equal(tensor, r["before"][name]) == (name not in new), name
    for name in new:  # gradients were averaged: the ranks' heads agree
        assert torch.equal(ranks[0]["after"][name], ranks[1]["after"][name])
