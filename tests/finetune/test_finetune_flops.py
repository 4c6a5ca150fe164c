"""finetune.flops against PyTorch's own FLOP counter (every fine-tuning architecture, forward + backward), against
the analytic 6N + attention count of the Transformer family, and train/mfu of the fine-tuning modules."""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import lightning as L
import pytest
import torch
from kiln_testlib import fit_steps
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from data_pipeline.configlib import from_preset
from finetune.flops import FLOPS, BatchShape, training_flops
from finetune.models import CLASSIFICATION_ARCHES, TRANSLATION_ARCHES
from finetune.models.classifier import (
    ClassifierConfig,
    DecoderClassifier,
    EncoderClassifier,
    GPTClassifierConfig,
    LSTMClassifier,
    LSTMClassifierConfig,
)
from finetune.models.convs2s import ConvS2S, ConvS2SConfig
from finetune.models.rnn import RNNSeq2Seq, RNNSeq2SeqConfig
from finetune.models.seq2seq import Seq2SeqConfig, WarmStartedSeq2Seq
from finetune.models.transformer import TransformerConfig, TransformerSeq2Seq
from finetune.module import (
    ClassificationModule,
    TranslationModule,
    classification_loss,
    translation_loss,
)
from finetune.scheduled_sampling import ScheduledSampling
from pretrain.models.bert import BertConfig
from pretrain.models.gpt import GPTConfig
from pretrain.optim import OptimConfig

V, B, S, U = 50, 3, 7, 5
BERT = BertConfig(
    vocab_size=V,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=48,
    max_position_embeddings=16,
)
GPT = GPTConfig(vocab_size=V, n_embd=24, n_layer=2, n_head=2, n_positions=16)
LSTM = dict(vocab_size=V, embedding_dim=6, hidden_size=8, num_layers=2, tie_embeddings=False)
TRANSLATION = {
    "transformer": TransformerConfig(
        vocab_size=V,
        d_model=16,
        n_heads=2,
        d_ff=24,
        encoder_layers=2,
        decoder_layers=3,
        max_positions=16,
    ),
    "seq2seq_warm": Seq2SeqConfig(
        encoder=BERT, decoder=dataclasses.replace(GPT, add_cross_attention=True)
    ),
    "lstm": RNNSeq2SeqConfig(**LSTM),
    "lstm_unidirectional": RNNSeq2SeqConfig(**{**LSTM, "num_layers": 1}, bidirectional=False),
    "lstm_bahdanau": RNNSeq2SeqConfig(arch="lstm_attention", attention="bahdanau", **LSTM),
    "lstm_luong_dot": RNNSeq2SeqConfig(arch="lstm_attention", attention="luong_dot", **LSTM),
    "lstm_luong_general": RNNSeq2SeqConfig(
        arch="lstm_attention", attention="luong_general", **{**LSTM, "num_layers": 1}
    ),
    "convs2s": ConvS2SConfig(
        vocab_size=V, embed_dim=8, channels=12, encoder_layers=2, decoder_layers=2, max_positions=16
    ),
}
CLASSIFICATION = {
    "bert_classifier": ClassifierConfig(encoder=BERT, num_labels=3),
    "gpt_classifier": GPTClassifierConfig(decoder=GPT, num_labels=3),
    "lstm_classifier": LSTMClassifierConfig(
        vocab_size=V, embedding_dim=6, hidden_size=8, num_layers=2, num_labels=3
    ),
}
MODELS: dict[type, type[nn.Module]] = {
    TransformerConfig: TransformerSeq2Seq,
    Seq2SeqConfig: WarmStartedSeq2Seq,
    RNNSeq2SeqConfig: RNNSeq2Seq,
    ConvS2SConfig: ConvS2S,
    ClassifierConfig: EncoderClassifier,
    GPTClassifierConfig: DecoderClassifier,
    LSTMClassifierConfig: LSTMClassifier,
}


