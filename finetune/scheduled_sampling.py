"""Scheduled sampling for every translation architecture: the schedule of the sampling probability p and the
decoder inputs it mixes. `TranslationModule` (finetune/module.py) runs the two passes.

Teacher forcing trains the decoder only on gold prefixes, while at inference it reads its own outputs (exposure
bias). Scheduled sampling (Bengio et al., 2015) feeds the model's own predictions for a growing share p of the
decoder inputs. Bengio et al. decode step by step, which a Transformer or ConvS2S decoder trained in parallel cannot
do cheaply; Kiln uses the two-pass form of Mihaylova & Liu (2019, "Scheduled Sampling for Transformers"), which
needs nothing from a model but its teacher-forced `forward`, so the LSTMs, ConvS2S and both Transformers share it:

  1. a teacher-forced pass without gradients gives the model's prediction (argmax) at every position;
  2. every decoder input after [BOS] is replaced, with probability p, by the prediction made for it; padding and
     [BOS] never are;
  3. a second pass on the mixed inputs gives the loss against the gold targets, as usual.

p rises over training steps, from 0 to a maximum, along one of `SAMPLING_SCHEDULES`. This file is pure torch
(no Lightning) so the config code can import it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from data_pipeline.configlib import check_fields

IGNORE_INDEX = -100  # tgt_out at padding (docs/design.md)


def _linear(step: int, ramp: int) -> float:
    """0 at step 0, rising in a straight line to 1 at `ramp` (Bengio et al.'s linear decay of 1 - p)."""
    return min(1.0, step / ramp)


def _inverse_sigmoid_k(ramp: int) -> float:
    """Bengio et al.'s k for a curve whose midpoint is at ramp / 2: the k >= 1 with k ln k = ramp / 2 (bisection:
    k ln k is increasing for k >= 1, and k = ramp + 2 is always past the root)."""
    low, high = 1.0, ramp + 2.0
    for _ in range(60):
        mid = (low + high) / 2
        low, high = (mid, high) if mid * math.log(mid) < ramp / 2 else (low, mid)
    return (low + high) / 2


def _inverse_sigmoid(step: int, ramp: int) -> float:
    """1 - k / (k + exp(step / k)) (Bengio et al. 2015's teacher-forcing probability, inverted), with k chosen so
    that it is 1/2 at ramp / 2; at `ramp` it is k / (k + 1), and it approaches 1 after."""
    k = _inverse_sigmoid_k(ramp)
    return 1.0 - k / (k + math.exp(min(step / k, 700.0)))  # exp overflows a float past ~709


# The schedules by name; cluster.jobs.SamplingSchedule spells them again for the job config,
# which cannot import this module (torch).
SamplingSchedule = Literal["linear", "inverse_sigmoid"]
# schedule name -> fraction of the maximum probability reached at (step, ramp steps)
SAMPLING_SCHEDULES: dict[SamplingSchedule, Callable[[int, int], float]] = {
    "linear": _linear,
    "inverse_sigmoid": _inverse_sigmoid,
}


@dataclass(frozen=True)
class ScheduledSampling:
    """p(step) = max_prob × SAMPLING_SCHEDULES[schedule](step, ramp_steps). Both schedules pass max_prob / 2 at
    ramp_steps / 2; linear reaches max_prob at ramp_steps."""

    max_prob: float
    schedule: SamplingSchedule = "linear"
    ramp_steps: int = 1000

    def __post_init__(self) -> None:
        check_fields(self)  # types and the schedule's name (ConfigError, with did-you-mean)
        if not 0.0 <= self.max_prob <= 1.0:
            raise ValueError(f"scheduled_sampling must be in [0, 1], got {self.max_prob}")
        if self.ramp_steps < 1:
            raise ValueError(f"scheduled_sampling_steps must be >= 1, got {self.ramp_steps}")

    def probability(self, step: int) -> float:
        return self.max_prob * SAMPLING_SCHEDULES[self.schedule](max(step, 0), self.ramp_steps)


def mix_decoder_inputs(tgt_in: Tensor, tgt_out: Tensor, predicted: Tensor, prob: float) -> Tensor:
    """The decoder inputs of the second pass: tgt_in (B,U) (`[BOS] y`, padded) with each real position t >= 1
    replaced, with probability `prob`, by predicted[:, t-1] (B,U) — the first pass's guess for exactly that token,
    since the logits at t-1 predict tgt_out[:, t-1] = tgt_in[:, t]. [BOS] and padding (where tgt_out is -100: the
    two have the same real positions) are never replaced. The draw uses torch's global RNG, which Kiln checkpoints
    per rank, so a resumed run draws the same replacements."""
    real = tgt_out[:, 1:] != IGNORE_INDEX  # (B,U-1): tgt_in[:, t] is real iff tgt_out[:, t] is
    replace = real & (
        torch.rand(real.shape, device=tgt_in.device) < prob
    )  # rand is in [0, 1): prob 1 takes all
    mixed = tgt_in.clone()
    mixed[:, 1:] = torch.where(replace, predicted[:, :-1].to(tgt_in.dtype), tgt_in[:, 1:])
    return mixed
