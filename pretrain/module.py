"""LightningModules that wrap the plain models. Lightning lives here, never in `pretrain/models/`.

`KilnModule` is the shared base (pretraining here, fine-tuning in `finetune/`). A subclass:
  - passes `model: nn.Module, optim_cfg: OptimConfig, total_steps: int` to `KilnModule.__init__` (or, for ZeRO-3, a
    function that builds the model: it is then built in `configure_model`, see there), and for a fine-tuning model
    `pretrained=`, the names of the parameters loaded from a checkpoint (`optim.pretrained_lr_ratio` applies to them);
  - implements `compute(batch, stage) -> dict[str, Tensor]` returning at least `loss` (differentiable when
    stage == "train"); every other value is a scalar metric;
  - may override `count_tokens(batch) -> int` (tokens/s; default: sum of `attention_mask`, else numel of
    `input_ids`), `flops_per_token(batch) -> float | None` (training FLOPs per counted token, see
    `pretrain.flops`; default None: no MFU), `PERPLEXITY_OF` and `PROG_BAR`.
The base then
  - training: logs every key as `train/<key>` each step, plus `train/lr` and `train/tokens_per_s` (wall clock
    from the end of one training batch to the end of the next, times world size: a global estimate), and
    `train/mfu` (this device's model FLOP/s over `peak_flops`, which the launcher sets) when both are known;
  - validation / test: accumulates every key weighted by batch size, sums the totals over all ranks, and logs
    `val/<key>` (`test/<key>`) once per epoch; a perplexity key named in PERPLEXITY_OF is logged as exp(mean
    loss) rather than the mean of per-batch perplexities;
  - configures AdamW + the per-step schedule with `pretrain.optim.build_optimizer`.
Gradient clipping is the Trainer's (`gradient_clip_val = OptimConfig.grad_clip`), never done here.
"""

from __future__ import annotations

import collections
import math
import statistics
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Collection, Iterable
from typing import Any, ClassVar

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from pretrain.flops import decoder_flops_per_token, encoder_flops_per_token
from pretrain.models.bert import BertConfig, BertForPreTraining
from pretrain.models.gpt import GPTConfig, GPTLMHeadModel
from pretrain.objectives import (
    clm_loss,
    fused_clm_applies,
    fused_clm_loss,
    masked_positions_from_labels,
    mlm_nsp_loss,
)
from pretrain.optim import OptimConfig, build_optimizer, freeze_pretrained

SPIKE_FACTOR = 10.0  # a loss above this multiple of the running median is logged as a spike


class NonFiniteLossError(RuntimeError):
    """Too many consecutive steps with a NaN/inf loss: the run stops rather than train on garbage."""


def require_keys(batch: dict[str, Tensor], keys: Iterable[str], who: str) -> None:
    """A clear error instead of a bare KeyError deep inside a step."""
    missing = [k for k in keys if k not in batch]
    if missing:
        raise KeyError(
            f"{who}: batch is missing {missing}; it has {sorted(batch)} (batch formats: docs/design.md)"
        )


def batch_size_of(batch: dict[str, Tensor]) -> int:
    if "sample_id" in batch:
        return int(batch["sample_id"].size(0))
    return int(next(v for v in batch.values() if isinstance(v, Tensor)).size(0))


