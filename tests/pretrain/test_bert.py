from __future__ import annotations

import pytest
import torch

from data_pipeline.configlib import from_preset
from pretrain.models.bert import BertConfig, BertForPreTraining, BertModel
from pretrain.objectives import masked_positions_from_labels, mlm_nsp_loss
from pretrain.optim import OptimConfig, build_optimizer

V = 64
CLS, SEP, MASK = 2, 3, 4


def tiny_config(**overrides: object) -> BertConfig:
    return from_preset(BertConfig, "tiny", vocab_size=V, **overrides)


def eval_model(**overrides: object) -> BertForPreTraining:
    torch.manual_seed(0)
    return BertForPreTraining(tiny_config(**overrides)).eval()


def test_shapes_and_hf_key_names() -> None:
    model = eval_model()
    ids = torch.randint(7, V, (3, 11))
    seq, pooled = model.bert(ids)
    assert seq.shape == (3, 11, 64) and pooled.shape == (3, 64)
    out = model(ids)
    assert out.mlm_logits.shape == (3, 11, V) and out.nsp_logits.shape == (3, 2)
    layer = [
        "attention.self.query",
        "attention.self.key",
        "attention.self.value",
        "attention.output.dense",
        "attention.output.LayerNorm",
        "intermediate.dense",
        "output.dense",
        "output.LayerNorm",
    ]
    expected = {
        "bert.embeddings.word_embeddings.weight",
        "bert.embeddings.position_embeddings.weight",
        "bert.embeddings.token_type_embeddings.weight",
        "cls.predictions.decoder.weight",
        "cls.predictions.bias",
    }
    expected |= {
        f"{m}.{p}"
        for m in [
            "bert.embeddings.LayerNorm",
            "bert.pooler.dense",
            "cls.seq_relationship",
            "cls.predictions.transform.dense",
            "cls.predictions.transform.LayerNorm",
        ]
        for p in ("weight", "bias")
    }
    expected |= {
        f"bert.encoder.layer.{i}.{m}.{p}"
        for i in range(2)
        for m in layer
        for p in ("weight", "bias")
    }
    assert (
        set(model.state_dict()) == expected
    )  # HF BertForPreTraining's names (less its duplicate decoder.bias)


