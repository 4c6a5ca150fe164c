"""The `kiln` command line as a user runs it: --help everywhere, exit code 2 and one line for bad input."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from cluster.cli import build_parser
from cluster.preemption import EXIT_PREEMPTED, Preempted
from cluster.rundir import MARKER, RERUN_QUICKSTART, RERUN_TRAINING, prepare_run_dir
from data_pipeline.configlib import ConfigError

ROOT = Path(__file__).resolve().parents[2]
SUBCOMMANDS = [
    "data prepare",
    "pretrain",
    "finetune",
    "evaluate",
    "predict",
    "translate",
    "analyze-beam",
    "attention",
    "lm-baseline",
    "average",
    "export",
    "cluster up",
    "cluster down",
    "cluster status",
    "submit",
    "jobs",
    "render kuberay",
    "render slurm",
    "wandb sync",
    "quickstart",
]


def kiln(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "cluster", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_help_lists_every_subcommand() -> None:
    text = build_parser().format_help()
    for name in [
        "data",
        "pretrain",
        "finetune",
        "evaluate",
        "predict",
        "translate",
        "analyze-beam",
        "attention",
        "lm-baseline",
        "average",
        "export",
        "cluster",
        "submit",
        "jobs",
        "render",
        "wandb",
        "quickstart",
    ]:
        assert name in text


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_every_subcommand_has_help(command: str) -> None:
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args([*command.split(), "--help"])
    assert exit_info.value.code == 0


def test_unknown_key_exits_2_with_one_line() -> None:
    result = kiln("pretrain", "--config", "configs/tiny-bert.yaml", "trainer.max_stepz=5")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "trainer.max_stepz" in lines[0] and "trainer.max_steps" in lines[0]
    assert "Traceback" not in result.stderr


def test_print_config_prints_resolved_yaml() -> None:
    result = kiln(
        "pretrain", "--config", "configs/tiny-gpt.yaml", "trainer.max_steps=7", "--print-config"
    )
    assert result.returncode == 0, result.stderr
    assert "max_steps: 7" in result.stdout and "arch: gpt" in result.stdout


def test_a_refused_out_names_what_this_command_can_do_instead(tmp_path: Path) -> None:
    """The refusal of a non-empty --out offers the way out of the command at hand: a training run
    continues with trainer.resume=auto, the quickstart replaces with --overwrite; neither offers the
    other's, and a directory Kiln did not make is only ever another --out."""
    earlier = prepare_run_dir(tmp_path / "earlier")
    (earlier / "metrics.csv").write_text("step\n")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    for rerun, offer in [
        (RERUN_TRAINING, "continue it with trainer.resume=auto, or choose another --out"),
        (RERUN_QUICKSTART, "replace it with --overwrite, or choose another --out"),
        (None, "choose another --out"),  # kiln lm-baseline: no way to continue or replace
    ]:
        with pytest.raises(ConfigError) as refused:
            prepare_run_dir(earlier, rerun=rerun)
        what = "holds an earlier Kiln run" if rerun else "is not empty"
        assert str(refused.value) == f"{earlier}: output directory {what} ({offer})"
        with pytest.raises(ConfigError) as refused:
            prepare_run_dir(foreign, rerun=rerun)
        assert (
            str(refused.value) == f"{foreign}: output directory is not empty (choose another --out)"
        )
    assert (earlier / "metrics.csv").is_file() and (foreign / "notes.txt").is_file()


