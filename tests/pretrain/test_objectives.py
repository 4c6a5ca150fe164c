from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from data_pipeline.configlib import from_preset
from pretrain.models.bert import BertPreTrainingOutput
from pretrain.models.gpt import GPTConfig
from pretrain.module import GPTPretrainModule
from pretrain.objectives import (
    clm_loss,
    fused_clm_applies,
    fused_clm_loss,
    masked_positions_from_labels,
    mlm_nsp_loss,
)
from pretrain.optim import OptimConfig


def test_masked_positions_index_the_flattened_labels() -> None:
    labels = torch.tensor([[-100, 7, -100], [9, -100, 4]])
    assert masked_positions_from_labels(labels).tolist() == [1, 3, 5]
    assert masked_positions_from_labels(torch.full((2, 3), -100)).numel() == 0


def test_mlm_nsp_loss_against_hand_computation() -> None:
    torch.manual_seed(0)
    mlm_logits = torch.randn(2, 3, 5)
    nsp_logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    labels = torch.tensor([[-100, 1, -100], [3, -100, -100]])
    nsp_label = torch.tensor([0, 0])
    out = mlm_nsp_loss(BertPreTrainingOutput(mlm_logits, nsp_logits), labels, nsp_label)
    expected_mlm = (
        F.cross_entropy(mlm_logits[0, 1:2], torch.tensor([1]))
        + F.cross_entropy(mlm_logits[1, 0:1], torch.tensor([3]))
    ) / 2
    expected_nsp = (math.log(1 + math.exp(-2.0)) + math.log(1 + math.exp(1.0))) / 2
    torch.testing.assert_close(out["mlm_loss"], expected_mlm)
    assert out["nsp_loss"].item() == pytest.approx(expected_nsp, rel=1e-6)
    assert out["loss"].item() == pytest.approx(expected_mlm.item() + expected_nsp, rel=1e-6)
    assert out["nsp_acc"].item() == 0.5  # row 1 predicts class 1
    expected_acc = (
        (mlm_logits[0, 1].argmax() == 1).float() + (mlm_logits[1, 0].argmax() == 3).float()
    ) / 2
    assert out["mlm_acc"].item() == expected_acc.item()
    assert out["mlm_ppl"].item() == pytest.approx(math.exp(expected_mlm.item()), rel=1e-6)
    assert not out["mlm_acc"].requires_grad

    # The masked-positions form gives the same numbers.
    positions = masked_positions_from_labels(labels)
    sparse = BertPreTrainingOutput(mlm_logits.reshape(-1, 5)[positions], nsp_logits)
    out2 = mlm_nsp_loss(sparse, labels, nsp_label, masked_positions=positions)
    for key in out:
        torch.testing.assert_close(out2[key], out[key])


def test_no_masked_token_gives_zero_not_nan() -> None:
    logits = torch.randn(0, 5, requires_grad=True)
    out = mlm_nsp_loss(
        BertPreTrainingOutput(logits, torch.zeros(1, 2)),
        torch.full((1, 4), -100),
        torch.tensor([1]),
        masked_positions=torch.zeros(0, dtype=torch.long),
    )
    assert out["mlm_loss"].item() == 0.0 and torch.isfinite(out["loss"])
    out["loss"].backward()  # still differentiable


def test_clm_loss_ignores_minus_100() -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 6, requires_grad=True)
    labels = torch.tensor([[1, 2, 3, -100], [0, 5, -100, -100]])
    out = clm_loss(logits, labels)
    keep = labels != -100
    expected = F.cross_entropy(logits[keep], labels[keep])
    torch.testing.assert_close(out["loss"], expected)
    assert out["acc"].item() == pytest.approx(
        (logits[keep].argmax(-1) == labels[keep]).float().mean().item()
    )
    assert out["ppl"].item() == pytest.approx(math.exp(expected.item()), rel=1e-6)
    out["loss"].backward()
    assert logits.grad is not None and torch.all(logits.grad[0, 3] == 0)


