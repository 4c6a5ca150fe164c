"""Kiln's BERT and GPT-2 against Hugging Face's on tiny random configs: same weights, same logits.

This is what makes the state-dict names a table: HF's tensors load into Kiln's modules with no renaming
(GPT-2's Conv1D weights transposed), and the outputs agree to float precision.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from pretrain.models.bert import BertConfig, BertForPreTraining
from pretrain.models.gpt import GPTConfig, GPTLMHeadModel

transformers = pytest.importorskip("transformers")

# HF GPT-2 projections are Conv1D modules storing weight as (in, out); Kiln's nn.Linear stores (out, in).
GPT2_CONV1D = (
    "attn.c_attn.weight",
    "attn.c_proj.weight",
    "mlp.c_fc.weight",
    "mlp.c_proj.weight",
    "crossattention.q_attn.weight",
    "crossattention.c_attn.weight",
    "crossattention.c_proj.weight",
)


def hf_gpt2_to_kiln(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k: v.t() if k.endswith(GPT2_CONV1D) else v for k, v in state_dict.items()}


def test_bert_matches_transformers() -> None:
    torch.manual_seed(0)
    sizes = dict(
        vocab_size=99,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=37,
        max_position_embeddings=64,
    )
    hf = transformers.BertForPreTraining(transformers.BertConfig(**sizes, hidden_act="gelu")).eval()
    ours = BertForPreTraining(BertConfig(**sizes)).eval()
    hf_state = hf.state_dict()
    # HF keeps a second handle on the output bias (decoder.bias is cls.predictions.bias); Kiln stores it once.
    assert torch.equal(
        hf_state.pop("cls.predictions.decoder.bias"), hf_state["cls.predictions.bias"]
    )
    ours.load_state_dict(hf_state, strict=True)

    ids = torch.randint(5, 99, (3, 10))
    types = (torch.arange(10) >= 5).long().expand(3, 10)
    mask = torch.ones(3, 10, dtype=torch.long)
    mask[1, 6:] = 0
    with torch.no_grad():
        expected = hf(input_ids=ids, token_type_ids=types, attention_mask=mask)
        got = ours(ids, token_type_ids=types, attention_mask=mask)
        seq, pooled = ours.bert(ids, token_type_ids=types, attention_mask=mask)
        hf_base = hf.bert(input_ids=ids, token_type_ids=types, attention_mask=mask)
    torch.testing.assert_close(got.mlm_logits, expected.prediction_logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        got.nsp_logits, expected.seq_relationship_logits, atol=1e-5, rtol=1e-5
    )
    torch.testing.assert_close(seq, hf_base.last_hidden_state, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pooled, hf_base.pooler_output, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("cross", [False, True])
def test_gpt2_matches_transformers(cross: bool) -> None:
    torch.manual_seed(0)
    sizes = dict(
        vocab_size=99, n_positions=64, n_embd=32, n_layer=2, n_head=4, add_cross_attention=cross
    )
    hf_config = transformers.GPT2Config(**sizes, bos_token_id=0, eos_token_id=0)
    hf = transformers.GPT2LMHeadModel(hf_config).eval()
    ours = GPTLMHeadModel(GPTConfig(**sizes)).eval()
    ours.load_state_dict(hf_gpt2_to_kiln(hf.state_dict()), strict=True)
    assert ours.lm_head.weight is ours.transformer.wte.weight

    ids = torch.randint(0, 99, (2, 9))
    kwargs: dict[str, Tensor] = {}
    if cross:
        kwargs = {
            "encoder_hidden_states": torch.randn(2, 5, 32),
            "encoder_attention_mask": torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]),
        }
    with torch.no_grad():
        expected = hf(input_ids=ids, use_cache=False, **kwargs).logits
        got, _ = ours(ids, **kwargs)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
