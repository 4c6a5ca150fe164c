"""AdamW with BERT/GPT-2 weight-decay groups and a per-step warmup-then-decay learning-rate schedule."""

from __future__ import annotations

import math
from collections.abc import Callable
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


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay every matrix (linear weights and embeddings, as BERT and GPT-2); no decay on biases and
    LayerNorm weights (the 1-D parameters). Tied matrices appear once (named_parameters de-duplicates)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            # A ZeRO-3 partition (built under zero.Init) is a flat (0,)-shaped tensor; `ds_shape` is its real shape.
            (decay if len(getattr(p, "ds_shape", p.shape)) >= 2 else no_decay).append(p)
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


def build_optimizer(
    model: nn.Module, cfg: OptimConfig, total_steps: int
) -> tuple[Optimizer, LRScheduler]:
    """AdamW + a LambdaLR to be stepped once per optimizer step (Lightning: interval "step")."""
    from torch.optim import AdamW
    from torch.optim.lr_scheduler import LambdaLR

    if total_steps <= 0:
        raise ValueError(f"total_steps must be > 0, got {total_steps}")
    optimizer = AdamW(
        param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps
    )
    scheduler = LambdaLR(
        optimizer, WarmupDecay(cfg.warmup_steps, total_steps, cfg.schedule, cfg.min_lr_ratio)
    )
    return optimizer, scheduler
