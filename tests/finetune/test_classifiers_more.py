"""DecoderClassifier (GPT, last real token) and LSTMClassifier (biLSTM, max+mean pooling): configs, padding
invariance, warm start from a GPT checkpoint, meta build + checkpoint round trip, learning a separable set."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import torch
from finetune_testlib import (
    PAD,
    VOCAB,
    Pretrained,
    digit_id,
    fit_separable_set,
    gpt_config,
    separable_set,
)

from data_pipeline.configlib import from_dict, from_preset
from finetune.evaluate import accuracy, predict_labels
from finetune.models import ARCHITECTURES
from finetune.models.classifier import (
    DecoderClassifier,
    GPTClassifierConfig,
    LSTMClassifier,
    LSTMClassifierConfig,
)
from pretrain.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from pretrain.models.meta import build_on_meta, materialize
from pretrain.optim import OptimConfig


def lstm_config(**overrides: Any) -> LSTMClassifierConfig:
    base = dict(vocab_size=VOCAB, num_labels=3, dropout=0.0)
    return from_preset(LSTMClassifierConfig, "tiny", **{**base, **overrides})


def make_gpt(seed: int = 0) -> DecoderClassifier:
    torch.manual_seed(seed)
    return DecoderClassifier(GPTClassifierConfig(decoder=gpt_config(), num_labels=3)).eval()


def make_lstm(seed: int = 0, **overrides: Any) -> LSTMClassifier:
    torch.manual_seed(seed)
    return LSTMClassifier(lstm_config(**overrides)).eval()


def test_gpt_classifier_config_round_trip_and_errors() -> None:
    cfg = GPTClassifierConfig(decoder=gpt_config(), num_labels=3, label_names=["a", "b", "c"])
    assert from_dict(GPTClassifierConfig, dataclasses.asdict(cfg)) == cfg
    with pytest.raises(
        ValueError, match=r"GPTClassifierConfig.decoder: unknown key\(s\) \['n_embed'\]"
    ):
        from_dict(GPTClassifierConfig, {**dataclasses.asdict(cfg), "decoder": {"n_embed": 3}})
    with pytest.raises(ValueError, match="GPTClassifierConfig.arch must be 'gpt_classifier'"):
        GPTClassifierConfig(arch="bert_classifier", decoder=gpt_config())
    with pytest.raises(ValueError, match="add_cross_attention must be False"):
        GPTClassifierConfig(decoder=gpt_config(add_cross_attention=True))
    with pytest.raises(
        ValueError, match="GPTClassifierConfig.label_names has 2 names for num_labels=3"
    ):
        GPTClassifierConfig(decoder=gpt_config(), num_labels=3, label_names=["a", "b"])
    with pytest.raises(
        ValueError, match=r"GPTClassifierConfig.classifier_dropout must be in \[0, 1\)"
    ):
        GPTClassifierConfig(decoder=gpt_config(), classifier_dropout=1.0)


def test_lstm_classifier_config_round_trip_and_errors() -> None:
    cfg = lstm_config(label_names=["a", "b", "c"])
    assert from_dict(LSTMClassifierConfig, dataclasses.asdict(cfg)) == cfg
    assert (cfg.preset, cfg.embedding_dim, cfg.hidden_size) == ("tiny", 32, 32)
    with pytest.raises(ValueError, match=r"LSTMClassifierConfig: unknown key\(s\) \['hidden'\]"):
        from_dict(LSTMClassifierConfig, {**dataclasses.asdict(cfg), "hidden": 3})
    with pytest.raises(ValueError, match=r"unknown preset 'huge'"):
        from_preset(LSTMClassifierConfig, "huge")
    with pytest.raises(ValueError, match="LSTMClassifierConfig.num_labels must be >= 2"):
        lstm_config(num_labels=1)
    with pytest.raises(
        ValueError, match=r"LSTMClassifierConfig.pad_id must be in \[0, vocab_size=17\)"
    ):
        lstm_config(pad_id=17)
    with pytest.raises(ValueError, match=r"LSTMClassifierConfig.dropout must be in \[0, 1\)"):
        lstm_config(dropout=-0.1)


def with_junk_padding(b: dict[str, torch.Tensor], extra: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The same rows with `extra` more padded columns, and junk token ids at every padded position."""
    ids = torch.cat([b["input_ids"], torch.full((b["input_ids"].size(0), extra), PAD)], dim=1)
    mask = torch.cat(
        [b["attention_mask"], torch.zeros(ids.size(0), extra, dtype=torch.long)], dim=1
    )
    return ids.masked_fill(mask == 0, digit_id(4)), mask