def test_shape_mismatches_are_reported() -> None:
    with pytest.raises(ValueError, match="labels"):
        clm_loss(torch.randn(2, 4, 6), torch.zeros(2, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="masked positions"):
        mlm_nsp_loss(
            BertPreTrainingOutput(torch.randn(3, 5), torch.zeros(1, 2)),
            torch.tensor([[1, -100]]),
            torch.tensor([0]),
            masked_positions=torch.tensor([0]),
        )


def _nsp_case() -> tuple[BertPreTrainingOutput, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    out = BertPreTrainingOutput(
        torch.randn(2, 3, 5, requires_grad=True), torch.randn(2, 2, requires_grad=True)
    )
    return out, torch.tensor([[-100, 1, -100], [3, -100, 4]]), torch.tensor([0, 1])


def test_nsp_weight_0_is_the_mlm_loss_and_sends_nsp_a_zero_gradient() -> None:
    out, labels, nsp_label = _nsp_case()
    metrics = mlm_nsp_loss(out, labels, nsp_label, nsp_weight=0.0)
    assert torch.equal(metrics["loss"], metrics["mlm_loss"])
    assert metrics["nsp_loss"] > 0 and 0 <= metrics["nsp_acc"] <= 1  # still measured
    metrics["loss"].backward()
    # a gradient (so DDP sees the NSP head used), and an exactly zero one
    assert out.nsp_logits.grad is not None and torch.count_nonzero(out.nsp_logits.grad) == 0
    assert torch.count_nonzero(out.mlm_logits.grad) > 0


def test_nsp_weight_scales_the_nsp_term_only() -> None:
    out, labels, nsp_label = _nsp_case()
    full = mlm_nsp_loss(out, labels, nsp_label)
    half = mlm_nsp_loss(out, labels, nsp_label, nsp_weight=0.5)
    torch.testing.assert_close(half["loss"], full["mlm_loss"] + 0.5 * full["nsp_loss"])
    # 1: BERT's sum, bit for bit
    assert torch.equal(full["loss"], full["mlm_loss"] + full["nsp_loss"])
    for key in ("mlm_loss", "nsp_loss", "mlm_acc", "nsp_acc", "mlm_ppl"):
        assert torch.equal(half[key], full[key])


def _fused_case(
    dtype: torch.dtype = torch.float64,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    hidden = torch.randn(3, 5, 4, dtype=dtype, requires_grad=True)
    weight = torch.randn(11, 4, dtype=dtype, requires_grad=True)
    labels = torch.randint(0, 11, (3, 5))
    labels[0, :2] = -100
    labels[2, 4] = -100
    return hidden, weight, labels


@pytest.mark.parametrize("chunk", [1, 4, 7, 15, 512])  # rows in a chunk: one, not dividing 15, all
def test_fused_clm_loss_matches_head_then_clm_loss(chunk: int) -> None:
    hidden, weight, labels = _fused_case()
    logits = hidden @ weight.T
    ref = clm_loss(logits, labels)  # acc; its loss is fp32, so float64's comes from F.cross_entropy
    ref["loss"] = F.cross_entropy(logits.reshape(-1, 11), labels.reshape(-1), ignore_index=-100)
    ref["ppl"] = torch.exp(ref["loss"].detach())
    # A scale on the loss must reach the gradients the fused loss computes in its forward.
    (3.0 * ref["loss"]).backward()
    ref_grads = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    out = fused_clm_loss(hidden, weight, labels, chunk=chunk)
    (3.0 * out["loss"]).backward()
    for key in ("loss", "acc", "ppl"):
        torch.testing.assert_close(out[key], ref[key], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(hidden.grad, ref_grads[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(weight.grad, ref_grads[1], rtol=1e-12, atol=1e-12)
    assert torch.all(hidden.grad[0, :2] == 0)  # rows without a label get no gradient


def test_fused_clm_loss_without_grad_and_without_labels() -> None:
    hidden, weight, labels = _fused_case()
    with torch.no_grad():
        out = fused_clm_loss(hidden, weight, labels, chunk=4)
    logits = (hidden @ weight.T).detach().reshape(-1, 11)
    expected = F.cross_entropy(logits, labels.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out["loss"], expected, rtol=1e-12, atol=1e-12)
    assert not out["loss"].requires_grad
    unlabelled = fused_clm_loss(hidden, weight, torch.full((3, 5), -100))
    assert unlabelled["loss"].item() == 0.0 and unlabelled["acc"].item() == 0.0
    unlabelled["loss"].backward()
    assert torch.all(weight.grad == 0) and torch.all(hidden.grad == 0)
    with pytest.raises(ValueError, match="labels"):
        fused_clm_loss(hidden, weight, labels[:, :4])


def test_fused_clm_applies_to_fp32_training_only() -> None:
    weight = torch.zeros(3, 2)
    assert fused_clm_applies(weight)
    assert not fused_clm_applies(weight.bfloat16())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not fused_clm_applies(weight)
    partitioned = torch.nn.Parameter(torch.zeros(3, 2))
    partitioned.ds_id = 0  # what DeepSpeed's ZeRO-3 sets on the parameters it partitions
    assert not fused_clm_applies(partitioned)


def test_gpt_module_trains_with_the_fused_loss_as_with_logits() -> None:
    cfg = from_preset(GPTConfig, "tiny", vocab_size=37, n_positions=16)
    module = GPTPretrainModule(cfg, OptimConfig(lr=1e-3, warmup_steps=0), total_steps=10)
    batch = {"input_ids": torch.randint(0, 37, (2, 16)), "labels": torch.randint(0, 37, (2, 16))}
    batch["labels"][1, -3:] = -100
    module.eval()  # no dropout: both paths see the same network
    fused = module.compute(batch, "train")
    fused["loss"].backward()
    fused_grads = {name: p.grad.clone() for name, p in module.model.named_parameters()}
    module.model.zero_grad()
    logits, _ = module.model(batch["input_ids"])
    ref = clm_loss(logits, batch["labels"])
    ref["loss"].backward()
    torch.testing.assert_close(fused["loss"], ref["loss"])
    torch.testing.assert_close(fused["acc"], ref["acc"])
    for name, p in module.model.named_parameters():  # the tied embedding / head weight included
        torch.testing.assert_close(fused_grads[name], p.grad, rtol=1e-4, atol=1e-6, msg=name)