class KilnModule(L.LightningModule, ABC):
    PERPLEXITY_OF: ClassVar[dict[str, str]] = {
        "ppl": "loss"
    }  # perplexity key -> the loss key it is exp of
    PROG_BAR: ClassVar[tuple[str, ...]] = ("loss",)

    def __init__(
        self,
        model: nn.Module | Callable[[], nn.Module],
        optim_cfg: OptimConfig,
        total_steps: int,
        *,
        pretrained: Collection[str] = frozenset(),
    ) -> None:
        super().__init__()
        if total_steps <= 0:
            raise ValueError(f"total_steps must be > 0, got {total_steps}")
        self.pretrained = frozenset(pretrained)
        self.model: nn.Module | None = model if isinstance(model, nn.Module) else None
        # optim.pretrained_lr_ratio 0: frozen here, before any strategy wraps the model (freeze_pretrained says why)
        if self.model is not None:
            freeze_pretrained(self.model, optim_cfg, self.pretrained)
        self._build_model = None if isinstance(model, nn.Module) else model
        # The CPU RNG as an eager build would have found it here: the deferred build draws from it (on CPU: the same
        # weights as an eager build; on a GPU zero.Init allocates there, and the CUDA generator draws).
        self._build_rng = None if isinstance(model, nn.Module) else torch.get_rng_state()
        self.optim_cfg = optim_cfg
        self.total_steps = total_steps
        self.peak_flops: float | None = (
            None  # FLOP/s of one device; set by the launcher, None: no train/mfu
        )
        self._t_last: float | None = None
        self._tokens = 0
        self._flops = 0.0
        self._eval_sums: dict[str, Tensor] = {}
        self._eval_rows = 0
        self.max_nonfinite_steps = (
            5  # consecutive non-finite losses before the run stops (trainer.max_nonfinite_steps)
        )
        self.compile_model = False  # trainer.compile, set by the launcher
        self.skipped_steps = 0
        self._nonfinite_run = 0
        self._drop_gradients = False  # a skip in this accumulation window: no optimizer step
        self._recent: collections.deque[float] = collections.deque(maxlen=100)

    @abstractmethod
    def compute(self, batch: dict[str, Tensor], stage: str) -> dict[str, Tensor]:
        """Loss and metrics of one batch; stage is "train", "val" or "test"."""

    def count_tokens(self, batch: dict[str, Tensor]) -> int:
        if "attention_mask" in batch:
            return int(batch["attention_mask"].sum())
        if "input_ids" in batch:
            return batch["input_ids"].numel()
        return 0

    def flops_per_token(self, batch: dict[str, Tensor]) -> float | None:
        return None

    def configure_model(self) -> None:
        """Builds a deferred model; with trainer.compile, compiles the model. Lightning calls this inside the
        strategy's `model_sharded_context`, which under ZeRO-3 is DeepSpeed's `zero.Init`: each module's parameters
        are partitioned across the ranks as soon as that module is built, so no rank ever holds the whole model (the
        models initialise through `Module.apply`, which zero.Init makes gather one module at a time). The build draws
        from the RNG state saved in `__init__` and leaves the training RNG as it was, so ZeRO-3 starts from the
        weights (and dropout stream) of a DDP run."""
        if self.model is None:
            with (
                torch.random.fork_rng()
            ):  # the CPU generator and any CUDA one come back as they were
                torch.set_rng_state(self._build_rng)
                self.model = self._build_model()
            self._build_rng = None
            freeze_pretrained(self.model, self.optim_cfg, self.pretrained)
        if self.compile_model:
            # In place: the module's own forward is compiled on its first call, its state_dict keys stay as they
            # are (torch.compile(model) would add "_orig_mod."), so checkpoints do not depend on this setting.
            self.model.compile()
            self.compile_model = False

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer, scheduler = build_optimizer(
            self.model, self.optim_cfg, self.total_steps, self.pretrained
        )
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1},
        }

    # ---- training ----
    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        out = self.compute(batch, "train")
        if not self._loss_is_usable(out["loss"]):
            return self._skipped_step_loss(out["loss"])  # every rank agreed (see _loss_is_usable)
        n = batch_size_of(batch)
        for key, value in out.items():
            self.log(
                f"train/{key}",
                value.detach(),
                on_step=True,
                on_epoch=False,
                prog_bar=key in self.PROG_BAR,
                batch_size=n,
            )
        self.log(
            "train/lr",
            self.trainer.optimizers[0].param_groups[0]["lr"],
            on_step=True,
            on_epoch=False,
            batch_size=n,
        )
        tokens = self.count_tokens(batch)
        per_token = self.flops_per_token(batch)
        self._tokens += tokens
        self._flops += tokens * per_token if per_token is not None else 0.0
        return out["loss"]

    def _loss_is_usable(self, loss: Tensor) -> bool:
        """False for a non-finite loss on ANY rank, decided alike on every rank: one rank skipping its step while
        another all-reduces gradients would hang the job. Counts skips, stops after `max_nonfinite_steps` in a row,
        and warns about a spike (> SPIKE_FACTOR x the running median of recent losses)."""
        local = loss.detach().float()
        finite = torch.isfinite(local).float()
        if self.trainer.world_size > 1:
            finite = self.trainer.strategy.reduce(finite, reduce_op="min")
        all_finite, value = torch.stack(
            [finite, local]
        ).tolist()  # one device-to-host sync per step, not two
        if all_finite < 1:
            self.skipped_steps += 1
            self._nonfinite_run += 1
            self.log(
                "train/skipped_steps",
                float(self.skipped_steps),
                on_step=True,
                on_epoch=False,
                batch_size=1,
            )
            rank_zero_warn(
                f"step {self.global_step}: non-finite loss on some rank; optimizer step skipped "
                f"({self._nonfinite_run} in a row, {self.skipped_steps} in total)"
            )
            if self._nonfinite_run >= self.max_nonfinite_steps:
                raise NonFiniteLossError(
                    f"{self._nonfinite_run} consecutive steps had a non-finite loss (last at step "
                    f"{self.global_step}); stopping. Lower optim.lr, raise optim.warmup_steps or "
                    "check the data; trainer.max_nonfinite_steps sets the limit"
                )
            return False
        self._nonfinite_run = 0
        if len(self._recent) >= 20 and value > SPIKE_FACTOR * statistics.median(self._recent):
            rank_zero_warn(
                f"step {self.global_step}: loss spike {value:.4g} > {SPIKE_FACTOR:g}x the running median "
                f"{statistics.median(self._recent):.4g}"
            )
        self._recent.append(value)
        return True

    def _skipped_step_loss(self, loss: Tensor) -> Tensor:
        """What `training_step` returns for a step that every rank skips. Not None: Lightning
        refuses None from a run of more than one process (and under DeepSpeed at all). Its gradients
        are all NaN (NaN x anything is NaN, a finite loss included), so every rank runs the same
        backward and all-reduce and none waits on another. Then the optimizer must not step: a
        strategy that skips a step on non-finite gradients itself supplies `loss_for_skipped_step`
        (DeepSpeed: cluster.strategies, which explains why); otherwise (DDP, one device)
        `on_before_optimizer_step` drops the gradients of this step's accumulation window, so the
        optimizer finds none and leaves every parameter, moment and step count as it was (under
        "16-mixed" the GradScaler has already seen the NaN and skips its step as on any overflow).
        Lightning still counts the step (global_step, the LR schedule), under every strategy."""
        strategy_hook = getattr(self.trainer.strategy, "loss_for_skipped_step", None)
        if strategy_hook is not None:
            return strategy_hook(loss)
        self._drop_gradients = True
        return loss * float("nan")

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        if self._drop_gradients:
            # None, not zero: AdamW skips a parameter without a gradient, where a zero gradient
            # would still decay its moments, apply weight decay and advance its step count.
            optimizer.zero_grad(set_to_none=True)
            self._drop_gradients = False

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if self._t_last is None:
            self._t_last = time.perf_counter()

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        now = time.perf_counter()
        if self._t_last is not None and now > self._t_last:
            seconds, n = now - self._t_last, batch_size_of(batch)
            rate = self._tokens * self.trainer.world_size / seconds
            self.log("train/tokens_per_s", rate, on_step=True, on_epoch=False, batch_size=n)
            if self.peak_flops and self._flops:
                self.log(
                    "train/mfu",
                    self._flops / seconds / self.peak_flops,
                    on_step=True,
                    on_epoch=False,
                    batch_size=n,
                )
        self._t_last, self._tokens, self._flops = now, 0, 0.0

    def on_validation_start(self) -> None:
        self._t_last = None  # time spent validating is not training throughput

    # ---- validation / test ----
    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def on_validation_epoch_start(self) -> None:
        self._eval_sums, self._eval_rows = {}, 0

    def on_test_epoch_start(self) -> None:
        self._eval_sums, self._eval_rows = {}, 0

    def on_validation_epoch_end(self) -> None:
        self._log_eval_epoch("val")

    def on_test_epoch_end(self) -> None:
        self._log_eval_epoch("test")

    def _eval_step(self, batch: dict[str, Tensor], stage: str) -> None:
        out = self.compute(batch, stage)
        n = batch_size_of(batch)
        for key, value in out.items():
            self._eval_sums[key] = self._eval_sums.get(key, 0.0) + value.detach().float() * n
        self._eval_rows += n

    def _log_eval_epoch(self, stage: str) -> None:
        """Batch-size-weighted means over every rank. The sums are all-reduced here, so the values logged
        are already global (every rank serves the same number of batches, so every rank reaches this
        collective; see data_pipeline.loader)."""
        if not self._eval_sums:
            return
        keys = sorted(self._eval_sums)
        local = torch.stack(
            [self._eval_sums[k] for k in keys] + [torch.tensor(float(self._eval_rows))]
        ).to(self.device)
        total = self.trainer.strategy.reduce(local, reduce_op="sum")
        means = {k: total[i] / total[-1] for i, k in enumerate(keys)}
        for ppl_key, loss_key in self.PERPLEXITY_OF.items():
            if ppl_key in means and loss_key in means:
                means[ppl_key] = torch.exp(means[loss_key])
        for key, value in means.items():
            self.log(f"{stage}/{key}", value, prog_bar=key in self.PROG_BAR, sync_dist=False)


