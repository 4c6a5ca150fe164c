"""cluster/resume.py without Lightning or Ray: the worker-loss choice (which checkpoint a restarted
worker group continues from) and what a run directory holding a checkpoint means. The exact resume
itself is tests/cluster/test_resume_settings.py; with Ray, tests/e2e/test_resume.py and
tests/e2e/test_worker_loss.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from cluster.config import load_config
from cluster.jobs import PretrainJob
from cluster.resume import (
    check_resume,
    checkpoint_step,
    continues_run,
    has_checkpoint,
    resume_point,
)
from cluster.rundir import run_dir
from data_pipeline.configlib import ConfigError, from_preset, to_dict
from pretrain.checkpoint import save_checkpoint
from pretrain.models.bert import BertConfig, BertForPreTraining

CFG = from_preset(BertConfig, "tiny", vocab_size=40)


def save(run: Path, step: int, launch: str | None = None) -> Path:
    path = Path(run) / "checkpoints" / f"step-{step:07d}"
    return save_checkpoint(
        path, BertForPreTraining(CFG), CFG, None, trainer_state={"step": step}, launch=launch
    )


def test_a_restarted_worker_group_continues_from_this_launchs_newest_checkpoint(
    tmp_path: Path,
) -> None:
    chosen = save(tmp_path, 2, launch="earlier")  # what the driver chose: an earlier run's
    # nothing of this launch yet: the driver's choice
    assert resume_point(tmp_path, str(chosen), "this") == (str(chosen), chosen)
    assert resume_point(tmp_path, None, "this") is None  # a fresh start stays one
    save(tmp_path, 6, launch="another")  # newer, but another launch's (no clocks are compared)
    ours = save(tmp_path, 4, launch="this")  # written before this launch's worker group was lost
    said: list[str] = []
    assert resume_point(tmp_path, str(chosen), "this", say=said.append) == (ours, ours)
    assert said == [f"[retry] the worker group was restarted; continuing from {ours}"]
    # whatever the strategy: a ZeRO checkpoint holds its optimizer state too (consolidated)
    assert resume_point(tmp_path, None, "this") == (ours, ours)
    assert checkpoint_step(ours) == 4


def test_a_run_stopped_by_bad_input_keeps_its_directory_only_with_a_checkpoint(
    tmp_path: Path,
) -> None:
    with pytest.raises(ConfigError), run_dir(tmp_path / "empty"):
        raise ConfigError("bad input")
    assert not (tmp_path / "empty").exists()  # made by this command, nothing to continue: removed
    with pytest.raises(ConfigError), run_dir(tmp_path / "run") as out:
        save(out, 1)
        raise ConfigError("bad input")
    assert has_checkpoint(tmp_path / "run")  # kept: trainer.resume=auto continues it
    assert continues_run(tmp_path / "run", "auto") and not continues_run(tmp_path / "run", "never")
    assert not continues_run(tmp_path / "elsewhere", "auto")


def _job(strategy: str) -> PretrainJob:
    return load_config(
        PretrainJob,
        None,
        [
            "data_dir=/nonexistent",
            "model.preset=tiny",
            "trainer.resume=auto",
            f"cluster.strategy={strategy}",
        ],
    )


def test_a_zero_checkpoint_resumes_with_any_zero_stage_and_only_with_its_optimizer_state(
    tmp_path: Path,
) -> None:
    path = tmp_path / "checkpoints" / "step-0000003"
    job = to_dict(_job("deepspeed_stage_2"))
    save_checkpoint(
        path,
        BertForPreTraining(CFG),
        CFG,
        job_config=job,
        trainer_state={"step": 3, "optimizer": {"format": "kiln-zero-consolidated"}},
    )
    for stage in (1, 2, 3):  # consolidated: any stage (and any worker count) restores it
        assert check_resume(_job(f"deepspeed_stage_{stage}"), tmp_path) == path
    with pytest.raises(
        ConfigError,
        match="saved with cluster.strategy=deepspeed_stage_2 and cannot "
        "be resumed with cluster.strategy=ddp",
    ):
        check_resume(_job("ddp"), tmp_path)
    # saved by an older Kiln, whose ZeRO checkpoints held no optimizer state: refused in one line
    save_checkpoint(
        path,
        BertForPreTraining(CFG),
        CFG,
        job_config=job,
        trainer_state={"step": 3},
        overwrite=True,
    )
    with pytest.raises(ConfigError, match="holds no optimizer state"):
        check_resume(_job("deepspeed_stage_2"), tmp_path)
