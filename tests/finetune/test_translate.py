"""translate_texts plumbing with a deterministic copy model: encoding, batching order, detokenisation."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch
from finetune_testlib import EOS, PAD, digit_id
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from torch import Tensor, nn

from cluster.jobs import DecodeConfig
from data_pipeline.tokenizer import train_tokenizer
from finetune.translate import encode_sources, pad_batch, translate_texts


class CopyModel(nn.Module):
    """Emits the source token by token (its [EOS] included), then [EOS]: a model whose answer is known."""

    def __init__(self) -> None:
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(1))  # gives the model a device
        self.vocab = 20
        self.batch_sizes: list[int] = []

    def encode(self, src_ids: Tensor, src_mask: Tensor) -> Tensor:
        self.batch_sizes.append(src_ids.size(0))
        assert not self.training
        return src_ids.float().unsqueeze(-1)  # (B,S,1)

    def decode_step(
        self, tgt_ids: Tensor, memory: Tensor, *, src_mask: Tensor, cache: Any | None
    ) -> tuple[Tensor, Any]:
        step = 0 if cache is None else cache
        src = memory[:, :, 0].long()  # (N,S)
        nxt = torch.full((src.size(0),), EOS)
        if step < src.size(1):
            nxt = torch.where(src_mask[:, step] == 1, src[:, step], nxt)  # padding reads as [EOS]
        logits = torch.full((src.size(0), self.vocab), -10.0)
        logits[torch.arange(src.size(0)), nxt] = 10.0
        return logits, step + 1

    def reorder_cache(self, cache: Any, index: Tensor) -> Any:
        return cache  # the step counter is the same for every row


def test_encode_sources_appends_eos_and_truncates(tokenizer: Tokenizer) -> None:
    rows = encode_sources(tokenizer, ["3 1 4", "1 5 9 2 6"], max_src_len=4)
    assert rows == [
        [digit_id(3), digit_id(1), digit_id(4), EOS],
        [digit_id(1), digit_id(5), digit_id(9), EOS],
    ]
    with pytest.raises(ValueError, match="max_src_len"):
        encode_sources(tokenizer, ["1"], max_src_len=1)


def test_pad_batch_pads_right_with_mask() -> None:
    ids, mask = pad_batch([[7, 8, 6], [9, 6]], PAD, torch.device("cpu"))
    assert ids.tolist() == [[7, 8, 6], [9, 6, PAD]]
    assert mask.tolist() == [[1, 1, 1], [1, 1, 0]]


def test_translate_texts_keeps_input_order_across_length_sorted_batches(
    tokenizer: Tokenizer,
) -> None:
    texts = ["1 2 3 4 5", "7", "8 8", "0 1 2", "9 9 9 9", "5"]
    model = CopyModel()
    model.train()
    out = translate_texts(
        model,
        tokenizer,
        texts,
        beam_size=2,
        length_penalty="none",
        alpha=1.0,
        max_len=10,
        batch_size=4,
    )
    assert out == texts  # [EOS] (special) stripped, tokens detokenised with the tokenizer
    assert model.batch_sizes == [4, 2]
    assert model.training  # mode restored
    assert (
        translate_texts(
            model,
            tokenizer,
            [],
            beam_size=2,
            length_penalty="none",
            alpha=1.0,
            max_len=10,
            batch_size=4,
        )
        == []
    )


def test_byte_level_bpe_text_survives_the_round_trip() -> None:
    # the data pipeline's own tokenizer: accents and hyphens must come back exactly, [EOS] stripped
    texts = ["trois cent quarante-deux", "quatre-vingt-dix-neuf élèves", "mille deux cents"]
    bpe = train_tokenizer("bpe", texts * 5, 300)
    model = CopyModel()
    model.vocab = bpe.get_vocab_size()
    out = translate_texts(
        model, bpe, texts, beam_size=1, length_penalty="none", alpha=1.0, max_len=40, batch_size=2
    )
    assert out == texts


def test_decode_config_feeds_translate_texts_and_validates(tokenizer: Tokenizer) -> None:
    cfg = DecodeConfig(beam_size=2, length_penalty="avg", batch_size=1)
    assert translate_texts(CopyModel(), tokenizer, ["4 2"], **dataclasses.asdict(cfg)) == ["4 2"]
    with pytest.raises(
        ValueError, match=r"DecodeConfig.length_penalty must be one of \[.*'gnmt'\], got 'wu'"
    ):
        DecodeConfig(length_penalty="wu")
    with pytest.raises(ValueError, match="DecodeConfig.beam_size must be >= 1"):
        DecodeConfig(beam_size=0)


def test_translate_texts_needs_the_kiln_special_tokens() -> None:
    bare = Tokenizer(WordLevel({"[UNK]": 0, "1": 1}, unk_token="[UNK]"))
    with pytest.raises(ValueError, match=r"tokenizer has no \[PAD\] token"):
        translate_texts(
            CopyModel(),
            bare,
            ["1"],
            beam_size=1,
            length_penalty="none",
            alpha=1.0,
            max_len=4,
            batch_size=1,
        )
