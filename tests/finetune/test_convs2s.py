"""ConvS2S: config errors, causality, padding invariance, input-buffer decoding == full forward (per step, greedy
and beam), attention maps, meta build, checkpoint round trip, 50-pair overfit."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import torch
from finetune_testlib import BOS, EOS, N_PAIRS, PAD, VOCAB, NoCache, exact_match, train_reversal
from torch import Tensor

from finetune.decode import beam_search, greedy_decode
from finetune.models.convs2s import ConvS2S, ConvS2SConfig
from pretrain.checkpoint import load_checkpoint, save_checkpoint
from pretrain.models.meta import build_on_meta, materialize


def make_model(seed: int = 0, **overrides: Any) -> ConvS2S:
    torch.manual_seed(seed)
    return ConvS2S(ConvS2SConfig.from_preset("tiny", vocab_size=VOCAB, **overrides)).eval()


def batch(seed: int = 1) -> tuple[Tensor, Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    src = torch.randint(7, VOCAB, (3, 9), generator=gen)
    mask = torch.ones_like(src)
    mask[1, 5:] = 0  # a padded source
    src[1, 5:] = PAD
    tgt = torch.randint(7, VOCAB, (3, 6), generator=gen)
    tgt[:, 0] = BOS
    return src, mask, tgt


def test_config_errors_name_the_key() -> None:
    with pytest.raises(ValueError, match="ConvS2SConfig.arch must be 'convs2s'"):
        ConvS2SConfig(arch="transformer")
    with pytest.raises(ValueError, match="ConvS2SConfig.kernel_size must be odd"):
        ConvS2SConfig(kernel_size=4)
    with pytest.raises(ValueError, match="ConvS2SConfig.channels must be > 0"):
        ConvS2SConfig(channels=0)
    with pytest.raises(ValueError, match="ConvS2SConfig.preset: unknown preset 'huge'"):
        ConvS2SConfig.from_preset("huge")
    with pytest.raises(ValueError, match=r"ConvS2SConfig: unknown key\(s\) \['d_model'\]"):
        ConvS2SConfig.from_dict({"d_model": 3})


def test_presets_and_dict_round_trip() -> None:
    cfg = ConvS2SConfig.from_preset("small", vocab_size=VOCAB, kernel_size=5)
    assert (cfg.embed_dim, cfg.channels, cfg.encoder_layers, cfg.decoder_layers, cfg.preset) == (256, 256, 4, 3,
                                                                                                 "small")
    assert cfg.kernel_size == 5  # explicit keys win over the preset
    assert ConvS2SConfig.from_dict(dataclasses.asdict(cfg)) == cfg


def test_shapes() -> None:
    model = make_model()
    src, mask, tgt = batch()
    keys, values = model.encode(src, mask)
    assert keys.shape == values.shape == (3, 9, 32)
    assert keys[1, 5:].abs().max() == 0 and values[1, 5:].abs().max() == 0  # nothing to attend at padding
    assert model(src, mask, tgt).shape == (3, 6, VOCAB)
    assert model.cross_attention(src, mask, tgt).shape == (3, 6, 9)


@pytest.mark.parametrize("kernel_size", [3, 5])
def test_changing_a_later_target_token_leaves_earlier_logits_unchanged(kernel_size: int) -> None:
    model = make_model(kernel_size=kernel_size)
    src, mask, tgt = batch()
    changed = tgt.clone()
    changed[:, 3] = torch.where(tgt[:, 3] == 7, 8, 7)
    with torch.no_grad():
        a, b = model(src, mask, tgt), model(src, mask, changed)
    torch.testing.assert_close(a[:, :3], b[:, :3], atol=1e-6, rtol=0)
    assert (a[:, 3:] - b[:, 3:]).abs().amax() > 1e-3


def test_extra_source_padding_changes_nothing() -> None:
    model = make_model(kernel_size=5)
    src, mask, tgt = batch()
    src_pad = torch.cat([src, torch.full((3, 4), PAD)], dim=1)  # (3, 13)
    mask_pad = torch.cat([mask, torch.zeros(3, 4, dtype=torch.long)], dim=1)
    with torch.no_grad():
        torch.testing.assert_close(model(src_pad, mask_pad, tgt), model(src, mask, tgt), atol=1e-5, rtol=1e-5)
        attn = model.cross_attention(src_pad, mask_pad, tgt)
        torch.testing.assert_close(attn[..., :9], model.cross_attention(src, mask, tgt), atol=1e-6, rtol=1e-5)
    assert attn[..., 9:].abs().max() == 0


@pytest.mark.parametrize("kernel_size", [1, 3, 5])
def test_cached_decode_steps_equal_full_forward(kernel_size: int) -> None:
    model = make_model(kernel_size=kernel_size)
    src, mask, tgt = batch()
    with torch.no_grad():
        full = model(src, mask, tgt)  # (B,U,V)
        memory = model.encode(src, mask)
        cache, steps = None, []
        for t in range(tgt.size(1)):
            logits, cache = model.decode_step(tgt[:, t : t + 1], memory, mask, cache)
            steps.append(logits)
            # O(1) per step: a fixed-size input buffer per block, whatever the prefix length
            assert [tuple(b.shape) for b in cache.buffers] == [(3, kernel_size - 1, 64)] * 2
        cache2 = model.decode_step(tgt[:, :3], memory, mask, None)[1]  # several new tokens on top of a cache
        last2, _ = model.decode_step(tgt[:, 3:5], memory, mask, cache2)
    torch.testing.assert_close(torch.stack(steps, dim=1), full, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(last2, full[:, 4], atol=1e-5, rtol=1e-5)
    assert cache.steps == tgt.size(1)


def test_reorder_cache_selects_rows() -> None:
    model = make_model()
    src, mask, tgt = batch()
    with torch.no_grad():
        keys, values = model.encode(src, mask)
        _, cache = model.decode_step(tgt[:, :2], (keys, values), mask, None)
        index = torch.tensor([2, 2, 0])
        picked = model.reorder_cache(cache, index)
        memory = (keys[index], values[index])
        logits, _ = model.decode_step(tgt[index, 2:3], memory, mask[index], picked)
        ref, _ = model.decode_step(tgt[index, :3], memory, mask[index], None)
    torch.testing.assert_close(logits, ref, atol=1e-5, rtol=1e-5)


def test_greedy_and_beam_with_cache_equal_the_cache_free_loop() -> None:
    model = make_model(seed=3)
    src, mask, _ = batch()
    assert greedy_decode(model, src, mask, BOS, EOS, 10) == greedy_decode(NoCache(model), src, mask, BOS, EOS, 10)
    cached = beam_search(model, src, mask, BOS, EOS, 10, beam_size=4, length_penalty="gnmt", n_best=3)
    free = beam_search(NoCache(model), src, mask, BOS, EOS, 10, beam_size=4, length_penalty="gnmt", n_best=3)
    assert [[h.tokens for h in hs] for hs in cached] == [[h.tokens for h in hs] for hs in free]
    for hs, ref in zip(cached, free, strict=True):
        assert [h.logprob for h in hs] == pytest.approx([h.logprob for h in ref], abs=1e-4)


def test_cross_attention_rows_sum_to_one_and_skip_padding() -> None:
    model = make_model()
    src, mask, tgt = batch()
    with torch.no_grad():
        attn = model.cross_attention(src, mask, tgt)
    torch.testing.assert_close(attn.sum(-1), torch.ones(3, 6), atol=1e-5, rtol=0)
    assert attn[1, :, 5:].abs().max() == 0  # row 1 is padded from position 5
    assert (attn[0] > 0).all()


def test_max_positions_is_enforced() -> None:
    model = make_model(max_positions=8)
    src, mask, tgt = batch()  # 9 source positions
    with pytest.raises(ValueError, match="max_positions=8"):
        model.encode(src, mask)


def test_meta_build_then_init() -> None:
    cfg = make_model().config
    model = build_on_meta(ConvS2S, cfg)
    assert next(model.parameters()).device.type == "meta"
    materialize(model, "cpu")
    assert all(torch.isfinite(p).all() for p in model.parameters())
    conv = model.encoder.convs[0]
    expected = (4 * (1 - cfg.dropout) / (conv.in_channels * conv.kernel_size[0])) ** 0.5  # Gehring et al. §3.5
    assert float(conv.weight.detach().std()) == pytest.approx(expected, rel=0.1)


def test_checkpoint_round_trip(tmp_path: Path) -> None:
    model = make_model()
    path = save_checkpoint(tmp_path / "mt", model, model.config)
    loaded = load_checkpoint(path, {"convs2s": (ConvS2SConfig, ConvS2S)})
    assert loaded.model_config == model.config
    assert loaded.model is not None
    src, mask, tgt = batch()
    with torch.no_grad():
        torch.testing.assert_close(loaded.model.eval()(src, mask, tgt), model(src, mask, tgt), atol=0, rtol=0)


# ------------------------------------------------------------------ learning a real (tiny) task
@pytest.fixture(scope="module")
def trained() -> tuple[ConvS2S, dict[str, Tensor], list[list[int]], list[float]]:
    return train_reversal(make_model(dropout=0.0))


def test_overfits_fifty_pairs(trained: tuple) -> None:
    _, _, _, history = trained
    assert history[0] < 0.1  # it really had to learn
    assert history[-1] >= 0.9, history


def test_trained_model_decodes_the_same_with_and_without_cache(trained: tuple) -> None:
    model, b, expected, _ = trained
    beams = beam_search(model, b["src_ids"], b["src_mask"], BOS, EOS, 8, beam_size=3, length_penalty="gnmt")
    assert sum(h[0].tokens == y for h, y in zip(beams, expected, strict=True)) >= 0.9 * N_PAIRS
    ref = beam_search(NoCache(model), b["src_ids"], b["src_mask"], BOS, EOS, 8, beam_size=3, length_penalty="gnmt")
    assert [h[0].tokens for h in beams] == [h[0].tokens for h in ref]
    assert exact_match(NoCache(model), b, expected) == exact_match(model, b, expected)

