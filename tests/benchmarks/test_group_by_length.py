"""benchmarks/group_by_length.py and the benchmarks/kilnrun.py it shares with workers_vs_threads.py, without
training: progress lines made by cluster.progress.format_step (the format kiln prints) are parsed, the
median and skip are checked on them, the report is built from constructed runs, and the whole script runs
against a stand-in for `kiln` that prints such lines."""

from __future__ import annotations

import argparse
import datetime as dt
import stat
import statistics
from collections.abc import Callable
from pathlib import Path

import pytest

from benchmarks import group_by_length as bench
from benchmarks import kilnrun
from cluster.progress import format_step

ROOT = Path(__file__).resolve().parents[2]


def line(step: int, elapsed: float, rate: float | None = 1000.0, max_steps: int = 60) -> str:
    metrics = {"loss": 7.9, "lr": 1e-3} | ({} if rate is None else {"tokens_per_s": rate})
    event = {"stage": "translation", "step": step, "max_steps": max_steps, "elapsed": elapsed}
    return format_step(event | {"metrics": metrics, "eta": 30})


def stdout(rates: dict[int, float], seconds_per_step: float = 1.5) -> str:
    """A run's stdout: a progress line for each step in `rates`, with notes and a validation around."""
    lines = ["kiln: starting Ray", "[translation] validation at step 0: val/loss 9.1"]
    lines += [line(step, step * seconds_per_step, rate) for step, rate in rates.items()]
    return "\n".join([*lines, "[translation] validation at step 60: val/loss 5.2", ""])


# ------------------------------------------------------------------------------------------ parsing
def test_progress_lines_are_parsed_and_everything_else_is_left_out() -> None:
    text = stdout({5: 900.0, 10: 1_234.4, 15: 12_900.0})
    got = kilnrun.parse_progress(text)
    assert [(p.step, p.tokens_per_s, p.elapsed_s) for p in got] == [
        (5, 900.0, 8.0),  # 7.5 s, shown rounded (to even) by progress.duration
        (10, 1234.0, 15.0),
        (15, 12900.0, 22.0),
    ]


def test_a_line_without_a_rate_still_gives_its_step_and_elapsed_time() -> None:
    (p,) = kilnrun.parse_progress(line(20, 65.0, rate=None))
    assert (p.step, p.tokens_per_s, p.elapsed_s) == (20, None, 65.0)
    assert kilnrun.rates_after([p], skip=0) == []


@pytest.mark.parametrize(
    ("text", "seconds"), [("45s", 45), ("0s", 0), ("3m05s", 185), ("1h02m", 3720)]
)
def test_durations_as_progress_prints_them(text: str, seconds: float) -> None:
    assert kilnrun.parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "5", "s", "ETA"])
def test_what_is_not_a_duration_is_refused(text: str) -> None:
    with pytest.raises(ValueError, match="not a progress duration"):
        kilnrun.parse_duration(text)


# ------------------------------------------------------------------------------------- skip, median, s/step
def test_only_steps_after_skip_count_and_their_median_is_the_rate() -> None:
    warm_up = {5: 100.0, 10: 200.0}  # slow first steps must not pull the figure down
    lines = kilnrun.parse_progress(stdout(warm_up | {15: 1000.0, 20: 1300.0, 25: 1100.0}))
    assert kilnrun.rates_after(lines, skip=10) == [1000.0, 1300.0, 1100.0]
    assert statistics.median(kilnrun.rates_after(lines, skip=10)) == 1100.0
    assert kilnrun.rates_after(lines, skip=25) == []