class BertPretrainModule(KilnModule):
    """MLM + NSP on `mlm_nsp` batches; the MLM head runs only at the masked positions."""

    PERPLEXITY_OF: ClassVar[dict[str, str]] = {"ppl": "mlm_loss"}
    PROG_BAR: ClassVar[tuple[str, ...]] = ("loss", "mlm_acc")
    BATCH_KEYS: ClassVar[tuple[str, ...]] = (
        "input_ids",
        "token_type_ids",
        "attention_mask",
        "mlm_labels",
        "next_sentence_label",
    )

    def __init__(
        self,
        model_cfg: BertConfig,
        optim_cfg: OptimConfig,
        total_steps: int,
        deferred: bool = False,
        nsp_weight: float = 1.0,
    ) -> None:
        """deferred: build the model in `configure_model` (under ZeRO-3's zero.Init), not here. nsp_weight: the
        NSP loss's weight in `loss` (the job's `nsp_weight`); at 0 NSP is still computed and logged."""
        if not (math.isfinite(nsp_weight) and nsp_weight >= 0):
            raise ValueError(f"nsp_weight must be finite and >= 0, got {nsp_weight}")
        model = (
            (lambda: BertForPreTraining(model_cfg)) if deferred else BertForPreTraining(model_cfg)
        )
        super().__init__(model, optim_cfg, total_steps)
        self.model_cfg = model_cfg
        self.nsp_weight = nsp_weight

    def compute(self, batch: dict[str, Tensor], stage: str) -> dict[str, Tensor]:
        require_keys(batch, self.BATCH_KEYS, "BertPretrainModule")
        positions = masked_positions_from_labels(batch["mlm_labels"])
        out = self.model(
            batch["input_ids"],
            token_type_ids=batch["token_type_ids"],
            attention_mask=batch["attention_mask"],
            masked_positions=positions,
        )
        metrics = mlm_nsp_loss(
            out,
            batch["mlm_labels"],
            batch["next_sentence_label"],
            masked_positions=positions,
            nsp_weight=self.nsp_weight,
        )
        metrics["ppl"] = metrics.pop("mlm_ppl")
        return metrics

    def flops_per_token(self, batch: dict[str, Tensor]) -> float | None:
        tokens = int(batch["attention_mask"].sum())
        masked = int((batch["mlm_labels"] != -100).sum())
        fraction = min(
            1.0, masked / max(tokens, 1)
        )  # a label on padding would be a data bug, not a reason to stop
        return encoder_flops_per_token(self.model_cfg, batch["input_ids"].size(1), fraction)