def test_padding_does_not_change_real_token_outputs() -> None:
    model = eval_model()
    real = torch.randint(7, V, (1, 6))
    types = torch.tensor([[0, 0, 0, 1, 1, 1]])
    alone, alone_pooled = model.bert(
        real, token_type_ids=types, attention_mask=torch.ones(1, 6, dtype=torch.long)
    )
    for pad_value in (0, 17):  # whatever sits in the padded slots must be invisible
        padded = torch.cat([real, torch.full((1, 4), pad_value)], dim=1)
        ptypes = torch.cat([types, torch.zeros(1, 4, dtype=torch.long)], dim=1)
        mask = torch.tensor([[1] * 6 + [0] * 4])
        seq, pooled = model.bert(padded, token_type_ids=ptypes, attention_mask=mask)
        torch.testing.assert_close(seq[:, :6], alone, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(pooled, alone_pooled, atol=1e-5, rtol=1e-5)
    # Without the mask the pads are attended to, so the check above is not vacuous.
    seq_unmasked, _ = model.bert(padded, token_type_ids=ptypes)
    assert (seq_unmasked[:, :6] - alone).abs().max() > 1e-3


def test_masked_positions_head_equals_full_head_gathered() -> None:
    model = eval_model()
    ids = torch.randint(7, V, (4, 9))
    labels = torch.full_like(ids, -100)
    labels[0, 1], labels[2, 5], labels[3, 8], labels[3, 0] = 10, 11, 12, 13
    positions = masked_positions_from_labels(labels)
    assert positions.tolist() == [1, 2 * 9 + 5, 3 * 9 + 0, 3 * 9 + 8]
    full = model(ids).mlm_logits.reshape(-1, V)[positions]
    sparse = model(ids, masked_positions=positions)
    assert sparse.mlm_logits.shape == (4, V)
    torch.testing.assert_close(sparse.mlm_logits, full, atol=1e-6, rtol=1e-6)


def test_decoder_is_tied_to_word_embeddings() -> None:
    model = BertForPreTraining(tiny_config())
    emb = model.bert.embeddings.word_embeddings.weight
    assert model.cls.predictions.decoder.weight is emb
    assert torch.all(emb[0] == 0), "the [PAD] row starts at zero, as HF"
    assert sum(p is emb for p in model.parameters()) == 1
    model(torch.randint(7, V, (2, 5))).mlm_logits.sum().backward()
    assert emb.grad is not None and emb.grad.abs().sum() > 0


def test_sequence_longer_than_positions_is_refused() -> None:
    model = eval_model(max_position_embeddings=8)
    with pytest.raises(ValueError, match="max_position_embeddings=8"):
        model(torch.randint(7, V, (1, 9)))


def test_config_validation_and_presets() -> None:
    assert from_preset(BertConfig, "mini").hidden_size == 256
    assert from_preset(BertConfig, "tiny", num_hidden_layers=3).num_hidden_layers == 3
    base = from_preset(BertConfig, "base")
    assert (base.hidden_size, base.num_hidden_layers, base.intermediate_size) == (768, 12, 3072)
    with pytest.raises(ValueError, match="preset"):
        BertConfig(preset="huge")
    with pytest.raises(ValueError, match="divisible"):
        BertConfig(hidden_size=65, num_attention_heads=2)


def synthetic_mlm_nsp_batch(
    gen: torch.Generator, batch: int = 32, half: int = 7
) -> dict[str, torch.Tensor]:
    """Eight "topics" of four token ids each (ids 10..41). A is drawn from one topic; B from the same topic
    (label 0) or another (label 1). A masked token is predictable from its neighbours' topic (best loss
    ln 4 against ln 64 at init), the NSP label from whether A and B share a topic."""
    topic_a = torch.randint(0, 8, (batch, 1), generator=gen)
    label = torch.randint(0, 2, (batch,), generator=gen)
    topic_b = torch.where(
        label[:, None] == 0, topic_a, (topic_a + torch.randint(1, 8, (batch, 1), generator=gen)) % 8
    )
    a = 10 + 4 * topic_a + torch.randint(0, 4, (batch, half), generator=gen)
    b = 10 + 4 * topic_b + torch.randint(0, 4, (batch, half), generator=gen)
    col = torch.zeros(batch, 1, dtype=torch.long)
    ids = torch.cat([col + CLS, a, col + SEP, b, col + SEP], dim=1)
    types = torch.cat([torch.zeros(batch, half + 2), torch.ones(batch, half + 1)], dim=1).long()
    special = (ids == CLS) | (ids == SEP)
    chosen = (torch.rand(ids.shape, generator=gen) < 0.15) & ~special
    labels = torch.where(chosen, ids, torch.full_like(ids, -100))
    return {
        "input_ids": torch.where(chosen, torch.full_like(ids, MASK), ids),
        "token_type_ids": types,
        "attention_mask": torch.ones_like(ids),
        "mlm_labels": labels,
        "next_sentence_label": label,
    }


def test_mlm_nsp_loss_falls_within_100_steps() -> None:
    torch.manual_seed(0)
    model = BertForPreTraining(
        tiny_config(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    )
    opt, sched = build_optimizer(model, OptimConfig(lr=5e-3, warmup_steps=10), total_steps=100)
    gen = torch.Generator().manual_seed(1)
    losses, nsp_losses = [], []
    for _ in range(100):
        batch = synthetic_mlm_nsp_batch(gen)
        positions = masked_positions_from_labels(batch["mlm_labels"])
        out = model(
            batch["input_ids"],
            token_type_ids=batch["token_type_ids"],
            attention_mask=batch["attention_mask"],
            masked_positions=positions,
        )
        metrics = mlm_nsp_loss(
            out, batch["mlm_labels"], batch["next_sentence_label"], masked_positions=positions
        )
        opt.zero_grad()
        metrics["loss"].backward()
        opt.step()
        sched.step()
        losses.append(metrics["mlm_loss"].item())
        nsp_losses.append(metrics["nsp_loss"].item())
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert first > 3.5  # ~ln(64) at init
    assert last < 0.6 * first, (
        first,
        last,
    )  # heading for ln 4 = 1.39 (NSP needs more than 100 steps)
    assert all(torch.isfinite(torch.tensor(nsp_losses)))


def test_bert_model_alone_matches_pretraining_backbone() -> None:
    torch.manual_seed(0)
    encoder = BertModel(tiny_config()).eval()
    full = BertForPreTraining(tiny_config()).eval()
    full.bert.load_state_dict(encoder.state_dict())
    ids = torch.randint(7, V, (2, 7))
    torch.testing.assert_close(encoder(ids)[0], full.bert(ids)[0])
