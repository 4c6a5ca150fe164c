"""ConvS2S: config errors and presets, shapes, the fixed-size decoding state and the init scale.
Decoding, padding, attention maps, checkpoints and learning: test_seq2seq_contract.py."""

from __future__ import annotations

import pytest
import torch
from finetune_testlib import VOCAB, seq2seq_batch, tiny_seq2seq

from data_pipeline.configlib import from_dict, from_preset
from finetune.models.convs2s import ConvS2S, ConvS2SConfig
from pretrain.models.meta import build_on_meta, materialize


def test_config_errors_name_the_key() -> None:
    with pytest.raises(ValueError, match="ConvS2SConfig.arch must be 'convs2s'"):
        ConvS2SConfig(arch="transformer")
    with pytest.raises(ValueError, match="ConvS2SConfig.kernel_size must be odd"):
        ConvS2SConfig(kernel_size=4)
    with pytest.raises(ValueError, match="ConvS2SConfig.channels must be > 0"):
        ConvS2SConfig(channels=0)
    with pytest.raises(ValueError, match="ConvS2SConfig.preset: unknown preset 'huge'"):
        from_preset(ConvS2SConfig, "huge")
    with pytest.raises(ValueError, match=r"ConvS2SConfig: unknown key\(s\) \['d_model'\]"):
        from_dict(ConvS2SConfig, {"d_model": 3})


def test_presets() -> None:
    cfg = from_preset(ConvS2SConfig, "small", vocab_size=VOCAB, kernel_size=5)
    assert (cfg.embed_dim, cfg.channels, cfg.encoder_layers, cfg.decoder_layers, cfg.preset) == (
        256,
        256,
        4,
        3,
        "small",
    )
    assert cfg.kernel_size == 5  # explicit keys win over the preset


def test_shapes() -> None:
    model = tiny_seq2seq("convs2s")
    src, mask, tgt = seq2seq_batch()
    keys, values = model.encode(src, mask)
    assert keys.shape == values.shape == (3, 9, 32)
    assert (
        keys[1, 5:].abs().max() == 0 and values[1, 5:].abs().max() == 0
    )  # nothing to attend at padding
    assert model(src, mask, tgt).shape == (3, 6, VOCAB)
    assert model.cross_attention(src, mask, tgt).shape == (3, 6, 9)


@pytest.mark.parametrize("kernel_size", [1, 3, 5])
def test_decoding_state_is_a_fixed_size_input_buffer(kernel_size: int) -> None:
    model = tiny_seq2seq("convs2s", kernel_size=kernel_size)
    src, mask, tgt = seq2seq_batch()
    with torch.no_grad():
        memory = model.encode(src, mask)
        cache = None
        for t in range(tgt.size(1)):
            _, cache = model.decode_step(tgt[:, t : t + 1], memory, src_mask=mask, cache=cache)
            # O(1) per step: a fixed-size input buffer per block, whatever the prefix length
            assert [tuple(b.shape) for b in cache.buffers] == [(3, kernel_size - 1, 64)] * 2
    assert cache.steps == tgt.size(1)


def test_meta_init_follows_gehring_et_al() -> None:
    cfg = tiny_seq2seq("convs2s").config
    model = materialize(build_on_meta(ConvS2S, cfg), "cpu")
    conv = model.encoder.convs[0]
    expected = (
        4 * (1 - cfg.dropout) / (conv.in_channels * conv.kernel_size[0])
    ) ** 0.5  # Gehring et al. §3.5
    assert float(conv.weight.detach().std()) == pytest.approx(expected, rel=0.1)
