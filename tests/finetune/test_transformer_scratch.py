"""TransformerSeq2Seq (from scratch): config errors, causality, padding invariance, KV-cache decoding == full
forward (per step, greedy and beam), cross-attention maps, meta build, checkpoint round trip, 50-pair overfit."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from finetune_testlib import BOS, EOS, N_PAIRS, PAD, VOCAB, NoCache, exact_match, train_reversal
from torch import Tensor

from finetune.decode import beam_search, greedy_decode
from finetune.models.transformer import TransformerConfig, TransformerSeq2Seq, sinusoids
from pretrain.checkpoint import load_checkpoint, save_checkpoint
from pretrain.models.meta import build_on_meta, materialize

VARIANTS = [(True, "sinusoidal"), (False, "learned"), (True, "learned"), (False, "sinusoidal")]


def make_model(norm_first: bool = True, positions: str = "sinusoidal", seed: int = 0, **overrides: Any
               ) -> TransformerSeq2Seq:
    torch.manual_seed(seed)
    cfg = TransformerConfig.from_preset("tiny", vocab_size=VOCAB, norm_first=norm_first, positions=positions,
                                        **overrides)
    return TransformerSeq2Seq(cfg).eval()


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
    with pytest.raises(ValueError, match="TransformerConfig.arch must be 'transformer'"):
        TransformerConfig(arch="convs2s")
    with pytest.raises(ValueError, match=r"TransformerConfig.d_model \(66\) must be divisible by n_heads \(4\)"):
        TransformerConfig(d_model=66, n_heads=4)
    with pytest.raises(ValueError, match="TransformerConfig.positions must be one of .* got 'rope'"):
        TransformerConfig(positions="rope")
    with pytest.raises(ValueError, match="TransformerConfig.preset: unknown preset 'huge'"):
        TransformerConfig.from_preset("huge")
    with pytest.raises(ValueError, match="TransformerConfig.dropout"):
        TransformerConfig(dropout=1.0)
    with pytest.raises(ValueError, match=r"TransformerConfig: unknown key\(s\) \['n_layers'\]"):
        TransformerConfig.from_dict({"n_layers": 3})


def test_presets_and_dict_round_trip() -> None:
    cfg = TransformerConfig.from_preset("small", vocab_size=VOCAB, dropout=0.3)
    assert (cfg.d_model, cfg.n_heads, cfg.d_ff, cfg.encoder_layers, cfg.preset) == (256, 4, 1024, 3, "small")
    assert cfg.dropout == 0.3  # explicit keys win over the preset
    assert TransformerConfig.from_dict(dataclasses.asdict(cfg)) == cfg


def test_sinusoids_follow_the_paper() -> None:
    pe = sinusoids(torch.arange(50), 16)  # (50, 16)
    pos, i = 37, 3
    assert pe[pos, 2 * i].item() == pytest.approx(math.sin(pos / 10000 ** (2 * i / 16)), abs=1e-5)
    assert pe[pos, 2 * i + 1].item() == pytest.approx(math.cos(pos / 10000 ** (2 * i / 16)), abs=1e-5)


@pytest.mark.parametrize(("norm_first", "positions"), VARIANTS)
def test_shapes_and_shared_embedding(norm_first: bool, positions: str) -> None:
    model = make_model(norm_first, positions)
    src, mask, tgt = batch()
    assert model.encode(src, mask).shape == (3, 9, 64)
    assert model(src, mask, tgt).shape == (3, 6, VOCAB)
    names = [n for n, _ in model.named_parameters()]
    assert [n for n in names if "embed_tokens" in n] == ["embed_tokens.weight"]  # source, target, output: one
    assert any("positions.table" in n for n in names) == (positions == "learned")
    assert isinstance(model.decoder_norm, torch.nn.LayerNorm) == norm_first


@pytest.mark.parametrize(("norm_first", "positions"), VARIANTS)
def test_changing_a_later_target_token_leaves_earlier_logits_unchanged(norm_first: bool, positions: str) -> None:
    model = make_model(norm_first, positions)
    src, mask, tgt = batch()
    changed = tgt.clone()
    changed[:, 3] = torch.where(tgt[:, 3] == 7, 8, 7)
    with torch.no_grad():
        a, b = model(src, mask, tgt), model(src, mask, changed)
    torch.testing.assert_close(a[:, :3], b[:, :3], atol=1e-6, rtol=0)
    assert (a[:, 3:] - b[:, 3:]).abs().amax() > 1e-3


@pytest.mark.parametrize(("norm_first", "positions"), VARIANTS)
def test_extra_source_padding_changes_nothing(norm_first: bool, positions: str) -> None:
    model = make_model(norm_first, positions)
    src, mask, tgt = batch()
    src_pad = torch.cat([src, torch.full((3, 4), PAD)], dim=1)  # (3, 13)
    mask_pad = torch.cat([mask, torch.zeros(3, 4, dtype=torch.long)], dim=1)
    with torch.no_grad():
        torch.testing.assert_close(model(src_pad, mask_pad, tgt), model(src, mask, tgt), atol=1e-5, rtol=1e-5)
        attn = model.cross_attention(src_pad, mask_pad, tgt)
        torch.testing.assert_close(attn[..., :9], model.cross_attention(src, mask, tgt), atol=1e-6, rtol=1e-5)
    assert attn[..., 9:].abs().max() == 0


@pytest.mark.parametrize(("norm_first", "positions"), VARIANTS)
def test_cached_decode_steps_equal_full_forward(norm_first: bool, positions: str) -> None:
    model = make_model(norm_first, positions)
    src, mask, tgt = batch()
    with torch.no_grad():
        full = model(src, mask, tgt)  # (B,U,V)
        memory = model.encode(src, mask)
        cache, steps = None, []
        for t in range(tgt.size(1)):
            logits, cache = model.decode_step(tgt[:, t : t + 1], memory, mask, cache)
            steps.append(logits)
        # two new tokens at once on top of a cache: the offset causal mask
        cache2 = model.decode_step(tgt[:, :3], memory, mask, None)[1]
        last2, _ = model.decode_step(tgt[:, 3:5], memory, mask, cache2)
    torch.testing.assert_close(torch.stack(steps, dim=1), full, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(last2, full[:, 4], atol=1e-5, rtol=1e-5)
    assert cache[0].k.shape == (3, 2, 6, 32)  # (N, nh, P, hs): the self-attention keys grew by one per step


def test_cross_attention_keys_are_computed_once() -> None:
    model = make_model()
    src, mask, tgt = batch()
    calls: list[int] = []
    for layer in model.decoder_layers:
        layer.cross_attn.k_proj.register_forward_hook(lambda *args: calls.append(1))
    with torch.no_grad():
        memory = model.encode(src, mask)
        cache = None
        for t in range(5):
            _, cache = model.decode_step(tgt[:, t : t + 1], memory, mask, cache)
    assert len(calls) == len(model.decoder_layers)  # once per layer, at the first step only


def test_reorder_cache_selects_rows() -> None:
    model = make_model()
    src, mask, tgt = batch()
    with torch.no_grad():
        memory = model.encode(src, mask)
        _, cache = model.decode_step(tgt[:, :2], memory, mask, None)
        index = torch.tensor([2, 2, 0])
        picked = model.reorder_cache(cache, index)
        logits, _ = model.decode_step(tgt[index, 2:3], memory[index], mask[index], picked)
        ref, _ = model.decode_step(tgt[index, :3], memory[index], mask[index], None)
    torch.testing.assert_close(logits, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("norm_first", "positions"), VARIANTS[:2])
def test_greedy_and_beam_with_cache_equal_the_cache_free_loop(norm_first: bool, positions: str) -> None:
    model = make_model(norm_first, positions, seed=3)
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
    assert attn.shape == (3, 6, 9)
    torch.testing.assert_close(attn.sum(-1), torch.ones(3, 6), atol=1e-5, rtol=0)
    assert attn[1, :, 5:].abs().max() == 0  # row 1 is padded from position 5
    assert (attn[0] > 0).all()


def test_max_positions_is_enforced() -> None:
    model = make_model(positions="learned", max_positions=8)
    src, mask, tgt = batch()  # 9 source positions
    with pytest.raises(ValueError, match="max_positions=8"):
        model.encode(src, mask)


def test_meta_build_then_init() -> None:
    cfg = make_model(positions="learned").config
    model = build_on_meta(TransformerSeq2Seq, cfg)
    assert next(model.parameters()).device.type == "meta"
    materialize(model, "cpu")
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert float(model.embed_tokens.weight.detach().std()) == pytest.approx(64**-0.5, rel=0.2)


def test_checkpoint_round_trip(tmp_path: Path) -> None:
    model = make_model(norm_first=False, positions="learned")
    path = save_checkpoint(tmp_path / "mt", model, model.config)
    loaded = load_checkpoint(path, {"transformer": (TransformerConfig, TransformerSeq2Seq)})
    assert loaded.model_config == model.config
    src, mask, tgt = batch()
    assert loaded.model is not None
    with torch.no_grad():
        torch.testing.assert_close(loaded.model.eval()(src, mask, tgt), model(src, mask, tgt), atol=0, rtol=0)


# ------------------------------------------------------------------ learning a real (tiny) task
@pytest.fixture(scope="module")
def trained() -> tuple[TransformerSeq2Seq, dict[str, Tensor], list[list[int]], list[float]]:
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
