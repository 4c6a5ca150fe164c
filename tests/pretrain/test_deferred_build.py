"""A deferred model (what ZeRO-3 uses, see KilnModule.configure_model) is built by Lightning's configure_model hook
with exactly the weights an eager build would have drawn, and leaves the training RNG untouched. Without DeepSpeed:
the partitioned build itself is tested in tests/cluster/test_zero3_init.py."""

from __future__ import annotations

import pytest
import torch
from test_pretrain_module import clm_batches, fit, mlm_nsp_batches

from data_pipeline.configlib import from_preset
from pretrain.models.bert import BertConfig
from pretrain.models.gpt import GPTConfig
from pretrain.module import BertPretrainModule, GPTPretrainModule, KilnModule
from pretrain.optim import OptimConfig

V = 48


def _module(family: str, deferred: bool) -> KilnModule:
    if family == "gpt":
        return GPTPretrainModule(
            from_preset(GPTConfig, "tiny", vocab_size=V),
            OptimConfig(warmup_steps=1),
            5,
            deferred=deferred,
        )
    return BertPretrainModule(
        from_preset(BertConfig, "tiny", vocab_size=V),
        OptimConfig(warmup_steps=1),
        5,
        deferred=deferred,
    )


@pytest.mark.parametrize("family", ["bert", "gpt"])
def test_deferred_build_draws_the_eager_weights_and_keeps_the_rng(family: str) -> None:
    torch.manual_seed(0)
    eager = _module(family, deferred=False).model.state_dict()

    torch.manual_seed(0)
    module = _module(family, deferred=True)
    assert module.model is None
    torch.rand(
        3
    )  # the training stream moves on (Lightning re-seeds, loaders draw) before configure_model runs
    rng = torch.get_rng_state()
    module.configure_model()
    assert torch.equal(torch.get_rng_state(), rng)
    built = module.model.state_dict()
    assert built.keys() == eager.keys()
    for key, value in eager.items():
        assert torch.equal(built[key], value), key

    model = module.model
    module.configure_model()  # Lightning calls it on every fit; the model is built once
    assert module.model is model


def test_an_eager_module_is_left_alone() -> None:
    module = _module("gpt", deferred=False)
    model = module.model
    module.configure_model()
    assert module.model is model


@pytest.mark.parametrize("family", ["bert", "gpt"])
def test_a_deferred_module_trains(family: str) -> None:
    """Lightning builds it (configure_model) before it asks for the optimizer over its parameters."""
    torch.manual_seed(0)
    module = _module(family, deferred=True)
    batches = mlm_nsp_batches(5, seed=1) if family == "bert" else clm_batches(5, seed=1)
    trainer = fit(module, batches, batches[:1])
    assert trainer.global_step == 5
    assert module.model is not None and torch.isfinite(trainer.callback_metrics["train/loss"])