class GPTPretrainModule(KilnModule):
    """Causal LM on `clm` batches (labels already shifted by the loader)."""

    PROG_BAR: ClassVar[tuple[str, ...]] = ("loss", "acc")

    def __init__(
        self, model_cfg: GPTConfig, optim_cfg: OptimConfig, total_steps: int, deferred: bool = False
    ) -> None:
        """deferred: build the model in `configure_model` (under ZeRO-3's zero.Init), not here."""
        model = (lambda: GPTLMHeadModel(model_cfg)) if deferred else GPTLMHeadModel(model_cfg)
        super().__init__(model, optim_cfg, total_steps)
        self.model_cfg = model_cfg

    def compute(self, batch: dict[str, Tensor], stage: str) -> dict[str, Tensor]:
        require_keys(batch, ("input_ids", "labels"), "GPTPretrainModule")
        # The head's logits are (B, T, V), for GPT-2's vocabulary 16 x 128 x 50257 fp32 = 412 MB written, softmaxed
        # and differentiated whole; the fused loss takes them 512 rows at a time (benchmarks/pretrain_throughput.py).
        fused = fused_clm_applies(self.model.lm_head.weight)
        out, _ = self.model(
            batch["input_ids"],
            position_ids=batch.get("position_ids"),
            document_mask=batch.get("document_mask"),
            return_hidden=fused,
        )
        if fused:
            return fused_clm_loss(out, self.model.lm_head.weight, batch["labels"])
        return clm_loss(out, batch["labels"])

    def flops_per_token(self, batch: dict[str, Tensor]) -> float | None:
        return decoder_flops_per_token(self.model_cfg, batch["input_ids"].size(1))
