"""Scheduled sampling (finetune/scheduled_sampling.py, TranslationModule): the schedules' values, the mixed decoder
inputs, p = 0 being exactly teacher forcing, the config keys, the logged p under a Trainer, and learning with it on."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
from finetune_testlib import BOS, PAD, VOCAB, reversal_batch, tiny_seq2seq
from torch import Tensor, nn
from torch.utils.data import DataLoader

from cluster.config import load_config
from cluster.jobs import FinetuneJob
from data_pipeline.configlib import ConfigError
from finetune.models.rnn import RNNSeq2Seq
from finetune.models.transformer import TransformerSeq2Seq
from finetune.module import TranslationModule, translation_loss
from finetune.scheduled_sampling import ScheduledSampling, _inverse_sigmoid_k, mix_decoder_inputs
from pretrain.optim import OptimConfig


def transformer() -> TransformerSeq2Seq:
    return tiny_seq2seq("transformer", dropout=0.0).train()


def lstm_attention() -> RNNSeq2Seq:
    return tiny_seq2seq("lstm_attention", attention="bahdanau", num_layers=2, dropout=0.0).train()


def module_for(
    model: nn.Module, max_prob: float, schedule: str = "linear", ramp: int = 10
) -> TranslationModule:
    return TranslationModule(
        model,
        OptimConfig(lr=3e-3, warmup_steps=0, weight_decay=0.0),
        total_steps=100,
        scheduled_sampling=ScheduledSampling(max_prob, schedule, ramp),
    )


class Recorder(nn.Module):
    """Passes through to `model`, keeping every decoder input and every logits it was given / gave."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.inputs: list[Tensor] = []
        self.outputs: list[Tensor] = []

    def forward(self, src_ids: Tensor, src_mask: Tensor, tgt_in: Tensor) -> Tensor:
        self.inputs.append(tgt_in.clone())
        self.outputs.append(self.model(src_ids, src_mask, tgt_in).detach())
        return self.model(src_ids, src_mask, tgt_in)


# ---------------------------------------------------------------- schedules
def test_linear_schedule_values() -> None:
    s = ScheduledSampling(0.25, "linear", 1000)
    assert [s.probability(step) for step in (0, 250, 500, 1000, 5000)] == [
        0.0,
        0.0625,
        0.125,
        0.25,
        0.25,
    ]


def test_inverse_sigmoid_schedule_values() -> None:
    s = ScheduledSampling(0.5, "inverse_sigmoid", 1000)
    k = _inverse_sigmoid_k(1000)
    assert k * math.log(k) == pytest.approx(
        500.0, rel=1e-9
    )  # Bengio et al.'s k, midpoint at ramp / 2
    assert 106 < k < 108
    assert s.probability(500) == pytest.approx(0.25, rel=1e-9)  # half the maximum at half the ramp
    assert s.probability(0) == pytest.approx(0.5 / (k + 1), rel=1e-9)  # 1 - k / (k + e^0)
    assert s.probability(1000) == pytest.approx(0.5 * k / (k + 1), rel=1e-9)  # e^(1000/k) = k^2
    values = [s.probability(step) for step in range(0, 3001, 100)]
    assert all(a < b for a, b in zip(values, values[1:], strict=False))
    assert values[-1] < 0.5 and s.probability(10**7) == pytest.approx(
        0.5
    )  # no overflow far past the ramp


def test_schedule_arguments_are_checked() -> None:
    with pytest.raises(ValueError, match="scheduled_sampling must be in"):
        ScheduledSampling(1.5)
    with pytest.raises(ConfigError, match=r"ScheduledSampling.schedule must be one of .*'cosine'"):
        ScheduledSampling(0.5, "cosine")
    with pytest.raises(ConfigError, match="did you mean 'linear'"):
        ScheduledSampling(0.5, "lineer")
    with pytest.raises(ValueError, match="scheduled_sampling_steps"):
        ScheduledSampling(0.5, "linear", 0)


# ---------------------------------------------------------------- mixing
def test_mixing_never_touches_bos_or_padding_and_follows_the_seed() -> None:
    batch, _ = reversal_batch(200, seed=1)
    predicted = torch.randint(7, VOCAB, batch["tgt_in"].shape)
    torch.manual_seed(3)
    mixed = mix_decoder_inputs(batch["tgt_in"], batch["tgt_out"], predicted, 0.5)
    torch.manual_seed(3)
    assert torch.equal(mixed, mix_decoder_inputs(batch["tgt_in"], batch["tgt_out"], predicted, 0.5))
    real = batch["tgt_out"] != -100
    assert torch.equal(mixed[:, 0], batch["tgt_in"][:, 0]) and bool((mixed[:, 0] == BOS).all())
    assert torch.equal(mixed[~real], batch["tgt_in"][~real]) and bool((mixed[~real] == PAD).all())
    changed = (mixed != batch["tgt_in"])[:, 1:]
    from_prediction = mixed[:, 1:] == predicted[:, :-1]
    assert bool(from_prediction[changed].all())
    share = float(changed.sum()) / float(real[:, 1:].sum())
    assert 0.4 < share < 0.6  # ~0.5, less the few predictions that equal the gold token


