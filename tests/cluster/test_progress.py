"""The console of a training run (issue 13): a live line on a terminal, plain lines without escape codes
elsewhere, fed by rank 0's event file; `--verbose` wherever a user types it; W&B not told the retired
`anonymous` setting. No Ray here (the e2e test tests/e2e/test_console.py runs the real thing)."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import pytest

from cluster.cli import build_parser
from cluster.progress import (
    Console,
    EventWriter,
    Follower,
    duration,
    follow_progress,
    format_bar,
    format_step,
    progress_file,
)
from data_pipeline import raystart

STEP = {
    "kind": "step",
    "stage": "bert",
    "step": 10,
    "max_steps": 40,
    "elapsed": 12.0,
    "eta": 36.4,
    "metrics": {"loss": 7.91234, "mlm_acc": 0.0412, "tokens_per_s": 12903.7, "mfu": 0.26},
}


def step(n: int, total: int = 40) -> dict:
    return {**STEP, "step": n, "max_steps": total}


def test_plain_line_has_step_loss_rate_and_eta() -> None:
    line = format_step(STEP)
    assert line == (
        "[bert] step 10/40 loss 7.912 mlm_acc 0.0412 mfu 0.26 | 12,904 tokens/s | "
        "12s elapsed, ETA 36s"
    )
    assert "\x1b" not in line and "\r" not in line


def test_durations() -> None:
    assert [duration(s) for s in (0, 59.4, 61, 3599, 3725)] == [
        "0s",
        "59s",
        "1m01s",
        "59m59s",
        "1h02m",
    ]


def test_bar_shows_progress_and_fits_the_width() -> None:
    bar = format_bar(STEP, 200)
    assert bar == (
        "[bert] [======>.................] 10/40 ETA 36s | 12,904 tokens/s | "
        "loss 7.912 mlm_acc 0.0412 mfu 0.26"
    )
    assert format_bar(step(40), 200).startswith("[bert] [========================] 40/40")
    assert len(format_bar(STEP, 50)) == 50


def test_not_a_terminal_prints_every_nth_step_and_the_last_without_escapes() -> None:
    out = io.StringIO()
    console = Console(every=5, stream=out, tty=False)
    for n in range(1, 13):
        console.show(step(n, 12))
    console.show({"kind": "validation", "stage": "bert", "step": 12, "metrics": {"val/loss": 7.5}})
    console.show({"kind": "note", "text": "[bert] resuming from x"})
    console.close()
    lines = out.getvalue().splitlines()
    assert [line.split(" loss")[0] for line in lines[:3]] == [
        "[bert] step 5/12",
        "[bert] step 10/12",
        "[bert] step 12/12",
    ]
    assert lines[3:] == ["[bert] validation at step 12: val/loss 7.5", "[bert] resuming from x"]
    assert "\x1b[" not in out.getvalue() and "\r" not in out.getvalue()


def test_a_terminal_gets_one_live_line_that_other_lines_do_not_tear() -> None:
    out = io.StringIO()
    console = Console(every=5, stream=out, tty=True, width=120)
    console.show(step(1))
    console.show(step(2))
    console.line("[bert] validation at step 2: val/loss 7.5")
    console.close()
    text = out.getvalue()
    assert text.count("\n") == 2  # the validation line, and the end of the live line
    assert text.startswith("\r[bert] [>") and "\r\x1b[K[bert] validation at step 2" in text
    assert text.endswith(format_bar(step(2), 120) + "\n")


def test_follower_shows_complete_lines_appended_after_it_started(tmp_path: Path) -> None:
    path = progress_file(tmp_path)
    writer = EventWriter(path)
    writer.write(**step(1))  # an earlier run's (a resume appends to the same file)
    out = io.StringIO()
    follower = Follower(path, Console(every=1, stream=out, tty=False), start=path.stat().st_size)
    writer.write(**step(2))
    with open(path, "a") as f:
        f.write(
            "not json\n" + json.dumps(step(3))[:10]
        )  # a line being written: waits for its newline
    follower.poll()
    assert out.getvalue().splitlines() == [format_step(step(2))]
    with open(path, "a") as f:
        f.write(json.dumps(step(3))[10:] + "\n")
    follower.poll()
    assert out.getvalue().splitlines()[-1] == format_step(step(3))


def test_follow_progress_drains_the_file_when_training_returns(tmp_path: Path) -> None:
    out = io.StringIO()
    with follow_progress(tmp_path, every=10, stream=out, tty=False):
        EventWriter(progress_file(tmp_path)).write(**step(40))  # written just before fit() returns
    assert out.getvalue().splitlines() == [format_step(step(40))]


@pytest.mark.parametrize(
    "argv",
    [
        ["--verbose", "pretrain"],
        ["pretrain", "--verbose"],
        ["data", "prepare", "--verbose"],
        ["quickstart", "--verbose"],
    ],
)
def test_verbose_is_accepted_before_or_after_the_command(argv: list[str]) -> None:
    assert build_parser().parse_known_args(argv)[0].verbose is True
    assert (
        build_parser().parse_known_args([a for a in argv if a != "--verbose"])[0].verbose is False
    )


def test_ray_loggers_go_to_the_run_log_not_the_console(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv(raystart.VERBOSE_ENV, raising=False)
    monkeypatch.setattr(raystart, "RUN_LOG", raystart.RunLog())
    raystart.route_ray_loggers()
    logging.getLogger("ray.data").warning(
        "Progress bars disabled."
    )  # Ray Data has a console handler
    raystart._worker_lines(
        {"actor_name": "RayTrainWorker", "pid": 7, "lines": ["GPU available: False"]}
    )
    raystart.log_to(tmp_path / "logs" / "ray.log")
    logging.getLogger("ray.train").warning("Failed to query Ray Train Controller actor state.")
    err = capsys.readouterr().err
    assert "Progress bars" not in err and "Failed to query" not in err
    lines = (tmp_path / "logs" / "ray.log").read_text().splitlines()
    assert (
        "Progress bars disabled." in lines[0]
        and lines[1] == "(RayTrainWorker pid=7) GPU available: False"
    )
    assert "Failed to query Ray Train Controller" in lines[2]


def test_wandb_is_not_passed_the_retired_anonymous_setting(tmp_path: Path) -> None:
    from cluster.jobs import WandbConfig
    from cluster.tracking import build_loggers, ensure_run_id

    ensure_run_id(tmp_path)
    wandb_logger = build_loggers(WandbConfig(mode="offline"), tmp_path, "bert", {})[1]
    assert "anonymous" not in wandb_logger._wandb_init and wandb_logger._wandb_init["id"]


def test_a_crash_points_at_the_run_log_and_a_user_error_stays_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from data_pipeline.configlib import ConfigError

    with (
        pytest.raises(RuntimeError),
        follow_progress(tmp_path, every=1, stream=io.StringIO(), tty=False),
    ):
        raise RuntimeError("worker died")
    assert (
        capsys.readouterr().err
        == f"kiln: the workers' and Ray's own output: {tmp_path}/logs/ray.log\n"
    )
    with (
        pytest.raises(ConfigError),
        follow_progress(tmp_path, every=1, stream=io.StringIO(), tty=False),
    ):
        raise ConfigError("x.yaml: bad")
    assert capsys.readouterr().err == ""


def test_rank_0_writes_every_nth_step_the_last_and_validation_as_events(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from types import SimpleNamespace

    import torch

    from cluster.callbacks import ProgressPrinter

    path = progress_file(tmp_path)
    printer = ProgressPrinter("gpt", 3, ("train/loss", "train/tokens_per_s"), path)
    monkeypatch.setattr(
        ProgressPrinter, "LIVE_INTERVAL_S", 1e9
    )  # no in-between events for a terminal here
    trainer = SimpleNamespace(
        global_step=0,
        global_rank=0,
        max_steps=7,
        sanity_checking=False,
        callback_metrics={
            "train/loss": torch.tensor(2.5),
            "val/loss": torch.tensor(3.0),
            "train/tokens_per_s": torch.tensor(100.0),
        },
    )
    other_rank = SimpleNamespace(**{**vars(trainer), "global_rank": 1, "global_step": 3})
    printer.on_train_start(trainer, None)
    for step in range(1, 8):
        trainer.global_step = step
        printer.on_train_batch_end(trainer, None)
        printer.on_train_batch_end(other_rank, None)
    printer.on_validation_end(trainer, None)
    events = [json.loads(line) for line in path.read_text().splitlines()]
    assert [(e["kind"], e["step"]) for e in events] == [
        ("step", 3),
        ("step", 6),
        ("step", 7),
        ("validation", 7),
    ]
    assert events[0]["metrics"] == {"loss": 2.5, "tokens_per_s": 100.0} and events[2]["eta"] == 0
    assert events[3] == {
        "kind": "validation",
        "step": 7,
        "metrics": {"val/loss": 3.0},
        "stage": "gpt",
    }
