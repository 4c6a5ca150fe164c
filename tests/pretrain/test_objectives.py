from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pretrain.models.bert import BertPreTrainingOutput
from pretrain.objectives import clm_loss, masked_positions_from_labels, mlm_nsp_loss


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