@contextmanager
def counted() -> Iterator[FlopCounterMode]:
    """FlopCounterMode sees matmuls only where they are separate ops: on CPU it has no formula for the fused
    flash-attention kernel, nor for oneDNN's fused LSTM, so both are switched to their plain implementations."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message="TF32 acceleration on top of oneDNN"
        )  # said on leaving flags()
        with (
            sdpa_kernel(SDPBackend.MATH),
            torch.backends.mkldnn.flags(enabled=False),
            FlopCounterMode(display=False) as counter,
        ):
            yield counter


def _ids(shape: tuple[int, int], seed: int) -> torch.Tensor:
    return torch.randint(4, V, shape, generator=torch.Generator().manual_seed(seed))


def test_every_finetuning_architecture_has_a_count() -> None:
    covered = {name for name in (*TRANSLATION_ARCHES, *CLASSIFICATION_ARCHES) if name in FLOPS}
    assert covered == {*TRANSLATION_ARCHES, *CLASSIFICATION_ARCHES}
    assert (
        training_flops(BERT, BatchShape(1, 1, 1)) is None
    )  # no count: no MFU rather than a wrong one


@pytest.mark.parametrize("name", sorted(TRANSLATION))
def test_translation_count_equals_torch_flop_counter(name: str) -> None:
    """Forward + backward of a teacher-forced step, counted op by op by torch, is exactly the formula (a batch
    without padding: padding is never counted, while the model computes it)."""
    torch.manual_seed(0)
    cfg = TRANSLATION[name]
    model, src, tgt = MODELS[type(cfg)](cfg), _ids((B, S), 1), _ids((B, U + 1), 2)
    with counted() as counter:
        logits = model(src, torch.ones_like(src), tgt[:, :-1])
        translation_loss(logits, tgt[:, 1:], 0.1)["loss"].backward()
    expected = training_flops(cfg, BatchShape(B, B * S, S, B * U, U))
    assert counter.get_total_flops() == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("name", sorted(CLASSIFICATION))
def test_classification_count_equals_torch_flop_counter(name: str) -> None:
    torch.manual_seed(0)
    cfg = CLASSIFICATION[name]
    model, ids = MODELS[type(cfg)](cfg), _ids((B, S), 3)
    with counted() as counter:
        logits = model(ids, torch.ones_like(ids))
        classification_loss(logits, torch.tensor([0, 1, 2]))["loss"].backward()
    assert counter.get_total_flops() == pytest.approx(
        training_flops(cfg, BatchShape(B, B * S, S)), rel=1e-12
    )


def test_padded_lstm_batch_stays_within_the_stated_bound() -> None:
    """Packed LSTMs run real tokens only, so on a padded batch torch's count differs from the formula by nothing
    but the zero-state gradient its packed reverse direction computes for rows shorter than the longest:
    at most 2·4H·H per such row and layer (finetune/flops.py)."""
    cfg = CLASSIFICATION["lstm_classifier"]
    model, ids = LSTMClassifier(cfg), _ids((B, S), 4)
    mask = (torch.arange(S) < torch.tensor([[S], [4], [2]])).long()
    with counted() as counter:
        classification_loss(model(ids, mask), torch.tensor([0, 1, 2]))["loss"].backward()
    formula = training_flops(cfg, BatchShape(B, int(mask.sum()), S))
    H = cfg.hidden_size
    assert 0 <= counter.get_total_flops() - formula <= (B - 1) * cfg.num_layers * 2 * 4 * H * H


def _weights(module: nn.Module, skip: tuple[str, ...] = ()) -> int:
    """Elements of the matmul weights of `module` (Linear, and a tied output embedding is added by the caller)."""
    return sum(
        m.weight.numel()
        for name, m in module.named_modules()
        if isinstance(m, nn.Linear) and not any(part in name for part in skip)
    )


def test_transformer_is_6n_plus_attention() -> None:
    """PaLM's 6N + 12·L·H·Q·T with N read off the model: a source token passes the encoder's matrices and every
    decoder layer's cross-attention K, V; a target token the rest of the decoder and the tied output embedding."""
    cfg = from_preset(TransformerConfig, "small", vocab_size=8000)
    model = TransformerSeq2Seq(cfg)
    cross_kv = sum(
        _weights(layer.cross_attn, ("q_proj", "out_proj")) for layer in model.decoder_layers
    )
    n_src = _weights(model.encoder_layers) + cross_kv
    n_tgt = _weights(model.decoder_layers) - cross_kv + model.embed_tokens.weight.numel()
    b = BatchShape(sequences=32, src_tokens=700, src_len=30, tgt_tokens=650, tgt_len=28)
    d, le, ld = cfg.d_model, cfg.encoder_layers, cfg.decoder_layers
    attention = (
        12 * d * (le * b.src_tokens * b.src_len + ld * b.tgt_tokens * (b.tgt_len + b.src_len))
    )
    assert training_flops(cfg, b) == pytest.approx(
        6 * (b.src_tokens * n_src + b.tgt_tokens * n_tgt) + attention
    )


