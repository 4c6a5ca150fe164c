"""DeepSpeed ZeRO on two CPU ranks without Ray: processes spawned by torch.multiprocessing, DeepSpeed's CPU accelerator
over gloo, the strategy configs Kiln trains with (cluster.strategies.build_strategy).

- ZeRO-3 builds BERT and GPT partitioned, through `KilnModule.configure_model` inside the strategy's
  `model_sharded_context` (DeepSpeed's zero.Init, as Lightning calls it): each rank holds only its half of every
  parameter, the gathered weights are bitwise those of an eager (DDP) build from the same seed, the training RNG is
  left untouched, the MLM head stays tied, and weight decay still finds the matrices.
- ZeRO-1/2/3 match DDP over 20 steps: each rank trains on its own batches through the DeepSpeed engine; the
  reference is DDP's arithmetic done in one process (every rank's loss backpropagated, gradients averaged, AdamW).
  The first losses are equal; the tolerance after that is stated (and measured) at TOLERANCE.
- A warm start (a classifier on a BERT checkpoint, the encoder_checkpoint path) is built whole and loaded before
  DeepSpeed partitions it at ZeRO-3; its weights and outputs survive the partitioning.

End-to-end through Ray Train and Lightning: tests/e2e/test_strategies.py."""

from __future__ import annotations

import argparse
import math
import os
import socket
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp

from cluster.callbacks import zero3_state_dict
from cluster.jobs import ClusterConfig
from data_pipeline.configlib import from_preset
from finetune.models.classifier import EncoderClassifier
from finetune.module import ClassificationModule
from pretrain.checkpoint import save_checkpoint
from pretrain.models.bert import BertConfig, BertForPreTraining
from pretrain.models.gpt import GPTConfig
from pretrain.module import BertPretrainModule, GPTPretrainModule, KilnModule
from pretrain.optim import OptimConfig, param_groups

pytest.importorskip("deepspeed")
WORLD = 2
SEED = 1234
BATCH = 2
STEPS = 20
LR = 1e-3
GRAD_CLIP = 1.0  # OptimConfig's default; Lightning hands it to DeepSpeed as `gradient_clipping` (also 1.0 if unset)
# ZeRO-1/2/3 against DDP, on losses of ~4 falling to ~2.6-3.9: the same fp32 AdamW arithmetic, but the engine averages
# gradients in its own collectives (reduce-scatter into flat partitions) where DDP all-reduces buckets, so sums are
# re-associated; measured over 20 steps: at most 4.8e-7 apart (one float32 ulp at 4). 5e-6 allows ten ulps and is
# still 1e5 times smaller than the losses' fall. (Without clipping on both sides, DeepSpeed's default
# gradient_clipping=1.0 alone made them 2e-2 apart: the tolerance does catch a different update.)
TOLERANCE = 5e-6


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _batch(family: str, seed: int) -> dict[str, torch.Tensor]:
    # Runs of consecutive ids from a random start: learnable, so the losses fall and the comparison means something.
    g = torch.Generator().manual_seed(seed)
    ids = (torch.randint(0, 45, (BATCH, 1), generator=g) + torch.arange(16)) % 45 + 5
    if family == "gpt":
        return {"input_ids": ids, "labels": torch.roll(ids, -1, dims=1)}
    labels = torch.full_like(ids, -100)
    labels[:, 3:6] = ids[:, 3:6]
    return {
        "input_ids": ids,
        "token_type_ids": torch.zeros_like(ids),
        "attention_mask": torch.ones_like(ids),
        "mlm_labels": labels,
        "next_sentence_label": torch.tensor([0, 1]),
    }


def _batches(step: int, family: str) -> list[dict[str, torch.Tensor]]:
    """Every rank's batch at `step` (the reference needs all of them; a ZeRO rank takes its own)."""
    return [_batch(family, seed=1000 * step + rank) for rank in range(WORLD)]


