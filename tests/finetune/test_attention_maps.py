"""Cross-attention probabilities of the warm-started model, and the heatmap PNGs drawn from them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from finetune_testlib import BOS, EOS, VOCAB, make_tokenizer, tiny_seq2seq
from torch import Tensor, nn

from finetune.attention_maps import attention_maps, plot_attention
from finetune.models import TRANSLATION_ARCHES
from finetune.models.seq2seq import WarmStartedSeq2Seq
from pretrain.models.gpt import _heads, _merge_heads

PNG = b"\x89PNG\r\n\x1a\n"


def make_model(dec_width: int = 64) -> WarmStartedSeq2Seq:
    return tiny_seq2seq(
        "seq2seq_warm", n_embd=dec_width, initializer_range=0.2, encoder=dict(initializer_range=0.2)
    )


def batch() -> tuple[Tensor, Tensor, Tensor]:
    gen = torch.Generator().manual_seed(1)
    src = torch.randint(7, VOCAB, (3, 7), generator=gen)
    mask = torch.ones_like(src)
    src[1, 4:], mask[1, 4:] = 0, 0  # a padded source
    tgt = torch.randint(7, VOCAB, (3, 5), generator=gen)
    tgt[:, 0] = BOS
    return src, mask, tgt


@pytest.mark.parametrize("dec_width", [64, 32])
def test_cross_attention_leaves_no_hook_behind(dec_width: int) -> None:
    """The map is read through a forward hook (test_seq2seq_contract.py checks the distribution)."""
    model = make_model(dec_width)
    src, mask, tgt = batch()
    with torch.no_grad():
        assert model.cross_attention(src, mask, tgt).shape == (3, 5, 7)
    block = model.decoder.transformer.h[-1].crossattention
    assert not block._forward_hooks  # the hook is gone once the map is taken


def test_the_probabilities_are_the_ones_the_forward_pass_applies() -> None:
    """Weights @ values through c_proj must reproduce the block's own SDPA output, head by head."""
    model = make_model()
    src, mask, tgt = batch()
    block = model.decoder.transformer.h[-1].crossattention
    seen: dict[str, Any] = {}

    def grab(module: nn.Module, args: tuple, kwargs: dict[str, Any], output: tuple) -> None:
        seen["args"], seen["mask"], seen["out"] = args, kwargs["encoder_mask"], output[0]

    handle = block.register_forward_hook(grab, with_kwargs=True)
    with torch.no_grad():
        model(src, mask, tgt)
        handle.remove()
        (x, states), enc_mask = seen["args"], seen["mask"]
        probs = block.attention_probs(x, states, enc_mask)  # (B, nh, U, S)
        v = _heads(block.c_attn(states).split(x.size(2), dim=2)[1], block.n_head)  # (B, nh, S, hs)
        rebuilt = block.c_proj(_merge_heads(probs @ v))
    torch.testing.assert_close(rebuilt, seen["out"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model.cross_attention(src, mask, tgt), probs.mean(dim=1))


def assert_png(path: Path) -> None:
    assert path.is_file() and path.read_bytes()[:8] == PNG and path.stat().st_size > 5000
    try:
        from PIL import Image
    except ImportError:
        return
    with Image.open(path) as image:
        assert image.width > 200 and image.height > 150


def test_plot_attention_writes_a_labelled_png(tmp_path: Path) -> None:
    weights = torch.softmax(torch.randn(4, 6), dim=-1)
    path = plot_attention(
        weights, list("abcdef"), ["w", "x", "y", "[EOS]"], tmp_path / "sub" / "map.png", "a title"
    )
    assert_png(path)
    with pytest.raises(ValueError, match="do not match 3 target x 6 source"):
        plot_attention(weights, list("abcdef"), ["w", "x", "y"], tmp_path / "bad.png")


def test_attention_maps_translate_and_plot_each_sentence(tmp_path: Path) -> None:
    model = make_model()
    model.train()
    paths = attention_maps(
        model, make_tokenizer(), ["1 2 3", "4 5 6 7 8"], tmp_path, beam_size=2, max_len=6
    )
    assert [p.name for p in paths] == ["attention_000.png", "attention_001.png"]
    for p in paths:
        assert_png(p)
    assert model.training  # the caller's mode is restored


class NoAttention(nn.Module):
    """Implements decoding but has no attention (a plain LSTM encoder-decoder would look like this)."""

    def __init__(self) -> None:
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(1))

    def encode(self, src_ids: Tensor, src_mask: Tensor) -> Tensor:
        return torch.zeros(src_ids.size(0), 1, 1)

    def decode_step(
        self, tgt_ids: Tensor, memory: Tensor, *, src_mask: Tensor, cache: Any | None
    ) -> tuple[Tensor, Any]:
        logits = torch.zeros(tgt_ids.size(0), VOCAB)
        logits[:, EOS] = 5.0
        return logits, cache

    def reorder_cache(self, cache: Any, index: Tensor) -> Any:
        return cache


class RefusesAttention(NoAttention):
    def cross_attention(self, src_ids: Tensor, src_mask: Tensor, tgt_in: Tensor) -> Tensor:
        raise NotImplementedError("the context-vector LSTM attends to nothing")


def test_models_without_attention_get_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="NoAttention has no cross_attention"):
        attention_maps(NoAttention(), make_tokenizer(), ["1 2"], tmp_path)
    with pytest.raises(ValueError, match="attends to nothing"):
        attention_maps(RefusesAttention(), make_tokenizer(), ["1 2"], tmp_path)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("arch", [a for a in TRANSLATION_ARCHES if a != "lstm"])
def test_attention_maps_for_every_architecture_with_attention(arch: str, tmp_path: Path) -> None:
    [path] = attention_maps(
        tiny_seq2seq(arch), make_tokenizer(), ["1 2 3 4"], tmp_path, beam_size=2, max_len=5
    )
    assert_png(path)


def test_the_plain_lstm_is_refused_before_any_search(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no attention"):
        attention_maps(tiny_seq2seq("lstm"), make_tokenizer(), ["1 2"], tmp_path)
    assert not list(tmp_path.iterdir())