def test_seconds_per_step_span_the_steps_after_skip() -> None:
    # 2 s/step in the warm-up, 1 s/step after: the figure is the latter's.
    elapsed = {5: 10.0, 10: 20.0, 15: 25.0, 20: 30.0, 60: 70.0}
    lines = kilnrun.parse_progress("\n".join(line(s, e) for s, e in elapsed.items()))
    assert kilnrun.seconds_per_step(lines, skip=10) == pytest.approx(1.0)
    # skip between lines: from the last line at or before it
    assert kilnrun.seconds_per_step(lines, skip=12) == pytest.approx(1.0)
    # nothing skipped: from step 0 at elapsed 0 (elapsed starts with training)
    assert kilnrun.seconds_per_step(lines, skip=0) == pytest.approx(70 / 60)
    assert kilnrun.seconds_per_step(lines, skip=60) is None
    assert kilnrun.seconds_per_step([], skip=0) is None


# ------------------------------------------------------------------------------------------- report
def timing(rates: list[float], s_per_step: float, load: str = "1.00 1.10 1.20") -> kilnrun.Timing:
    return kilnrun.Timing(rates, s_per_step, load, "1.90 1.50 1.30")


def args(**kw: object) -> argparse.Namespace:
    return bench.parse_args([f"--{k}={v}" for k, v in kw.items()])


def test_the_report_puts_random_and_grouped_side_by_side_with_each_run_and_its_load() -> None:
    runs = [
        bench.Run(0, 0, timing([1000, 1100, 900], 1.20)),
        bench.Run(50, 0, timing([1600, 1700], 0.80)),
        bench.Run(50, 1, timing([1800], 0.70)),
        bench.Run(0, 1, timing([1200], 1.00, load="2.00 1.50 1.00")),
    ]
    when = dt.datetime(2026, 12, 3, 9, 30)
    lines = bench.report(args(), runs, "group_by_length.py", when, ("0.5 0.6 0.7", "1.9 1.8 1.7"))
    text = "\n".join(lines)
    assert lines[0] == "# Length-grouped batches vs random batches"
    assert "- 2026-12-03 09:30, `group_by_length.py`" in lines
    assert "configs/translation-scratch.yaml data_dir=runs/multi30k" in text
    assert "after step 10" in text and "median over 2 rounds" in text
    assert "load average at start / end: 0.5 0.6 0.7 / 1.9 1.8 1.7" in text
    assert "torch " in text and " CPUs" in text
    # per round in round order; medians of the runs' medians (1000 and 1200; 1650 and 1800)
    assert "| random (`group_by_length=0`) | 1,000, 1,200 | 1,100 | 1.20, 1.00 | 1.10 |" in lines
    assert "| grouped (`group_by_length=50`) | 1,650, 1,800 | 1,725 | 0.80, 0.70 | 0.75 |" in lines
    assert f"grouped / random: tokens/s **{1725 / 1100:.2f}**, s/step {0.75 / 1.10:.2f}" in text
    # every run, in the order it ran, with the load around it
    assert lines[-4:] == [
        "| 0 | random | 1,000 | 1.20 | 1.00 1.10 1.20 | 1.90 1.50 1.30 |",
        "| 0 | grouped | 1,650 | 0.80 | 1.00 1.10 1.20 | 1.90 1.50 1.30 |",
        "| 1 | grouped | 1,800 | 0.70 | 1.00 1.10 1.20 | 1.90 1.50 1.30 |",
        "| 1 | random | 1,200 | 1.00 | 2.00 1.50 1.00 | 1.90 1.50 1.30 |",
    ]


def test_rounds_alternate_which_goes_first() -> None:
    assert [bench.order(r, 50) for r in range(3)] == [(0, 50), (50, 0), (0, 50)]