def test_p0_is_exactly_teacher_forcing() -> None:
    batch, _ = reversal_batch(8, seed=0)
    for max_prob, step in (
        (0.0, 5),
        (0.8, 0),
    ):  # off, and on but at the linear schedule's first step
        module = module_for(transformer(), max_prob)
        module.manual_step = step
        rng = torch.get_rng_state()
        out = module.compute(batch, "train")
        assert torch.equal(
            torch.get_rng_state(), rng
        )  # no first pass, no draw: a resumed run stays in step
        expected = translation_loss(
            module.model(batch["src_ids"], batch["src_mask"], batch["tgt_in"]),
            batch["tgt_out"],
            0.1,
        )
        assert torch.equal(out["loss"], expected["loss"])
        assert float(out["sampling_prob"]) == 0.0


def test_p1_feeds_the_first_pass_argmax_shifted() -> None:
    batch, _ = reversal_batch(8, seed=0)
    recorder = Recorder(lstm_attention())
    module = module_for(recorder, 1.0, ramp=1)
    module.manual_step = 1
    out = module.compute(batch, "train")
    assert float(out["sampling_prob"]) == 1.0
    assert len(recorder.inputs) == 2 and torch.equal(recorder.inputs[0], batch["tgt_in"])
    predicted = recorder.outputs[0].argmax(dim=-1)  # (B,U)
    real = batch["tgt_out"] != -100
    expected = batch["tgt_in"].clone()
    expected[:, 1:] = torch.where(real[:, 1:], predicted[:, :-1], batch["tgt_in"][:, 1:])
    assert torch.equal(recorder.inputs[1], expected)
    assert bool((recorder.inputs[1][~real] == PAD).all())
    loss = translation_loss(recorder.outputs[1], batch["tgt_out"], 0.1)[
        "loss"
    ]  # against the gold targets
    assert float(out["loss"].detach()) == pytest.approx(float(loss), rel=1e-6)


def test_evaluation_stays_teacher_forced() -> None:
    batch, _ = reversal_batch(8, seed=0)
    recorder = Recorder(transformer())
    module = module_for(recorder, 1.0, ramp=1)
    module.manual_step = 5
    out = module.compute(batch, "val")
    assert len(recorder.inputs) == 1 and "sampling_prob" not in out


# ---------------------------------------------------------------- config
@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("scheduled_sampling=1.5", "'scheduled_sampling'"),
        ("scheduled_sampling_schedule=cosine", "'scheduled_sampling_schedule'"),
        ("scheduled_sampling_steps=-1", "'scheduled_sampling_steps'"),
        ("scheduled_sampling_stepz=10", "did you mean 'scheduled_sampling_steps'"),
    ],
)
def test_config_errors_name_the_key(override: str, key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        load_config(FinetuneJob, None, [override])


def test_config_builds_the_schedule() -> None:
    assert load_config(FinetuneJob, None, []).sampling_schedule() is None  # off by default
    job = load_config(FinetuneJob, None, ["scheduled_sampling=0.3", "trainer.max_steps=400"])
    assert job.sampling_schedule() == ScheduledSampling(
        0.3, "linear", 400
    )  # ramp 0 = the whole run
    job = load_config(
        FinetuneJob,
        None,
        [
            "scheduled_sampling=0.3",
            "scheduled_sampling_schedule=inverse_sigmoid",
            "scheduled_sampling_steps=50",
        ],
    )
    assert job.sampling_schedule() == ScheduledSampling(0.3, "inverse_sigmoid", 50)
    with pytest.raises(ConfigError, match="'scheduled_sampling': applies to translation only"):
        load_config(FinetuneJob, None, ["task=classification", "scheduled_sampling=0.3"])


# ---------------------------------------------------------------- training
def test_lightning_logs_p_from_the_trainers_step() -> None:
    batch, _ = reversal_batch(8, seed=0)
    module = module_for(transformer(), 0.8, ramp=8)
    trainer = L.Trainer(
        max_steps=5,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
    )
    trainer.fit(module, train_dataloaders=DataLoader([batch] * 5, batch_size=None))
    # the last step ran at global_step 4: 0.8 * 4 / 8
    assert float(trainer.callback_metrics["train/sampling_prob"]) == pytest.approx(0.4)


# the LSTM takes ~100 steps even teacher forced (measured: loss 2.85 -> 0.85), the Transformer fewer
@pytest.mark.parametrize(
    ("make_model", "steps"),
    [(transformer, 60), (lstm_attention, 120)],
    ids=["transformer", "lstm_attention"],
)
def test_still_learns_with_scheduled_sampling(make_model: type, steps: int) -> None:
    batch, _ = reversal_batch(50, seed=0)
    module = module_for(make_model(), 0.5, "inverse_sigmoid", ramp=steps // 2)
    optimizer = module.configure_optimizers()["optimizer"]
    first = float(module.compute(batch, "val")["loss"].detach())
    for step in range(steps):
        module.manual_step = step
        out = module.compute(batch, "train")
        optimizer.zero_grad()
        out["loss"].backward()
        torch.nn.utils.clip_grad_norm_(module.model.parameters(), 1.0)
        optimizer.step()
    assert float(out["sampling_prob"]) > 0.3  # late in the run most of the maximum is reached
    last = float(module.compute(batch, "val")["loss"].detach())
    assert last < 0.5 * first, (first, last)