def test_gpt_classifier_reads_the_hidden_state_of_the_last_real_token() -> None:
    model = make_gpt()
    b = separable_set(6, seed=3)
    with torch.no_grad():
        logits = model(b["input_ids"], b["attention_mask"])  # (B,3)
        lengths = b["attention_mask"].sum(dim=1).tolist()
        for i, n in enumerate(lengths):
            hidden, _ = model.transformer(
                b["input_ids"][i : i + 1, :n]
            )  # the row alone, unpadded (1,n,C)
            torch.testing.assert_close(logits[i], model.score(hidden[0, -1]), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model(*with_junk_padding(b, 3)), logits, atol=1e-5, rtol=1e-5)
        full_rows = b["input_ids"][
            :, :3
        ]  # a mask of all ones reads the last column, as no mask does
        torch.testing.assert_close(
            model(full_rows, torch.ones_like(full_rows)), model(full_rows), atol=0, rtol=0
        )
    assert len(set(lengths)) > 1  # the rows really have different last positions


@pytest.mark.parametrize("make", [make_gpt, make_lstm])
def test_masks_must_be_right_padded(make: Any) -> None:
    b = separable_set(3, seed=3)
    left = b["attention_mask"].flip(1)
    with pytest.raises(ValueError, match="attention_mask must be right-padded"):
        make()(b["input_ids"], left)


def test_lstm_classifier_padding_never_changes_a_result() -> None:
    model = make_lstm(num_layers=2)
    b = separable_set(6, seed=3)
    with torch.no_grad():
        logits = model(b["input_ids"], b["attention_mask"])
        for i, n in enumerate(b["attention_mask"].sum(dim=1).tolist()):
            alone = model(b["input_ids"][i : i + 1, :n], torch.ones(1, n, dtype=torch.long))
            torch.testing.assert_close(alone[0], logits[i], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model(*with_junk_padding(b, 3)), logits, atol=1e-5, rtol=1e-5)
    assert logits.shape == (6, 3)


def test_gpt_from_pretrained_loads_the_decoder_bitwise(pretrained: Pretrained) -> None:
    model, new = DecoderClassifier.from_pretrained(
        pretrained.gpt_dir, num_labels=3, label_names=["a", "b", "c"]
    )
    assert new == ["score.weight"]
    assert (
        model.config.label_names == ["a", "b", "c"]
        and model.config.decoder == pretrained.gpt.config
    )
    source = pretrained.gpt.transformer.state_dict()
    assert set(model.transformer.state_dict()) == set(source)
    for name, tensor in model.transformer.state_dict().items():
        assert torch.equal(tensor, source[name]), name


def test_gpt_from_pretrained_refuses_a_bert_checkpoint(pretrained: Pretrained) -> None:
    with pytest.raises(CheckpointError, match="arch is 'bert', but a 'gpt' checkpoint"):
        DecoderClassifier.from_pretrained(pretrained.bert_dir, num_labels=3)


@pytest.mark.parametrize("which", ["gpt", "lstm"])
def test_meta_build_and_checkpoint_round_trip(which: str, tmp_path: Path) -> None:
    cfg = (
        GPTClassifierConfig(decoder=gpt_config(), num_labels=4)
        if which == "gpt"
        else lstm_config(num_labels=4)
    )
    model = materialize(build_on_meta(ARCHITECTURES[cfg.arch].model, cfg), "cpu").eval()
    with torch.no_grad():
        assert all(bool(torch.isfinite(p).all()) for p in model.parameters())
        if which == "gpt":  # GPT-2's init: N(0, 0.02) matrices (zero biases, unit LayerNorms)
            assert float(model.score.weight.std()) == pytest.approx(0.02, rel=0.3)
            assert float(model.transformer.wte.weight.std()) == pytest.approx(0.02, rel=0.1)
        else:  # U(-r, r) everywhere
            assert all(
                float(p.std()) > 0 and float(p.abs().max()) <= cfg.init_range
                for p in model.parameters()
            )
    loaded = load_checkpoint(save_checkpoint(tmp_path / which, model, cfg), ARCHITECTURES)
    assert loaded.model_config == cfg
    b = separable_set(5, seed=3)
    with torch.no_grad():
        torch.testing.assert_close(
            loaded.model.eval()(b["input_ids"], b["attention_mask"]),
            model(b["input_ids"], b["attention_mask"]),
            atol=0,
            rtol=0,
        )


@pytest.mark.parametrize("which", ["gpt", "lstm"])
def test_learns_a_separable_set(which: str, pretrained: Pretrained) -> None:
    torch.manual_seed(0)
    model = (
        DecoderClassifier.from_pretrained(pretrained.gpt_dir, 3)[0]
        if which == "gpt"
        else LSTMClassifier(lstm_config())
    )
    lr = 3e-3 if which == "gpt" else 1e-2
    fitted = fit_separable_set(
        model,
        OptimConfig(lr=lr, weight_decay=0.0, warmup_steps=0, schedule="constant"),
        max_steps=200,
    )
    assert accuracy(*predict_labels(model, [fitted.train])) == 1.0, fitted.steps
    # held out: generalisation too
    assert accuracy(*predict_labels(model, [fitted.test])) == 1.0 > fitted.accuracy_before + 0.3
