"""pretrain.flops against PyTorch's own FLOP counter, the GPU peak table, the matmul measurement, and train/mfu."""

from __future__ import annotations

import math

import pytest
import torch
from kiln_testlib import fit_steps
from torch.utils.flop_counter import FlopCounterMode

from pretrain.flops import (
    decoder_flops_per_token,
    encoder_flops_per_token,
    gpu_peak_flops,
    measure_matmul_flops,
    peak_flops,
    precision_family,
)
from pretrain.models.bert import BertConfig, BertForPreTraining
from pretrain.models.gpt import GPTConfig, GPTLMHeadModel
from pretrain.module import BertPretrainModule, GPTPretrainModule
from pretrain.objectives import clm_loss, masked_positions_from_labels, mlm_nsp_loss
from pretrain.optim import OptimConfig

V, B, T = 100, 3, 10
BERT = BertConfig(
    vocab_size=V,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=48,
    max_position_embeddings=16,
)
GPT = GPTConfig(vocab_size=V, n_embd=32, n_layer=2, n_head=2, n_positions=16)


def _mlm_batch(masked: list[tuple[int, int]]) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(7, V, (B, T), generator=gen)
    labels = torch.full_like(ids, -100)
    for row, col in masked:
        labels[row, col] = ids[row, col]
    return {
        "input_ids": ids,
        "token_type_ids": torch.zeros_like(ids),
        "attention_mask": torch.ones_like(ids),
        "mlm_labels": labels,
        "next_sentence_label": torch.tensor([0, 1, 0]),
        "sample_id": torch.arange(B),
    }


@pytest.mark.parametrize(
    "masked", [[(0, 3), (1, 3), (2, 3), (0, 5)], [(r, c) for r in range(B) for c in (1, 2, 6)]]
)
def test_encoder_formula_equals_torch_flop_counter(masked: list[tuple[int, int]]) -> None:
    """Forward + backward of Kiln's BERT step, counted op by op by torch, is exactly the formula: the MLM head
    only at the masked positions, attention over T, pooler + NSP once per sequence."""
    batch, model = _mlm_batch(masked), BertForPreTraining(BERT)
    with FlopCounterMode(display=False) as counter:
        positions = masked_positions_from_labels(batch["mlm_labels"])
        out = model(
            batch["input_ids"],
            token_type_ids=batch["token_type_ids"],
            attention_mask=batch["attention_mask"],
            masked_positions=positions,
        )
        labels, nsp = batch["mlm_labels"], batch["next_sentence_label"]
        mlm_nsp_loss(out, labels, nsp, masked_positions=positions)["loss"].backward()
    expected = encoder_flops_per_token(BERT, T, len(masked) / (B * T)) * B * T
    assert counter.get_total_flops() == pytest.approx(expected, rel=1e-12)


def test_decoder_formula_equals_torch_flop_counter() -> None:
    ids = torch.randint(7, V, (B, T), generator=torch.Generator().manual_seed(1))
    model = GPTLMHeadModel(GPT)
    with FlopCounterMode(display=False) as counter:
        logits, _ = model(ids)
        clm_loss(logits, ids)["loss"].backward()
    assert counter.get_total_flops() == pytest.approx(
        decoder_flops_per_token(GPT, T) * B * T, rel=1e-12
    )


def test_formula_matches_palm_6n_plus_12lhqt_for_a_decoder() -> None:
    """With the LM head counted as N's tied embedding matrix, GPT's count is PaLM's 6N + 12·L·H·Q·T."""
    cfg = GPTConfig(vocab_size=50257, n_embd=768, n_layer=12, n_head=12)
    d, L_ = cfg.n_embd, cfg.n_layer
    n_matmul = (
        L_ * (4 * d * d + 2 * d * 4 * d) + d * cfg.vocab_size
    )  # weights a token multiplies with
    assert decoder_flops_per_token(cfg, 1024) == pytest.approx(
        6 * n_matmul + 12 * L_ * cfg.n_head * 64 * 1024
    )


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="seq_len"):
        encoder_flops_per_token(BERT, 0)
    with pytest.raises(ValueError, match="masked_fraction"):
        encoder_flops_per_token(BERT, 8, 1.5)
    with pytest.raises(ValueError, match="cross-attention"):
        decoder_flops_per_token(
            GPTConfig(vocab_size=V, n_embd=32, n_layer=1, n_head=2, add_cross_attention=True), 8
        )


@pytest.mark.parametrize(
    ("name", "precision", "expected"),
    [
        ("NVIDIA H100 80GB HBM3", "bf16-mixed", 989.4e12),
        ("NVIDIA H100 PCIe", "bf16-mixed", 756.5e12),
        ("NVIDIA H100 NVL", "16-mixed", 835.5e12),
        ("NVIDIA H200", "bf16-true", 989.4e12),
        ("NVIDIA A100-SXM4-80GB", "bf16-mixed", 312e12),
        ("NVIDIA A100 80GB PCIe", "32-true", 19.5e12),
        ("NVIDIA H100 80GB HBM3", "32-true", 67e12),
        ("Tesla T4", "bf16-mixed", None),
    ],
)
def test_gpu_peak_table(name: str, precision: str, expected: float | None) -> None:
    assert gpu_peak_flops(name, precision) == expected


def test_precision_family() -> None:
    assert [precision_family(p) for p in ("32-true", "bf16-mixed", "16-mixed", "64-true")] == [
        "fp32",
        "bf16",
        "bf16",
        "fp32",
    ]


def test_matmul_measurement_is_positive_and_leaves_the_global_rng_alone() -> None:
    torch.set_num_threads(1)
    before = torch.get_rng_state()
    flops = measure_matmul_flops(n=128, seconds=0.05)
    assert torch.equal(torch.get_rng_state(), before)
    assert (
        math.isfinite(flops) and 1e7 < flops < 1e13
    )  # one core: between 10 MFLOP/s and 10 TFLOP/s
    value, source = peak_flops(None, torch.device("cpu"), "32-true")
    assert value > 0 and source.startswith("measured (CPU fp32")
    assert peak_flops(2.5e12, torch.device("cpu"), "32-true") == (2.5e12, "configured")


def test_mfu_is_logged_next_to_tokens_per_s_with_the_same_window() -> None:
    torch.set_num_threads(1)
    batches = [_mlm_batch([(0, 3), (1, 4), (2, 5)]) for _ in range(3)]
    module = BertPretrainModule(BERT, OptimConfig(warmup_steps=1), 3)
    module.peak_flops = 1e9
    metrics = fit_steps(module, batches).callback_metrics
    per_token = encoder_flops_per_token(BERT, T, 3 / (B * T))
    # Same tokens and seconds: mfu = tokens/s × FLOPs per token / peak (world size 1).
    assert float(metrics["train/mfu"]) == pytest.approx(
        float(metrics["train/tokens_per_s"]) * per_token / 1e9, rel=1e-5
    )
    gpt = GPTPretrainModule(GPT, OptimConfig(warmup_steps=1), 2)  # no peak: no train/mfu
    ids = torch.randint(7, V, (B, T + 1))
    batch = {"input_ids": ids[:, :-1], "labels": ids[:, 1:], "sample_id": torch.arange(B)}
    metrics = fit_steps(gpt, [batch] * 2).callback_metrics
    assert "train/tokens_per_s" in metrics and "train/mfu" not in metrics