# ------------------------------------------------------------------------------------------- the script
def test_missing_data_stops_with_one_line_saying_where_and_how_to_prepare_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert bench.main(["--data", str(tmp_path / "nothing"), "--out", str(tmp_path / "r.md")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert str(tmp_path / "nothing" / "manifest.json") in err
    assert "kiln data prepare --config configs/data-multi30k.yaml --out" in err
    assert not (tmp_path / "r.md").exists()


def test_the_default_data_hint_is_the_documented_command(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(bench, "prepared", lambda data: False)
    assert bench.main([]) == 2
    assert (
        "`kiln data prepare --config configs/data-multi30k.yaml --out runs/multi30k`"
        in capsys.readouterr().err
    )


@pytest.mark.parametrize(
    "argv", [["--groups", "0"], ["--steps", "10", "--skip", "10"], ["--rounds", "0"]]
)
def test_arguments_that_cannot_measure_anything_are_refused(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as stop:
        bench.parse_args(argv)
    assert stop.value.code == 2


@pytest.fixture
def prepared_data(tmp_path: Path) -> Path:
    data = tmp_path / "data"
    data.mkdir()
    (data / "manifest.json").write_text("{}")
    return data


def fake_kiln(calls: list[list[str]]) -> Callable[[str, str, list[str]], str]:
    """Stands in for kilnrun.run_kiln: grouped runs report 1.5x the tokens/s in 2/3 of the time."""

    def run_kiln(command: str, config: str, overrides: list[str]) -> str:
        calls.append([command, config, *overrides])
        grouped = "trainer.group_by_length=0" not in overrides
        rate, s = (1500.0, 1.0) if grouped else (1000.0, 1.5)
        return stdout({step: rate for step in range(5, 61, 5)}, seconds_per_step=s)

    return run_kiln


def test_the_script_alternates_the_two_kinds_of_runs_and_writes_the_report(
    prepared_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[list[str]] = []
    monkeypatch.setattr(kilnrun, "run_kiln", fake_kiln(calls))
    out = tmp_path / "result.md"
    argv = ["--data", str(prepared_data), "--groups", "7", "--rounds", "2", "--out", str(out)]
    assert bench.main(argv) == 0

    groups = [c[-1] for c in calls]
    assert groups == [f"trainer.group_by_length={n}" for n in (0, 7, 7, 0)]
    for call in calls:  # the same run but for the grouping
        assert call[:2] == ["finetune", "configs/translation-scratch.yaml"]
        assert call[2:-1] == kilnrun.timing_overrides(str(prepared_data), 60)
    text = out.read_text()
    assert text.startswith("# Length-grouped batches vs random batches\n")
    assert f"`group_by_length.py {' '.join(argv)}`" in text
    assert "| random (`group_by_length=0`) | 1,000, 1,000 | 1,000 | 1.50, 1.50 | 1.50 |" in text
    assert "| grouped (`group_by_length=7`) | 1,500, 1,500 | 1,500 | 1.00, 1.00 | 1.00 |" in text
    assert "grouped / random: tokens/s **1.50**, s/step 0.67" in text


def test_run_kiln_runs_the_cli_from_the_repository_into_a_fresh_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    script = tmp_path / "kiln"
    script.write_text('#!/bin/sh\necho "cwd $(pwd)"\necho "args $*"\n')
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setattr(kilnrun, "KILN", script)
    out = kilnrun.run_kiln("finetune", "configs/x.yaml", ["a=1", "b=2"])
    cwd, argv = (x.split(" ", 1)[1] for x in out.splitlines())
    assert cwd == str(ROOT)
    command, run_dir = argv.split(" --out ")
    assert command == "finetune --config configs/x.yaml a=1 b=2"
    assert not Path(run_dir).exists()  # removed with its temporary parent


def test_a_failed_kiln_run_ends_the_benchmark_with_its_command_and_output(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    script = tmp_path / "kiln"
    script.write_text('#!/bin/sh\necho "config error: trainer.nope" >&2\nexit 3\n')
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setattr(kilnrun, "KILN", script)
    with pytest.raises(SystemExit) as stop:
        kilnrun.run_kiln("finetune", "configs/x.yaml", ["trainer.nope=1"])
    message = str(stop.value.code)
    assert "finetune --config configs/x.yaml trainer.nope=1" in message
    assert "exit 3" in message and "config error: trainer.nope" in message
