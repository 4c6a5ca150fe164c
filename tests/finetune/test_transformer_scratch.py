"""TransformerSeq2Seq (from scratch): config errors and presets, sinusoids, shapes and the shared
embedding, the KV cache's growth and the init scale. Decoding, padding, attention maps, checkpoints
and learning: test_seq2seq_contract.py."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from finetune_testlib import VOCAB, seq2seq_batch, tiny_seq2seq

from data_pipeline.configlib import from_dict, from_preset
from finetune.models.transformer import TransformerConfig, TransformerSeq2Seq, sinusoids
from pretrain.models.meta import build_on_meta, materialize

VARIANTS = [(True, "sinusoidal"), (False, "learned"), (True, "learned"), (False, "sinusoidal")]


def make_model(
    norm_first: bool = True, positions: str = "sinusoidal", **overrides: Any
) -> TransformerSeq2Seq:
    return tiny_seq2seq("transformer", norm_first=norm_first, positions=positions, **overrides)


def test_config_errors_name_the_key() -> None:
    with pytest.raises(ValueError, match="TransformerConfig.arch must be 'transformer'"):
        TransformerConfig(arch="convs2s")
    with pytest.raises(
        ValueError, match=r"TransformerConfig.d_model \(66\) must be divisible by n_heads \(4\)"
    ):
        TransformerConfig(d_model=66, n_heads=4)
    with pytest.raises(
        ValueError, match="TransformerConfig.positions must be one of .* got 'rope'"
    ):
        TransformerConfig(positions="rope")
    with pytest.raises(ValueError, match="TransformerConfig.preset: unknown preset 'huge'"):
        from_preset(TransformerConfig, "huge")
    with pytest.raises(ValueError, match="TransformerConfig.dropout"):
        TransformerConfig(dropout=1.0)
    with pytest.raises(ValueError, match=r"TransformerConfig: unknown key\(s\) \['n_layers'\]"):
        from_dict(TransformerConfig, {"n_layers": 3})


def test_presets() -> None:
    cfg = from_preset(TransformerConfig, "small", vocab_size=VOCAB, dropout=0.3)
    assert (cfg.d_model, cfg.n_heads, cfg.d_ff, cfg.encoder_layers, cfg.preset) == (
        256,
        4,
        1024,
        3,
        "small",
    )
    assert cfg.dropout == 0.3  # explicit keys win over the preset


def test_sinusoids_follow_the_paper() -> None:
    pe = sinusoids(torch.arange(50), 16)  # (50, 16)
    pos, i = 37, 3
    assert pe[pos, 2 * i].item() == pytest.approx(math.sin(pos / 10000 ** (2 * i / 16)), abs=1e-5)
    assert pe[pos, 2 * i + 1].item() == pytest.approx(
        math.cos(pos / 10000 ** (2 * i / 16)), abs=1e-5
    )


@pytest.mark.parametrize(("norm_first", "positions"), VARIANTS)
def test_shapes_and_shared_embedding(norm_first: bool, positions: str) -> None:
    model = make_model(norm_first, positions)
    src, mask, tgt = seq2seq_batch()
    assert model.encode(src, mask).shape == (3, 9, 64)
    assert model(src, mask, tgt).shape == (3, 6, VOCAB)
    names = [n for n, _ in model.named_parameters()]
    assert [n for n in names if "embed_tokens" in n] == [
        "embed_tokens.weight"
    ]  # source, target, output: one
    assert any("positions.table" in n for n in names) == (positions == "learned")
    assert isinstance(model.decoder_norm, torch.nn.LayerNorm) == norm_first


def test_self_attention_cache_grows_one_position_per_step() -> None:
    model = make_model()
    src, mask, tgt = seq2seq_batch()
    with torch.no_grad():
        memory = model.encode(src, mask)
        cache = None
        for t in range(tgt.size(1)):
            _, cache = model.decode_step(tgt[:, t : t + 1], memory, src_mask=mask, cache=cache)
            assert cache[0].k.shape == (3, 2, t + 1, 32)  # (N, nh, P, hs)


def test_meta_init_scales_the_embedding_by_the_width() -> None:
    cfg = make_model(positions="learned").config
    model = materialize(build_on_meta(TransformerSeq2Seq, cfg), "cpu")
    assert float(model.embed_tokens.weight.detach().std()) == pytest.approx(64**-0.5, rel=0.2)
