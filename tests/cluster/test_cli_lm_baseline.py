"""`kiln lm-baseline`: the command wiring (the models are tested in tests/finetune)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cluster.cli import main


def test_ngram_on_the_built_in_sample_writes_metrics(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        main(["lm-baseline", "model=ngram", "ngram_order=2", "--out", str(tmp_path / "lm")])
    assert info.value.code == 0
    metrics = json.loads((tmp_path / "lm" / "metrics.json").read_text())
    assert metrics["test"]["ppl_word"] > 1 and metrics["test"]["ppl_char"] > 1
    out = capsys.readouterr().out
    assert "ppl/word" in out and f"[lm-baseline] metrics: {tmp_path / 'lm' / 'metrics.json'}" in out


def test_bad_input_is_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        paths = [f"{k}_path={tmp_path / 'missing.txt'}" for k in ("train", "valid", "test")]
        main(["lm-baseline", "model=ngram", *paths, "--out", str(tmp_path / "o")])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("kiln: error:") and "missing.txt" in err and "\n" not in err
    assert not (tmp_path / "o" / "metrics.json").exists()