def test_run_dir_refuses_foreign_non_empty_dirs(tmp_path: Path) -> None:
    (tmp_path / "precious.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="not empty"):
        prepare_run_dir(tmp_path)
    with pytest.raises(ConfigError, match="not a Kiln run directory"):
        prepare_run_dir(tmp_path, overwrite=True)
    assert (tmp_path / "precious.txt").read_text() == "keep me"
    run = prepare_run_dir(tmp_path / "run")
    (run / "old.txt").write_text("old")
    prepare_run_dir(run, overwrite=True)
    assert not (run / "old.txt").exists() and (run / MARKER).is_file()


def test_submit_entrypoint_runs_the_uploaded_code() -> None:
    from cluster.submit import entrypoint

    line = entrypoint(
        "data-prepare", ROOT / "configs" / "data-sample.yaml", ["data.seed=3"], Path("out dir")
    )
    assert (
        line
        == "python -m cluster data prepare --config configs/data-sample.yaml data.seed=3 --out 'out dir'"
    )
    with pytest.raises(ConfigError, match="must live inside the project"):
        entrypoint("pretrain", Path("/etc/passwd"), [], None)


def test_overrides_after_options_are_collected(monkeypatch: pytest.MonkeyPatch) -> None:
    import cluster.submit
    from cluster import cli

    seen = {}
    monkeypatch.setattr(
        cli, "_handler", lambda args: lambda a: seen.setdefault("overrides", a.overrides) and 0
    )
    # `submit` switches Ray to token auth in os.environ; a later ray.init in this process must not inherit that.
    monkeypatch.setattr(cluster.submit, "use_token_auth_if_available", lambda: None)
    with pytest.raises(SystemExit):
        cli.main(
            [
                "submit",
                "pretrain",
                "--config",
                "configs/tiny-bert.yaml",
                "trainer.max_steps=3",
                "optim.lr=0.1",
            ]
        )
    assert seen["overrides"] == ["trainer.max_steps=3", "optim.lr=0.1"]
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["pretrain", "--config", "configs/tiny-bert.yaml", "--bogus"])
    assert exit_info.value.code == 2


def test_a_preempted_run_exits_75_with_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from cluster import cli

    def preempted(args: object) -> int:
        raise Preempted("bert", 12, Path("runs/x/checkpoints/step-0000012"))

    monkeypatch.setattr(cli, "_handler", lambda args: preempted)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["pretrain", "--config", "configs/tiny-bert.yaml"])
    assert exit_info.value.code == EXIT_PREEMPTED == 75
    out = capsys.readouterr()
    assert out.out.splitlines() == [
        "[bert] preempted: every worker stopped at step 12 and checkpointed to "
        "runs/x/checkpoints/step-0000012; run the same command with trainer.resume=auto "
        "to continue"
    ]
    assert "Traceback" not in out.err


def test_a_preempted_quickstart_says_it_starts_over(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import cluster.quickstart
    from cluster import cli

    def stopped(*args: object, **kwargs: object) -> Path:
        raise Preempted("gpt", 3, Path("runs/q/gpt/checkpoints/step-0000003"))

    monkeypatch.setattr(cluster.quickstart, "run_quickstart", stopped)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["quickstart", "--out", "runs/never-written"])
    assert exit_info.value.code == EXIT_PREEMPTED
    (line,) = capsys.readouterr().out.splitlines()
    assert line.startswith("[gpt] preempted: every worker stopped at step 3")
    assert line.endswith("the quickstart does not resume: run it again with --overwrite")


def test_every_subcommand_has_one_handler_in_the_table() -> None:
    from cluster.cli import HANDLERS, _handler

    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices  # noqa: SLF001 — argparse has no API
    assert set(HANDLERS) == set(commands)
    for command in commands:
        assert callable(_handler(argparse.Namespace(command=command))), command


def test_a_directory_that_is_not_prepared_data_is_a_data_dir_error(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ray.train.v2.api.exceptions import WorkerGroupError

    from cluster import cli
    from cluster.launch import worker_user_error
    from cluster.tasks import data_paths
    from data_pipeline.errors import DataDirError

    with pytest.raises(DataDirError, match="not a prepared data directory") as info:
        data_paths(tmp_path / "missing", "mlm_nsp")
    assert worker_user_error(WorkerGroupError("rank 0 failed", {0: info.value})) is info.value

    def fails(args: object) -> int:
        raise info.value

    monkeypatch.setattr(cli, "_handler", lambda args: fails)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["pretrain", "--config", "configs/tiny-bert.yaml"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == f"kiln: error: {info.value}\n"
