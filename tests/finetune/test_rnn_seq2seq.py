"""RNNSeq2Seq (plain LSTM, Bahdanau, Luong dot/general): config, shapes, bridges and tying, mask
checks, the LSTM cache, alignment weights, the uniform init, and the alignment a trained model
learns. Decoding, padding, attention maps, checkpoints and learning to reverse:
test_seq2seq_contract.py."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import pytest
import torch
from finetune_testlib import VOCAB, Trained, seq2seq_batch

from data_pipeline.configlib import from_dict, from_preset
from finetune.models.rnn import LSTMCache, RNNSeq2Seq, RNNSeq2SeqConfig
from pretrain.models.meta import build_on_meta, materialize

VARIANTS: dict[str, dict[str, Any]] = {
    "lstm": dict(arch="lstm"),
    "bahdanau": dict(arch="lstm_attention", attention="bahdanau"),
    "luong_dot": dict(arch="lstm_attention", attention="luong_dot"),
    "luong_general": dict(arch="lstm_attention", attention="luong_general"),
}
ATTENTION_VARIANTS = [v for v in VARIANTS if v != "lstm"]


def make_config(variant: str, **overrides: Any) -> RNNSeq2SeqConfig:
    base = dict(vocab_size=VOCAB, dropout=0.0, num_layers=2)
    return from_preset(RNNSeq2SeqConfig, "tiny", **{**base, **VARIANTS[variant], **overrides})


def make_model(variant: str, seed: int = 0, **overrides: Any) -> RNNSeq2Seq:
    torch.manual_seed(seed)
    return RNNSeq2Seq(make_config(variant, **overrides)).eval()


def test_config_presets_and_defaults() -> None:
    tiny = make_config("lstm")
    assert (tiny.preset, tiny.embedding_dim, tiny.hidden_size) == ("tiny", 64, 64)
    assert RNNSeq2SeqConfig(arch="lstm_attention").attention == "bahdanau"
    assert from_preset(RNNSeq2SeqConfig, "small", vocab_size=100).hidden_size == 256


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(arch="gru"), r"arch must be one of \['lstm', 'lstm_attention'\], got 'gru'"),
        (
            dict(arch="lstm", attention="bahdanau"),
            r"attention='bahdanau' needs arch 'lstm_attention'",
        ),
        (
            dict(arch="lstm_attention", attention="concat"),
            r"attention must be one of .*got 'concat'",
        ),
        (
            dict(embedding_dim=32),
            r"tie_embeddings needs embedding_dim == hidden_size, got 32 and 64",
        ),
        (dict(dropout=1.0), r"dropout must be in \[0, 1\)"),
        (dict(pad_id=VOCAB), r"pad_id must be in \[0, vocab_size=17\)"),
        (dict(num_layers=0), r"num_layers must be > 0"),
        (dict(init_range=0.0), r"init_range must be > 0"),
    ],
)
def test_config_errors_name_the_key(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make_config("lstm", **overrides)


def test_config_refuses_unknown_presets_and_keys() -> None:
    with pytest.raises(ValueError, match=r"unknown preset 'huge'"):
        from_preset(RNNSeq2SeqConfig, "huge")
    with pytest.raises(ValueError, match=r"RNNSeq2SeqConfig: unknown key\(s\) \['hidden'\]"):
        from_dict(RNNSeq2SeqConfig, {**dataclasses.asdict(make_config("lstm")), "hidden": 3})


@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_shapes_bridges_and_tying(variant: str, bidirectional: bool) -> None:
    model = make_model(variant, bidirectional=bidirectional)
    src, mask, tgt = seq2seq_batch()
    states, h0, c0 = model.encode(src, mask)
    # the plain decoder never reads the states, so `lstm` keeps both directions' outputs unprojected
    width = 128 if variant == "lstm" and bidirectional else 64
    assert states.shape == (3, 9, width) and h0.shape == (3, 2, 64) and c0.shape == (3, 2, 64)
    assert bool((states[1, 5:] == 0).all())
    assert model(src, mask, tgt).shape == (3, 6, VOCAB)
    assert isinstance(model.encoder.bridge_h, torch.nn.Linear) == bidirectional
    assert model.out.weight is model.embedding.weight


def test_untied_output_allows_different_sizes() -> None:
    model = make_model("luong_general", embedding_dim=32, tie_embeddings=False)
    src, mask, tgt = seq2seq_batch()
    assert model(src, mask, tgt).shape == (3, 6, VOCAB)
    assert model.out.weight.shape == (VOCAB, 64) and model.embedding.weight.shape == (VOCAB, 32)


def test_masks_must_be_right_padded_and_non_empty() -> None:
    model = make_model("bahdanau")
    src, mask, tgt = seq2seq_batch()
    holey = mask.clone()
    holey[0, 2] = 0
    with pytest.raises(ValueError, match="src_mask must be right-padded"):
        model(src, holey, tgt)
    empty = mask.clone()
    empty[2] = 0
    with pytest.raises(ValueError, match=r"src_mask has rows without a real token: \[2\]"):
        model.encode(src, empty)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_reorder_cache_picks_the_lstm_states(variant: str) -> None:
    model = make_model(variant)
    src, mask, tgt = seq2seq_batch()
    index = torch.tensor([2, 2, 0])
    with torch.no_grad():
        _, cache = model.decode_step(tgt[:, :2], model.encode(src, mask), src_mask=mask, cache=None)
    picked = model.reorder_cache(cache, index)
    assert isinstance(picked, LSTMCache) and picked.h.shape == (2, 3, 64)  # (L, N, H)
    assert torch.equal(picked.h, cache.h[:, index]) and torch.equal(picked.c, cache.c[:, index])


@pytest.mark.parametrize("variant", ATTENTION_VARIANTS)
def test_alignment_is_peaked_with_large_weights(variant: str) -> None:
    model = make_model(variant, init_range=1.0)
    src, mask, tgt = seq2seq_batch()
    with torch.no_grad():
        weights = model.cross_attention(src, mask, tgt)
    assert float(weights.amax()) > 0.5  # not the uniform distribution a broken score would give


def test_plain_lstm_has_no_attention_to_show() -> None:
    src, mask, tgt = seq2seq_batch()
    with pytest.raises(ValueError, match="arch 'lstm' has no attention to show"):
        make_model("lstm").cross_attention(src, mask, tgt)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_only_the_attention_variants_read_the_encoder_states(variant: str) -> None:
    """The plain decoder sees the source through its initial (h, c) alone: other encoder states change nothing."""
    model = make_model(variant)
    src, mask, tgt = seq2seq_batch()
    with torch.no_grad():
        states, h0, c0 = model.encode(src, mask)
        other = (torch.randn_like(states).masked_fill(mask.unsqueeze(-1) == 0, 0.0), h0, c0)
        logits, _ = model.decode_step(tgt[:, :4], (states, h0, c0), src_mask=mask, cache=None)
        changed, _ = model.decode_step(tgt[:, :4], other, src_mask=mask, cache=None)
    assert torch.equal(logits, changed) == (variant == "lstm")


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_meta_init_draws_every_weight_from_the_uniform_range(variant: str) -> None:
    cfg = make_config(variant)
    model = materialize(build_on_meta(RNNSeq2Seq, cfg), "cpu")
    with torch.no_grad():
        for p in model.parameters():
            assert bool((p.abs() <= cfg.init_range).all()) and float(p.std()) > 0


@pytest.mark.parametrize("attention", RNNSeq2SeqConfig.ATTENTIONS)
def test_attention_learns_the_reversed_alignment(
    attention: str, reversal_model: Callable[[str], Trained]
) -> None:
    """Target token t of a reversal is source token n-1-t: the alignment should put most mass
    there."""
    model, b, expected, _ = reversal_model(f"lstm_attention-{attention}")
    with torch.no_grad():
        weights = model.cross_attention(b["src_ids"], b["src_mask"], b["tgt_in"])  # (B,U,S)
    mass = [
        float(weights[i, t, len(y) - 1 - t]) for i, y in enumerate(expected) for t in range(len(y))
    ]
    assert sum(mass) / len(mass) > 0.5


def test_an_lstm_checkpoint_with_the_old_unused_state_projection_still_loads() -> None:
    model = make_model("lstm")
    old = {
        **model.state_dict(),
        "encoder.proj.weight": torch.zeros(64, 128),
        "encoder.proj.bias": torch.zeros(64),
    }
    fresh = make_model("lstm")
    fresh.load_state_dict(old, strict=True)
    src, mask, tgt = seq2seq_batch()
    model.eval()
    fresh.eval()
    torch.testing.assert_close(fresh(src, mask, tgt), model(src, mask, tgt))