def test_warm_started_is_6n_plus_attention_plus_the_frozen_pooler() -> None:
    enc = BertConfig(
        vocab_size=V,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=96,
    )
    dec = GPTConfig(vocab_size=V, n_embd=48, n_layer=3, n_head=2, add_cross_attention=True)
    cfg = Seq2SeqConfig(encoder=enc, decoder=dec)
    model = WarmStartedSeq2Seq(cfg)
    cross_kv = sum(
        block.crossattention.c_attn.weight.numel() for block in model.decoder.transformer.h
    )
    n_src = _weights(model.encoder, ("pooler",)) + model.enc_to_dec_proj.weight.numel() + cross_kv
    n_tgt = _weights(model.decoder) - cross_kv  # lm_head included
    b = BatchShape(sequences=4, src_tokens=50, src_len=14, tgt_tokens=40, tgt_len=12)
    attention = 12 * (
        enc.num_hidden_layers * enc.hidden_size * b.src_tokens * b.src_len
        + dec.n_layer * dec.n_embd * b.tgt_tokens * (b.tgt_len + b.src_len)
    )
    pooler = 2 * enc.hidden_size**2 * b.sequences  # forward only: frozen, never reaches the loss
    expected = 6 * (b.src_tokens * n_src + b.tgt_tokens * n_tgt) + attention + pooler
    assert training_flops(cfg, b) == pytest.approx(expected)


def _fit(
    module: L.LightningModule, batches: list[dict[str, torch.Tensor]]
) -> dict[str, torch.Tensor]:
    module.peak_flops = 1e9
    return fit_steps(module, batches).callback_metrics


def _translation_batch() -> dict[str, torch.Tensor]:
    src, tgt = _ids((B, S), 5), _ids((B, U + 1), 6)
    src_mask = torch.ones_like(src)
    src_mask[2, 5:] = 0
    tgt_out = tgt[:, 1:].clone()
    tgt_out[1, 3:] = -100
    return {
        "src_ids": src * src_mask,
        "src_mask": src_mask,
        "tgt_in": tgt[:, :-1],
        "tgt_out": tgt_out,
        "sample_id": torch.arange(B),
    }


@pytest.mark.parametrize("sampling", [None, ScheduledSampling(max_prob=0.5, ramp_steps=1)])
def test_translation_module_logs_mfu(sampling: ScheduledSampling | None) -> None:
    torch.manual_seed(0)
    cfg = TRANSLATION["transformer"]
    module = TranslationModule(
        TransformerSeq2Seq(cfg), OptimConfig(warmup_steps=1), 2, scheduled_sampling=sampling
    )
    batch = _translation_batch()
    metrics = _fit(module, [batch, batch])
    tokens = 19 + 13  # real source tokens, target tokens with a label
    per_token = training_flops(cfg, BatchShape(B, 19, S, 13, U)) / tokens
    if (
        sampling is not None
    ):  # step 2 sampled (p = 0.5): one more forward pass, a third of a training step
        per_token *= 4 / 3
    assert module.flops_per_token(batch) == pytest.approx(per_token)
    # Same tokens and seconds as tokens/s: mfu = tokens/s × FLOPs per token / peak (world size 1).
    assert float(metrics["train/mfu"]) == pytest.approx(
        float(metrics["train/tokens_per_s"]) * per_token / 1e9, rel=1e-5
    )


def test_classification_module_logs_mfu() -> None:
    torch.manual_seed(0)
    cfg = CLASSIFICATION["lstm_classifier"]
    ids, mask = _ids((B, S), 7), torch.ones(B, S, dtype=torch.long)
    mask[0, 4:] = 0
    batch = {
        "input_ids": ids * mask,
        "attention_mask": mask,
        "labels": torch.tensor([0, 2, 1]),
        "sample_id": torch.arange(B),
    }
    metrics = _fit(
        ClassificationModule(LSTMClassifier(cfg), OptimConfig(warmup_steps=1), 2), [batch, batch]
    )
    per_token = training_flops(cfg, BatchShape(B, 18, S)) / 18
    assert float(metrics["train/mfu"]) == pytest.approx(
        float(metrics["train/tokens_per_s"]) * per_token / 1e9, rel=1e-5
    )
