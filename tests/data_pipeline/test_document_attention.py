"""The no-cross-document option for packed causal-LM blocks: positions restart at each [BOS], attention stays in
the document, and the [EOS] -> next [BOS] label is ignored; a packed document then gets exactly the logits it would
get alone."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cluster.config import load_config
from cluster.jobs import PretrainJob
from data_pipeline.collators import IGNORE_INDEX, ClmCollator
from data_pipeline.configlib import ConfigError, from_preset
from data_pipeline.errors import DataError
from data_pipeline.loader import make_loader
from pretrain.models.gpt import GPTConfig, GPTLMHeadModel

PAD, BOS, EOS = 0, 5, 6


def test_positions_mask_and_labels_follow_document_boundaries() -> None:
    # a block: the tail of a cut document (8 9), then [BOS] 10 11 [EOS], then [BOS] 12 ...
    block = [8, 9, EOS, BOS, 10, 11, EOS, BOS, 12, 13]
    batch = ClmCollator(PAD, bos_id=BOS)([{"sample_id": 0, "input_ids": block}], torch.Generator())
    assert batch["input_ids"].tolist() == [block[:-1]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 2, 3, 0, 1]]
    mask = batch["document_mask"][0]
    docs = [[0, 1, 2], [3, 4, 5, 6], [7, 8]]
    for doc in docs:
        for q in doc:
            assert mask[q].nonzero().flatten().tolist() == [
                k for k in doc if k <= q
            ]  # causal, own document only
    # the label after each [EOS] is the next document's [BOS]: not a prediction across documents
    assert batch["labels"].tolist() == [[9, EOS, IGNORE_INDEX, 10, 11, EOS, IGNORE_INDEX, 12, 13]]
    plain = ClmCollator(PAD)([{"sample_id": 0, "input_ids": block}], torch.Generator())
    assert set(plain) == {"input_ids", "labels", "sample_id"} and plain["labels"].tolist() == [
        block[1:]
    ]


def test_a_packed_document_gets_the_logits_it_gets_alone() -> None:
    torch.manual_seed(0)
    model = GPTLMHeadModel(from_preset(GPTConfig, "tiny", vocab_size=20, n_positions=32)).eval()
    first, second = [BOS, 7, 8, 9, EOS], [BOS, 10, 11, 12, 13, EOS]
    block = first + second + [PAD]  # T + 1 tokens
    batch = ClmCollator(PAD, bos_id=BOS)([{"sample_id": 0, "input_ids": block}], torch.Generator())
    with torch.no_grad():
        packed, _ = model(
            batch["input_ids"],
            position_ids=batch["position_ids"],
            document_mask=batch["document_mask"],
        )
        alone, _ = model(torch.tensor([second]))
        leaky, _ = model(batch["input_ids"])  # plain packing: the second document sees the first
    n = len(first)
    torch.testing.assert_close(packed[0, n : n + len(second)], alone[0], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(leaky[0, n : n + len(second)], alone[0], atol=1e-3)


def test_document_mask_refuses_a_cache_and_other_tasks(data_dir: Path) -> None:
    model = GPTLMHeadModel(from_preset(GPTConfig, "tiny", vocab_size=20, n_positions=32))
    ids = torch.tensor([[BOS, 7, 8]])
    with pytest.raises(ValueError, match="not cached decoding"):
        model(
            ids,
            use_cache=True,
            position_ids=torch.arange(3)[None],
            document_mask=torch.ones(1, 3, 3).bool(),
        )
    with pytest.raises(
        DataError, match="document_attention applies to the clm task, not 'classification'"
    ):
        make_loader(data_dir, "classification", "train", 4, document_attention=True)
    with pytest.raises(ConfigError, match="'document_attention' applies to task clm"):
        load_config(PretrainJob, None, ["document_attention=true"])
