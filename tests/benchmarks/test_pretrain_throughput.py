"""benchmarks/pretrain_throughput.py at a size that runs in seconds: the GPT contenders train the same weights, the
fused and unfused Kiln losses agree, and the report carries a row for each extra contender."""

from __future__ import annotations

from pathlib import Path

import torch

from benchmarks import pretrain_throughput as bench


def test_gpt_contenders_start_from_the_same_weights_and_take_steps() -> None:
    torch.manual_seed(0)
    kiln, hf, unfused = bench.gpt_pair(1, 64)
    assert [c.name for c in (kiln, hf, unfused)] == ["Kiln", "HF", "Kiln unfused"]
    assert kiln.flops_per_step == unfused.flops_per_step > 0
    assert kiln.model is not unfused.model
    for (name, ours), theirs in zip(
        kiln.model.state_dict().items(), unfused.model.state_dict().values(), strict=True
    ):
        assert torch.equal(ours, theirs), name
    for contender in (kiln, hf, unfused):
        contender.step()  # forward, loss, backward, AdamW: raises if a side's graph is broken


def test_report_has_a_row_per_extra_contender(tmp_path: Path) -> None:
    out = tmp_path / "throughput.md"
    argv = [
        "--families",
        "gpt",
        "--sizes",
        "1x64",
        "--threads",
        "1",
        "--steps",
        "1",
        "--rounds",
        "2",
    ]
    assert bench.main([*argv, "--out", str(out)]) == 0
    text = out.read_text()
    assert "| GPT | 1x64 | 1 | Kiln unfused |" in text
    assert ">= 1.3x:" in text and "GFLOP/s" in text