def _module(family: str, deferred: bool) -> KilnModule:
    # No dropout: the reference and the engine run in different orders and would draw different masks.
    optim = OptimConfig(lr=LR, warmup_steps=1)
    if family == "gpt":
        cfg = from_preset(
            GPTConfig,
            "tiny",
            vocab_size=50,
            n_positions=16,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
        )
        return GPTPretrainModule(cfg, optim, 10, deferred)
    cfg = from_preset(
        BertConfig,
        "tiny",
        vocab_size=50,
        max_position_embeddings=16,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return BertPretrainModule(cfg, optim, 10, deferred)


def _check_partitioned(model: torch.nn.Module) -> None:
    """Every parameter is a ZeRO-3 partition: no full storage, 1/WORLD of its elements on this rank."""
    params = list(model.parameters())
    for p in params:
        assert p.numel() == 0, p.ds_shape  # the full tensor is not held
        assert p.ds_tensor.numel() == math.ceil(p.ds_numel / WORLD)
    held, full = sum(p.ds_tensor.numel() for p in params), sum(p.ds_numel for p in params)
    assert held <= full / WORLD + len(params)  # padding: at most one element per parameter


def _gathered_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None):
        return {k: v.clone() for k, v in model.state_dict().items()}


def _engine(model: torch.nn.Module, strategy: Any) -> Any:
    """What CPUCapableDeepSpeedStrategy._setup_model_and_optimizer does with Kiln's optimizer."""
    import deepspeed

    optimizer = torch.optim.AdamW(param_groups(model, 0.01), lr=LR)
    config = {
        **strategy.config,
        "gradient_clipping": GRAD_CLIP,
    }  # as Lightning's DeepSpeedStrategy fills it in
    engine, *_ = deepspeed.initialize(
        args=argparse.Namespace(device_rank=int(os.environ["LOCAL_RANK"])),
        model=model,
        optimizer=optimizer,
        config=config,
        dist_init_required=False,
    )
    return engine


def _zero3_build(family: str, strategy: Any) -> KilnModule:
    """The module built under zero.Init, checked against the eager build every DDP rank makes from the same seed."""
    torch.manual_seed(SEED)
    module = _module(family, deferred=True)
    assert module.model is None  # nothing built yet
    rng = torch.get_rng_state()
    with strategy.model_sharded_context():
        module.configure_model()
    assert torch.equal(torch.get_rng_state(), rng)  # dropout streams continue as in a DDP run
    _check_partitioned(module.model)

    torch.manual_seed(SEED)
    reference = _module(family, deferred=False).model
    gathered, expected = _gathered_state(module.model), reference.state_dict()
    assert gathered.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(gathered[key], value), key
    # What a checkpoint save writes: the same weights, on rank 0 only, gathered one module at a time.
    consolidated = zero3_state_dict(module.model, int(os.environ["RANK"]))
    if int(os.environ["RANK"]) != 0:
        assert consolidated is None
    else:
        assert list(consolidated) == list(expected)
        assert [
            key for key, value in expected.items() if not torch.equal(consolidated[key], value)
        ] == []
    if family == "bert":
        model = module.model
        assert (
            model.cls.predictions.decoder.weight is model.bert.embeddings.word_embeddings.weight
        )  # still tied
    sizes = [len(g["params"]) for g in param_groups(module.model, 0.01)]
    assert sizes == [
        len(g["params"]) for g in param_groups(reference, 0.01)
    ]  # decay vs no decay, as eager
    return module


def _ddp_losses(family: str) -> list[float]:
    """DDP's arithmetic in one process: each rank's loss on its batch, gradients averaged over the ranks, clipped,
    one AdamW step. Returns this process's rank's loss at every step (what that DDP rank would compute; checked
    bitwise against torch DDP over gloo while writing this test)."""
    torch.manual_seed(SEED)
    module = _module(family, deferred=False)
    optimizer = torch.optim.AdamW(param_groups(module.model, 0.01), lr=LR)
    rank, losses, params = (
        int(os.environ["RANK"]),
        [],
        [p for p in module.model.parameters() if p.requires_grad],
    )
    for step in range(STEPS):
        grads = []
        for r, batch in enumerate(_batches(step, family)):
            loss = module.compute(batch, "train")["loss"]
            grads.append(torch.autograd.grad(loss, params, allow_unused=True))
            if r == rank:
                losses.append(loss.item())
        for p, per_rank in zip(params, zip(*grads, strict=True), strict=True):
            p.grad = (
                torch.stack([torch.zeros_like(p) if g is None else g for g in per_rank]).sum(0)
                / WORLD
            )
        torch.nn.utils.clip_grad_norm_(params, GRAD_CLIP)
        optimizer.step()
        optimizer.zero_grad()
    return losses


