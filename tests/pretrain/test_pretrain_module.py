from __future__ import annotations

import math
import shutil
import warnings

import lightning as L
import pytest
import torch
from torch import Tensor, nn

from data_pipeline.configlib import from_preset
from pretrain.models.bert import BertConfig
from pretrain.models.gpt import GPTConfig
from pretrain.module import BertPretrainModule, GPTPretrainModule, KilnModule
from pretrain.optim import OptimConfig

V = 48


def mlm_nsp_batches(n: int, seed: int) -> list[dict[str, Tensor]]:
    """Batches in the docs/design.md `mlm_nsp` format, with padding in one row."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        ids = torch.randint(7, V, (4, 12), generator=gen)
        ids[:, 0], ids[:, 5], ids[:, 11] = 2, 3, 3
        mask = torch.ones_like(ids)
        ids[1, 9:], mask[1, 9:] = 0, 0
        labels = torch.full_like(ids, -100)
        labels[:, 2], labels[:, 7] = ids[:, 2], ids[:, 7]
        ids[:, 2], ids[:, 7] = 4, 4
        types = torch.zeros_like(ids)
        types[:, 6:] = 1
        out.append(
            {
                "input_ids": ids,
                "token_type_ids": types,
                "attention_mask": mask,
                "mlm_labels": labels,
                "next_sentence_label": torch.randint(0, 2, (4,), generator=gen),
                "sample_id": torch.arange(4 * i, 4 * i + 4),
            }
        )
    return out


def clm_batches(n: int, seed: int) -> list[dict[str, Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        block = torch.randint(0, V, (4, 17), generator=gen)
        out.append(
            {
                "input_ids": block[:, :-1],
                "labels": block[:, 1:],
                "sample_id": torch.arange(4 * i, 4 * i + 4),
            }
        )
    return out


def fit(
    module: KilnModule, train: list[dict[str, Tensor]], val: list[dict[str, Tensor]]
) -> L.Trainer:
    trainer = L.Trainer(
        max_steps=5,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        gradient_clip_val=module.optim_cfg.grad_clip,
    )
    loader = torch.utils.data.DataLoader(train, batch_size=None)  # items are already batches
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        trainer.fit(module, loader, torch.utils.data.DataLoader(val, batch_size=None))
    return trainer


def test_bert_pretrain_module_fits_and_logs() -> None:
    torch.manual_seed(0)
    module = BertPretrainModule(
        from_preset(BertConfig, "tiny", vocab_size=V), OptimConfig(warmup_steps=2), total_steps=5
    )
    before = module.model.bert.embeddings.word_embeddings.weight.detach().clone()
    trainer = fit(module, mlm_nsp_batches(5, 0), mlm_nsp_batches(3, 1))
    m = trainer.callback_metrics
    assert trainer.global_step == 5
    for key in [
        "train/loss",
        "train/mlm_acc",
        "train/nsp_acc",
        "train/ppl",
        "train/lr",
        "train/tokens_per_s",
        "val/loss",
        "val/ppl",
        "val/mlm_acc",
        "val/nsp_acc",
        "val/mlm_loss",
    ]:
        assert key in m and math.isfinite(m[key].item()), key
    assert m["val/ppl"].item() == pytest.approx(math.exp(m["val/mlm_loss"].item()), rel=1e-5)
    assert m["val/loss"].item() == pytest.approx(
        m["val/mlm_loss"].item() + m["val/nsp_loss"].item(), rel=1e-5
    )
    assert m["train/tokens_per_s"].item() > 0
    # the per-step schedule ran: after 5 steps of (warmup 2, then linear decay to 0 at step 5)
    assert trainer.lr_scheduler_configs[0].interval == "step"
    assert trainer.lr_scheduler_configs[0].scheduler.last_epoch == 5
    assert m["train/lr"].item() == pytest.approx(5e-4 * (1 - 2 / 3))  # lr used at step 4
    assert not torch.equal(before, module.model.bert.embeddings.word_embeddings.weight)


NSP_PARAMS = ("bert.pooler.", "cls.seq_relationship.")  # used only by next-sentence prediction


def test_nsp_weight_0_trains_mlm_only_and_still_logs_nsp() -> None:
    torch.manual_seed(0)
    # AdamW's decoupled weight decay shrinks the decayed matrices (the pooler's and NSP classifier's weights among
    # them) even under a zero gradient, so it is off here: unchanged weights then mean a gradient of exactly zero.
    optim = OptimConfig(warmup_steps=2, weight_decay=0.0)
    cfg = from_preset(BertConfig, "tiny", vocab_size=V)
    module = BertPretrainModule(cfg, optim, total_steps=5, nsp_weight=0.0)
    module.compute(mlm_nsp_batches(1, 2)[0], "train")["loss"].backward()
    nsp = {n: p for n, p in module.model.named_parameters() if n.startswith(NSP_PARAMS)}
    # every NSP parameter gets a gradient (DDP waits for one from each), and it is zero
    assert len(nsp) == 4 and all(p.grad is not None and not p.grad.any() for p in nsp.values())
    module.model.zero_grad(set_to_none=True)
    before = {n: p.detach().clone() for n, p in module.model.named_parameters()}
    trainer = fit(module, mlm_nsp_batches(5, 0), mlm_nsp_batches(3, 1))
    after = dict(module.model.named_parameters())
    assert all(torch.equal(before[n], after[n]) for n in nsp)
    embeddings = "bert.embeddings.word_embeddings.weight"
    assert not torch.equal(before[embeddings], after[embeddings])
    m = trainer.callback_metrics
    assert m["val/loss"].item() == pytest.approx(m["val/mlm_loss"].item(), rel=1e-6)
    # NSP is still measured
    assert m["val/nsp_loss"].item() > 0 and "val/nsp_acc" in m and "train/nsp_acc" in m
    with pytest.raises(ValueError, match="nsp_weight must be finite and >= 0"):
        BertPretrainModule(cfg, optim, total_steps=5, nsp_weight=-0.5)


def test_gpt_pretrain_module_fits_and_logs() -> None:
    torch.manual_seed(0)
    module = GPTPretrainModule(
        from_preset(GPTConfig, "tiny", vocab_size=V), OptimConfig(warmup_steps=2), total_steps=5
    )
    trainer = fit(module, clm_batches(5, 0), clm_batches(2, 1))
    m = trainer.callback_metrics
    for key in [
        "train/loss",
        "train/acc",
        "train/ppl",
        "train/lr",
        "train/tokens_per_s",
        "val/loss",
        "val/acc",
        "val/ppl",
    ]:
        assert key in m and math.isfinite(m[key].item()), key
    assert m["val/ppl"].item() == pytest.approx(math.exp(m["val/loss"].item()), rel=1e-5)
    assert 2.0 < m["val/loss"].item() < 6.0  # ~ln(48) for random tokens


def test_validation_means_are_weighted_over_the_epoch() -> None:
    module = GPTPretrainModule(
        from_preset(GPTConfig, "tiny", vocab_size=V), OptimConfig(), total_steps=5
    ).eval()
    val = clm_batches(3, 1)
    val[2] = {k: v[:1] for k, v in val[2].items()}  # a short last batch
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        trainer.validate(module, torch.utils.data.DataLoader(val, batch_size=None), verbose=False)
    with torch.no_grad():
        per_batch = [module.compute(b, "val")["loss"].item() for b in val]
    expected = (4 * per_batch[0] + 4 * per_batch[1] + 1 * per_batch[2]) / 9
    assert trainer.callback_metrics["val/loss"].item() == pytest.approx(expected, rel=1e-5)


def test_missing_batch_key_is_named() -> None:
    module = BertPretrainModule(
        from_preset(BertConfig, "tiny", vocab_size=V), OptimConfig(), total_steps=5
    )
    batch = mlm_nsp_batches(1, 0)[0]
    del batch["mlm_labels"]
    with pytest.raises(KeyError, match=r"BertPretrainModule: batch is missing \['mlm_labels'\]"):
        module.compute(batch, "train")


def test_kiln_module_is_the_finetune_base() -> None:
    class Regression(KilnModule):
        def compute(self, batch: dict[str, Tensor], stage: str) -> dict[str, Tensor]:
            loss = ((self.model(batch["x"]) - batch["y"]) ** 2).mean()
            return {"loss": loss, "rmse": loss.detach().sqrt()}

    class Incomplete(KilnModule):
        pass

    with pytest.raises(TypeError, match="compute"):
        Incomplete(nn.Linear(2, 1), OptimConfig(), 10)  # type: ignore[abstract]
    with pytest.raises(ValueError, match="total_steps"):
        Regression(nn.Linear(2, 1), OptimConfig(), 0)
    torch.manual_seed(0)
    x = torch.randn(32, 2)
    batches = [{"x": x[i : i + 8], "y": x[i : i + 8].sum(1, keepdim=True)} for i in range(0, 32, 8)]
    module = Regression(
        nn.Linear(2, 1), OptimConfig(lr=0.05, warmup_steps=0, weight_decay=0.0), total_steps=5
    )
    trainer = fit(module, batches + batches[:1], batches)
    assert set(trainer.callback_metrics) >= {
        "train/loss",
        "train/rmse",
        "train/lr",
        "val/loss",
        "val/rmse",
    }
    assert (
        trainer.callback_metrics["train/tokens_per_s"].item() == 0.0
    )  # no token ids: count_tokens gives 0


class PoisonedGPT(GPTPretrainModule):
    """Reports a NaN loss on the chosen (0-based) training calls."""

    def __init__(self, poisoned: set[int], total_steps: int) -> None:
        super().__init__(
            from_preset(GPTConfig, "tiny", vocab_size=V), OptimConfig(warmup_steps=0), total_steps
        )
        self.poisoned, self.calls, self.snapshots = poisoned, 0, []

    def compute(self, batch: dict[str, Tensor], stage: str) -> dict[str, Tensor]:
        out = super().compute(batch, stage)
        if stage == "train":
            self.snapshots.append(self.model.transformer.wte.weight.detach().clone())
            if self.calls in self.poisoned:
                out["loss"] = out["loss"] * float("nan")
            self.calls += 1
        return out


def test_non_finite_loss_skips_the_step_and_counts_it() -> None:
    torch.manual_seed(0)
    module = PoisonedGPT({1, 2}, total_steps=5)
    fit(module, clm_batches(5, 0), clm_batches(1, 1))
    assert module.skipped_steps == 2
    # The weights after a skipped call are the weights before it: no optimizer step on a NaN loss.
    assert torch.equal(module.snapshots[1], module.snapshots[2]) and torch.equal(
        module.snapshots[2], module.snapshots[3]
    )
    assert not torch.equal(module.snapshots[0], module.snapshots[1])  # finite steps do update
    assert all(torch.isfinite(p).all() for p in module.model.parameters())


def test_consecutive_non_finite_losses_stop_the_run() -> None:
    from pretrain.module import NonFiniteLossError

    torch.manual_seed(0)
    module = PoisonedGPT({0, 1, 2}, total_steps=5)
    module.max_nonfinite_steps = 3
    with pytest.raises(NonFiniteLossError, match=r"3 consecutive steps had a non-finite loss"):
        fit(module, clm_batches(5, 0), clm_batches(1, 1))


class SpikyGPT(PoisonedGPT):
    """A finite loss 1000x too large on one call, after enough normal steps for a running median."""

    def compute(self, batch: dict[str, Tensor], stage: str) -> dict[str, Tensor]:
        out = GPTPretrainModule.compute(self, batch, stage)
        if stage == "train":
            if self.calls in self.poisoned:
                out["loss"] = out["loss"] * 1000.0
            self.calls += 1
        return out


def test_a_loss_spike_is_warned_and_still_trained_on() -> None:
    torch.manual_seed(0)
    module = SpikyGPT({22}, total_steps=24)
    trainer = L.Trainer(
        max_steps=24,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        gradient_clip_val=1.0,
    )
    with pytest.warns(UserWarning, match=r"step 22: loss spike .* > 10x the running median"):
        trainer.fit(module, torch.utils.data.DataLoader(clm_batches(24, 0), batch_size=None))
    assert module.skipped_steps == 0  # a spike is finite: logged, not skipped


@pytest.mark.skipif(
    not (shutil.which("g++") or shutil.which("c++")),
    reason="TorchInductor on CPU needs a C++ compiler",
)
def test_compile_trains_like_eager_and_keeps_the_checkpoint_keys() -> None:
    import torch._dynamo

    def trained(compile_model: bool) -> tuple[GPTPretrainModule, float]:
        torch.manual_seed(0)
        module = GPTPretrainModule(
            from_preset(GPTConfig, "tiny", vocab_size=V), OptimConfig(warmup_steps=2), total_steps=5
        )
        module.compile_model = compile_model
        trainer = fit(module, clm_batches(5, 0), clm_batches(2, 1))
        return module, trainer.callback_metrics["val/loss"].item()

    eager, eager_loss = trained(False)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    import torch._inductor.config

    # Inductor draws dropout masks from its own generator unless told to use eager's: the same masks as eager
    with torch._inductor.config.patch(fallback_random=True):
        compiled, compiled_loss = trained(True)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0  # it did compile
    assert list(compiled.state_dict()) == list(
        eager.state_dict()
    )  # no "_orig_mod." in a checkpoint
    assert compiled_loss == pytest.approx(eager_loss, rel=1e-4)
    for (name, a), b in zip(
        eager.model.named_parameters(), compiled.model.parameters(), strict=True
    ):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4, msg=name)
