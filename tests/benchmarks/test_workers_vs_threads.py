"""benchmarks/workers_vs_threads.py without training: a stand-in for `kiln` prints progress lines, the
script's layouts, overrides and report are checked."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks import kilnrun
from benchmarks import workers_vs_threads as bench
from cluster.progress import format_step


def progress(rate: float, steps: int) -> str:
    events = (
        {"stage": "translation", "step": s, "max_steps": steps, "elapsed": s, "eta": 0}
        | {"metrics": {"loss": 5.0, "tokens_per_s": rate if s > 10 else rate / 10}}
        for s in range(5, steps + 1, 5)
    )
    return "\n".join(format_step(e) for e in events) + "\n"


def test_the_two_layouts_alternate_and_the_report_compares_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "manifest.json").write_text("{}")
    calls: list[list[str]] = []

    def run_kiln(command: str, config: str, overrides: list[str]) -> str:
        calls.append(overrides)
        return progress(2000.0 if "cluster.num_workers=2" in overrides else 1800.0, 40)

    monkeypatch.setattr(kilnrun, "run_kiln", run_kiln)
    out = tmp_path / "result.md"
    assert bench.main(["--data", str(data), "--steps", "40", "--out", str(out)]) == 0

    common = kilnrun.timing_overrides(str(data), 40)
    assert calls == 2 * [
        [*common, "trainer.batch_size=64", "cluster.num_workers=2", "cluster.cpus_per_worker=1"],
        [*common, "trainer.batch_size=128", "cluster.num_workers=1", "cluster.cpus_per_worker=2"],
    ]
    lines = out.read_text().splitlines()
    assert lines[0] == "# 2 workers x 1 thread vs 1 worker x 2 threads"
    assert "| 2 workers x 1 thread, batch 64 each | 2,000, 2,000 | 2,000 |" in lines
    assert "| 1 worker x 2 threads, batch 128 | 1,800, 1,800 | 1,800 |" in lines
    assert lines[-1] == "1 x 2 / 2 x 1 = **0.90**"


def test_missing_data_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert bench.main(["--data", str(tmp_path / "nothing")]) == 2
    assert capsys.readouterr().err == f"{tmp_path / 'nothing'}: no prepared data (see --help)\n"
