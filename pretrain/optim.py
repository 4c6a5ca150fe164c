"""AdamW with BERT/GPT-2 weight-decay groups and a per-step warmup-then-decay learning-rate schedule."""

from __future__ import annotations

import math
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from data_pipeline.configlib import check_fields

# torch is imported where the optimizer is built: cluster.jobs reads OptimConfig, and a config error
# must not cost a torch import (cluster/cli.py).
if TYPE_CHECKING:
    from torch import nn
    from torch.optim import Optimizer
    from torch.optim.lr_scheduler import LRScheduler


def _linear(progress: float) -> float:
    return 1.0 - progress


def _cosine(progress: float) -> float:
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def _constant(progress: float) -> float:
    return 1.0


# Shape of the decay after warmup, as a function of progress in [0, 1] through the decay phase; one
# per name of Schedule.
Schedule = Literal["linear", "cosine", "constant"]
SCHEDULES: dict[str, Callable[[float], float]] = {
    "linear": _linear,
    "cosine": _cosine,
    "constant": _constant,
}


@dataclass
class OptimConfig:
    lr: float = 5e-4
    weight_decay: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    warmup_steps: int = 100
    schedule: Schedule = "linear"
    min_lr_ratio: float = 0.0  # the decay ends at lr * min_lr_ratio
    grad_clip: float = (
        1.0  # applied by the Trainer (gradient_clip_val), never inside a module; 0 = off
    )
    # Fine-tuning: parameters loaded from a pretrained checkpoint train at lr * this, the new ones (a head,
    # cross-attention) at lr. 0 freezes the pretrained ones. A job without pretrained parameters must leave it at 1.
    pretrained_lr_ratio: float = 1.0

    def __post_init__(self) -> None:
        check_fields(self)
        if not self.lr > 0:
            raise ValueError(f"OptimConfig.lr must be > 0, got {self.lr}")
        if self.weight_decay < 0:
            raise ValueError(f"OptimConfig.weight_decay must be >= 0, got {self.weight_decay}")
        for key in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, key) < 1.0:
                raise ValueError(f"OptimConfig.{key} must be in [0, 1), got {getattr(self, key)}")
        if self.warmup_steps < 0:
            raise ValueError(f"OptimConfig.warmup_steps must be >= 0, got {self.warmup_steps}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"OptimConfig.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.grad_clip < 0:
            raise ValueError(f"OptimConfig.grad_clip must be >= 0, got {self.grad_clip}")
        if not (math.isfinite(self.pretrained_lr_ratio) and self.pretrained_lr_ratio >= 0):
            raise ValueError(
                "OptimConfig.pretrained_lr_ratio must be finite and >= 0 (0 freezes the pretrained "
                f"parameters), got {self.pretrained_lr_ratio}"
            )


@dataclass
class WarmupDecay:
    """lr multiplier at optimizer step `step` (0-based). A plain object rather than a lambda so that
    LambdaLR.state_dict() records it (as its __dict__) and a checkpoint stays loadable with weights_only."""

    warmup_steps: int
    total_steps: int
    schedule: str
    min_lr_ratio: float

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            # (step + 1) / warmup: the very first update already moves (HF's step / warmup wastes it at lr 0),
            # and the peak is reached on the last warmup step.
            return (step + 1) / self.warmup_steps
        decay_steps = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / decay_steps)
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * SCHEDULES[self.schedule](progress)


def param_groups(
    model: nn.Module,
    weight_decay: float,
    pretrained: Collection[str] = frozenset(),
    pretrained_lr: float | None = None,
) -> list[dict]:
    """Decay every matrix (linear weights and embeddings, as BERT and GPT-2); no decay on biases and
    LayerNorm weights (the 1-D parameters). Tied matrices appear once (named_parameters de-duplicates).

    With `pretrained_lr`, the parameters named in `pretrained` get decay / no-decay groups of their own at that
    learning rate, after the groups at the optimizer's lr (so group 0, which train/lr reports, stays at optim.lr);
    at 0 they are left out. Without it the groups are the two above, whatever `pretrained` holds."""
    split = pretrained_lr is not None
    buckets: dict[tuple[bool, bool], list[nn.Parameter]] = {
        (old, matrix): [] for old in (False, True) for matrix in (True, False)
    }
    for name, p in model.named_parameters():
        old = split and name in pretrained
        if not p.requires_grad or (old and pretrained_lr == 0):
            continue
        # A ZeRO-3 partition (built under zero.Init) is a flat (0,)-shaped tensor; `ds_shape` is its real shape.
        buckets[old, len(getattr(p, "ds_shape", p.shape)) >= 2].append(p)
    groups = [
        {"params": buckets[False, True], "weight_decay": weight_decay},
        {"params": buckets[False, False], "weight_decay": 0.0},
        {"params": buckets[True, True], "weight_decay": weight_decay, "lr": pretrained_lr},
        {"params": buckets[True, False], "weight_decay": 0.0, "lr": pretrained_lr},
    ]
    return [g for g in groups if g["params"]]


def freeze_pretrained(model: nn.Module, cfg: OptimConfig, pretrained: Collection[str]) -> None:
    """At pretrained_lr_ratio 0, no gradient for the parameters named in `pretrained` (requires_grad False), so
    no backward work or optimizer state is spent on them. Call it before a strategy wraps the model: DDP
    (find_unused_parameters=False) expects a gradient for every parameter that required one when it wrapped
    the model, and fails on the next step when one never comes."""
    if cfg.pretrained_lr_ratio == 0:
        for name, p in model.named_parameters():
            if name in pretrained:
                p.requires_grad_(False)


def build_optimizer(
    model: nn.Module, cfg: OptimConfig, total_steps: int, pretrained: Collection[str] = frozenset()
) -> tuple[Optimizer, LRScheduler]:
    """AdamW + a LambdaLR to be stepped once per optimizer step (Lightning: interval "step"). `pretrained`: the
    names of the parameters loaded from a checkpoint, trained at lr * cfg.pretrained_lr_ratio; the schedule
    scales every group's own initial lr, so the ratio holds at every step."""
    from torch.optim import AdamW
    from torch.optim.lr_scheduler import LambdaLR

    if total_steps <= 0:
        raise ValueError(f"total_steps must be > 0, got {total_steps}")
    if cfg.pretrained_lr_ratio != 1 and not pretrained:
        # cluster.jobs refuses this in a job's config; here for models built in Python (benchmarks, tests)
        raise ValueError(
            f"optim.pretrained_lr_ratio is {cfg.pretrained_lr_ratio}, but no parameter is named pretrained"
        )
    # At ratio 1 the groups are exactly those of a model without pretrained parameters.
    pretrained_lr = None if cfg.pretrained_lr_ratio == 1 else cfg.lr * cfg.pretrained_lr_ratio
    groups = param_groups(model, cfg.weight_decay, pretrained, pretrained_lr)
    optimizer = AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
    scheduler = LambdaLR(
        optimizer, WarmupDecay(cfg.warmup_steps, total_steps, cfg.schedule, cfg.min_lr_ratio)
    )
    return optimizer, scheduler