def _zero_losses(family: str, stage: int) -> list[float]:
    from cluster.strategies import build_strategy

    strategy = build_strategy(ClusterConfig(strategy=f"deepspeed_stage_{stage}"), BATCH)
    if stage == 3:
        module = _zero3_build(family, strategy)
    else:
        torch.manual_seed(SEED)
        module = _module(family, deferred=False)
    engine = module.model = _engine(module.model, strategy)
    rank, losses = int(os.environ["RANK"]), []
    for step in range(STEPS):
        loss = module.compute(_batches(step, family)[rank], "train")["loss"]
        losses.append(loss.item())
        engine.backward(loss)
        engine.step()
    return losses


def _warm_start(bert_ckpt: Path) -> None:
    """The fine-tuning path (encoder_checkpoint) under ZeRO-3: built and loaded whole, partitioned by the engine."""
    from cluster.strategies import build_strategy

    strategy = build_strategy(ClusterConfig(strategy="deepspeed_stage_3"), BATCH)
    torch.manual_seed(SEED)
    reference, _ = EncoderClassifier.from_pretrained(bert_ckpt, 2)  # what a DDP rank trains
    torch.manual_seed(SEED)
    model, _ = EncoderClassifier.from_pretrained(bert_ckpt, 2)
    module = ClassificationModule(model, OptimConfig(), 10)
    engine = module.model = _engine(model, strategy)
    _check_partitioned(engine.module)
    gathered = _gathered_state(engine.module)
    for key, value in reference.state_dict().items():
        assert torch.equal(gathered[key], value), key
    ids, mask = _batch("bert", 0)["input_ids"], _batch("bert", 0)["attention_mask"]
    engine.eval()  # DeepSpeedEngine.eval returns None, not the engine
    torch.testing.assert_close(engine(ids, mask), reference.eval()(ids, mask), rtol=0, atol=0)


def _rank(rank: int, port: int, bert_ckpt: Path, out: Path) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(WORLD),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(WORLD),
    )
    torch.set_num_threads(1)
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    results = {}
    for family in ("bert", "gpt"):
        ddp = _ddp_losses(family)
        for stage in (1, 2, 3):
            results[(family, stage)] = (_zero_losses(family, stage), ddp)
    _warm_start(bert_ckpt)
    torch.save(results, out / f"losses-{rank}.pt")


def test_zero_matches_ddp_over_20_steps(tmp_path: Path) -> None:
    torch.manual_seed(0)
    cfg = from_preset(BertConfig, "tiny", vocab_size=50, max_position_embeddings=16)
    bert_ckpt = save_checkpoint(tmp_path / "bert", BertForPreTraining(cfg), cfg)
    mp.spawn(_rank, args=(_free_port(), bert_ckpt, tmp_path), nprocs=WORLD, join=True)
    for rank in range(WORLD):
        results = torch.load(tmp_path / f"losses-{rank}.pt", weights_only=True)
        for (family, stage), (zero, ddp) in results.items():
            where = f"{family}, ZeRO-{stage}, rank {rank}"
            assert len(zero) == len(ddp) == STEPS
            if family == "gpt" and stage == 3:
                # ZeRO-3's head weight is a partition outside the head's own forward, so its GPT runs the head and
                # clm_loss where DDP runs pretrain.objectives.fused_clm_loss: the same sums in another order.
                assert abs(zero[0] - ddp[0]) <= 1e-6, (where, zero[0], ddp[0])
            else:
                assert zero[0] == ddp[0], where  # the same weights, the same forward
            assert ddp[-1] < ddp[0] - 0.5, (
                where,
                ddp,
            )  # it trains: the comparison is not between constants
            worst = max(abs(a - b) for a, b in zip(zero, ddp, strict=True))
            assert worst <= TOLERANCE, f"{where}: losses up to {worst:.2e} apart"
