"""Build a model without allocating its weights, then materialise and initialise it (torchtitan's pattern).

A ZeRO-3 rank should never hold a full copy of a large model just to initialise it: the model is built
on the `meta` device (shapes only), the strategy decides where each shard lives, and `init_weights()`
fills the real storage in place.

    model = build_on_meta(BertForPreTraining, cfg)   # no memory allocated
    materialize(model, "cpu")                          # to_empty + init_weights (re-ties shared matrices)
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import torch
from torch import nn

M = TypeVar("M", bound=nn.Module)

# The constructors' initialisers. On the meta device they change nothing, yet the first one called there
# imports torch._dynamo (2 s of a command's start-up on a 2 GHz core), so build_on_meta skips them
# (transformers' no_init_weights does the same).
_INIT_FUNCTIONS = (
    "normal_",
    "uniform_",
    "trunc_normal_",
    "constant_",
    "zeros_",
    "ones_",
    "xavier_uniform_",
    "xavier_normal_",
    "kaiming_uniform_",
    "kaiming_normal_",
    "orthogonal_",
)


@contextmanager
def _skip_init() -> Iterator[None]:
    saved = {name: getattr(nn.init, name) for name in _INIT_FUNCTIONS}
    try:
        for name in _INIT_FUNCTIONS:
            setattr(nn.init, name, lambda tensor, *args, **kwargs: tensor)
        yield
    finally:
        for name, fn in saved.items():
            setattr(nn.init, name, fn)


def build_on_meta(cls: type[M], config: Any) -> M:
    """`cls(config)` with every parameter on the meta device, its initialisers skipped (no values there)."""
    with torch.device("meta"), _skip_init():
        return cls(config)


def materialize(model: M, device: torch.device | str = "cpu") -> M:
    """Allocate uninitialised storage on `device`, then let the model initialise itself.

    `to_empty` replaces each meta parameter with a new one, which unties shared matrices; the models'
    `init_weights()` re-ties them before initialising, so the tie survives."""
    if not hasattr(model, "init_weights"):
        raise TypeError(
            f"{type(model).__name__} has no init_weights(); it cannot be built on the meta device"
        )
    model.to_empty(device=device)
    model.init_weights()  # type: ignore[operator]
    return model


def num_parameters(model: nn.Module) -> int:
    """Unique parameters (a tied matrix counted once)."""
    return sum(p.numel() for p in model.parameters())
