from __future__ import annotations

import pytest
import torch
from torch import nn

from data_pipeline.configlib import from_preset
from pretrain.models.bert import BertConfig, BertForPreTraining
from pretrain.models.gpt import GPTConfig, GPTLMHeadModel
from pretrain.models.meta import build_on_meta, materialize, num_parameters


def shapes(model: nn.Module) -> dict[str, torch.Size]:
    return {k: v.shape for k, v in model.state_dict().items()}


@pytest.mark.parametrize(
    "cls, cfg",
    [
        (BertForPreTraining, from_preset(BertConfig, "tiny", vocab_size=40)),
        (GPTLMHeadModel, from_preset(GPTConfig, "tiny", vocab_size=40, add_cross_attention=True)),
    ],
)
def test_meta_build_then_init_matches_a_normal_build(cls: type[nn.Module], cfg: object) -> None:
    model = build_on_meta(cls, cfg)
    assert all(p.device.type == "meta" for p in model.parameters())
    reference = cls(cfg)
    assert num_parameters(model) == num_parameters(reference)
    assert shapes(model) == shapes(reference)

    torch.manual_seed(0)
    materialize(model, "cpu")
    assert all(p.device.type == "cpu" and torch.isfinite(p).all() for p in model.parameters())
    assert num_parameters(model) == num_parameters(
        reference
    )  # still tied: the head shares the embedding
    for name, p in model.named_parameters():
        if name.endswith("bias"):
            assert torch.all(p == 0), name
        elif "LayerNorm" in name or "ln_" in name:
            assert torch.all(p == 1), name
        else:
            assert 0.002 < p.std().item() < 0.03, (
                name
            )  # N(0, 0.02), residual projections scaled down

    # Initialisation is the models' own: the same seed gives the same weights as a normal build.
    torch.manual_seed(0)
    reference.init_weights()
    for (name, a), b in zip(
        model.state_dict().items(), reference.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


def test_meta_bert_ties_and_runs() -> None:
    model = materialize(
        build_on_meta(BertForPreTraining, from_preset(BertConfig, "tiny", vocab_size=40))
    )
    emb = model.bert.embeddings.word_embeddings.weight
    assert model.cls.predictions.decoder.weight is emb
    assert torch.all(emb[0] == 0)  # [PAD] row
    out = model(torch.randint(5, 40, (2, 6)))
    assert torch.isfinite(out.mlm_logits).all()


def test_materialize_needs_init_weights() -> None:
    with pytest.raises(TypeError, match="init_weights"):
        materialize(build_on_meta(nn.LayerNorm, 3))


def test_base_presets_have_the_published_sizes() -> None:
    """Counted on the meta device (no memory): BERT-base ~110M (Devlin et al.), GPT-2 small 124M."""
    bert = build_on_meta(BertForPreTraining, from_preset(BertConfig, "base"))
    assert num_parameters(bert.bert) == 109_482_240  # HF bert-base-uncased BertModel
    gpt = build_on_meta(GPTLMHeadModel, from_preset(GPTConfig, "base"))
    assert num_parameters(gpt) == 124_439_808  # HF gpt2
