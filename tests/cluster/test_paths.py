"""Paths mean what the user meant (issue 13): every relative location in a config or on the command
line is resolved against the directory `kiln` runs in, on the driver, before a worker (running
elsewhere) reads it; URIs and Hub names stay as written; a run directory where a checkpoint is
expected means its newest complete checkpoint. Also the driver-side refusals that used to come
late or never: an unknown precision, a GPU run without GPUs, and a failed validation leaving no
output directory behind. No Ray is started here."""

from __future__ import annotations

import argparse
import typing
from pathlib import Path

import pytest
import yaml

from cluster.cli import main, resolve_path_args
from cluster.config import load_config, resolve_location
from cluster.jobs import ClusterConfig, FinetuneJob, PrepareJob, PretrainJob, lightning_precisions
from cluster.rundir import MARKER
from data_pipeline.configlib import ConfigError, from_preset
from finetune.lm_baselines import LMBaselineJob
from pretrain.checkpoint import CheckpointError, resolve_checkpoint, save_checkpoint
from pretrain.models.bert import BertConfig, BertForPreTraining

ROOT = Path(__file__).resolve().parents[2]
TINY_BERT = ROOT / "configs" / "tiny-bert.yaml"


def kiln(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str, str]:
    """`kiln argv` in this process: (exit code, stdout, stderr)."""
    with pytest.raises(SystemExit) as exited:
        main(list(argv))
    out, err = capsys.readouterr()
    return int(exited.value.code or 0), out, err


def make_run(root: Path, steps: tuple[int, ...]) -> list[Path]:
    """A run directory holding one complete tiny BERT checkpoint per step."""
    cfg = from_preset(BertConfig, "tiny", vocab_size=40)
    model = BertForPreTraining(cfg)
    (root / MARKER).parent.mkdir(parents=True, exist_ok=True)
    (root / MARKER).write_text("made by kiln\n")
    return [
        save_checkpoint(
            root / "checkpoints" / f"step-{s:07d}", model, cfg, None, trainer_state={"step": s}
        )
        for s in steps
    ]


def test_relative_config_paths_are_resolved_against_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    job = load_config(
        FinetuneJob,
        None,
        [
            "data_dir=runs/multi30k",
            "encoder_checkpoint=runs/bert/ckpt",
            "decoder_checkpoint=../gpt",
        ],
    )
    assert job.data_dir == str(tmp_path / "runs" / "multi30k")
    assert job.encoder_checkpoint == str(
        tmp_path / "runs" / "bert" / "ckpt"
    )  # absent: resolved, not checked
    assert job.decoder_checkpoint == str(tmp_path.parent / "gpt")
    assert load_config(PretrainJob, None, []).data_dir == str(
        tmp_path / "runs" / "data"
    )  # defaults too
    data = load_config(
        PrepareJob,
        None,
        [
            "data.source=parallel",
            "data.paths=[raw/a.de, 'raw/*.en']",
            "data.tasks=[translation]",
            "data.tokenizer_path=tok/vocab.txt",
            "data.target_tokenizer_path=/abs/gpt2",
        ],
    ).data
    assert data.paths == [
        str(tmp_path / "raw" / "a.de"),
        str(tmp_path / "raw" / "*.en"),
    ]  # globs kept globs
    assert (data.tokenizer_path, data.target_tokenizer_path) == (
        str(tmp_path / "tok" / "vocab.txt"),
        "/abs/gpt2",
    )
    lm = load_config(LMBaselineJob, None, ["split_path=wiki/all.txt", "out_dir=runs/lm"])
    assert (lm.split_path, lm.out_dir) == (
        str(tmp_path / "wiki" / "all.txt"),
        str(tmp_path / "runs" / "lm"),
    )


def test_uris_and_hub_names_stay_as_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models" / "bert").mkdir(parents=True)
    job = load_config(
        FinetuneJob,
        None,
        [
            "data_dir=s3://bucket/data",
            "encoder_checkpoint=hf:bert-base-uncased",
            "decoder_checkpoint=hf:openai-community/gpt2",
        ],
    )
    assert (job.data_dir, job.encoder_checkpoint) == ("s3://bucket/data", "hf:bert-base-uncased")
    assert job.decoder_checkpoint == "hf:openai-community/gpt2"
    assert (
        resolve_location("hf:models/bert", "checkpoint") == f"hf:{tmp_path / 'models' / 'bert'}"
    )  # it exists
    # (a checkpoint URI is pinned to one checkpoint: tests/pretrain/test_checkpoint_storage.py)
    assert resolve_location("gs://b/ckpt", "path") == "gs://b/ckpt"
    hf = load_config(
        PrepareJob,
        None,
        ["data.source=hf", "data.hf_name=stanfordnlp/imdb", "data.tasks=[classification]"],
    ).data
    assert hf.hf_name == "stanfordnlp/imdb"  # a Hub dataset, not a path here
    assert resolve_location("models", "local_or_name") == str(tmp_path / "models")


def test_print_config_shows_absolute_paths(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.chdir(tmp_path)
    code, out, _ = kiln(
        capsys, "pretrain", "--config", str(TINY_BERT), "data_dir=prepared/tiny", "--print-config"
    )
    assert code == 0 and yaml.safe_load(out)["data_dir"] == str(tmp_path / "prepared" / "tiny")
    recipe = ROOT / "configs" / "translation.yaml"
    code, out, _ = kiln(capsys, "finetune", "--config", str(recipe), "--print-config")
    printed = yaml.safe_load(out)
    assert code == 0 and printed["encoder_checkpoint"].startswith(str(tmp_path) + "/")


def test_a_run_directory_means_its_newest_complete_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = tmp_path / "runs" / "bert"
    older, newer = make_run(run, (1, 2))
    (run / "checkpoints" / ".tmp-step-0000003").mkdir()  # a save killed midway
    (run / "checkpoints" / "step-0000004").mkdir()  # ... and one whose manifest was never written
    assert resolve_checkpoint(run) == newer
    assert resolve_checkpoint(run / "checkpoints") == newer
    assert resolve_checkpoint(older) == older  # a checkpoint is itself
    monkeypatch.chdir(tmp_path)
    assert load_config(
        FinetuneJob, None, ["encoder_checkpoint=runs/bert"]
    ).encoder_checkpoint == str(newer)
    args = argparse.Namespace(
        command="evaluate", checkpoint=Path("runs/bert"), data=Path("d"), out=None
    )
    resolve_path_args(args)
    assert (args.checkpoint, args.data) == (newer, tmp_path / "d")
    # A newest checkpoint whose bytes changed (same size) is skipped with a warning, not used.
    weights = newer / "model.safetensors"
    blob = bytearray(weights.read_bytes())
    blob[-1] ^= 0xFF
    weights.write_bytes(bytes(blob))
    warnings: list[str] = []
    assert resolve_checkpoint(run, warn=warnings.append) == older and "step-0000002" in warnings[0]


def test_a_run_directory_without_a_complete_checkpoint_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    (tmp_path / "runs" / "bert" / "checkpoints" / ".tmp-step-0000001").mkdir(parents=True)
    with pytest.raises(CheckpointError, match="holds no complete checkpoint"):
        resolve_checkpoint(tmp_path / "runs" / "bert")
    monkeypatch.chdir(tmp_path)
    code, _, err = kiln(capsys, "export", "--checkpoint", "runs/bert", "--out", "exported")
    assert code == 2 and err.count("\n") == 1 and "runs/bert: holds no complete checkpoint" in err
    code, _, err = kiln(
        capsys,
        "finetune",
        "--config",
        str(ROOT / "configs" / "classification.yaml"),
        "encoder_checkpoint=runs/bert",
        "--print-config",
    )
    assert code == 2 and err.startswith("kiln: error: ") and err.count("\n") == 1


def test_submit_keeps_its_cluster_side_out_as_written() -> None:
    args = argparse.Namespace(
        command="submit", config=Path("configs/x.yaml"), out=Path("runs/remote")
    )
    resolve_path_args(args)
    assert (args.config, args.out) == (Path("configs/x.yaml"), Path("runs/remote"))


# ------------------------------------------------ precision and GPUs, refused on the driver
def test_precision_is_checked_against_lightnings_own_list() -> None:
    from lightning.fabric.plugins.precision.precision import (
        _PRECISION_INPUT_STR,
        _PRECISION_INPUT_STR_ALIAS,
    )

    want = set(typing.get_args(_PRECISION_INPUT_STR)) | set(
        typing.get_args(_PRECISION_INPUT_STR_ALIAS)
    )
    assert set(lightning_precisions()) == want
    with pytest.raises(
        ConfigError, match=r"'precision': unknown precision 'foo' \(choose from .*bf16-mixed"
    ):
        load_config(PretrainJob, None, ["trainer.precision=foo"])
    assert (
        load_config(PretrainJob, None, ["trainer.precision=bf16-mixed"]).trainer.precision
        == "bf16-mixed"
    )


def test_use_gpu_without_a_gpu_is_refused_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    import ray
    import torch

    from cluster.launch import check_gpus

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    monkeypatch.chdir(tmp_path)
    code, _, err = kiln(
        capsys, "pretrain", "--config", str(TINY_BERT), "cluster.use_gpu=true", "--out", "run"
    )
    assert code == 2 and err.count("\n") == 1
    assert "cluster.use_gpu=true needs 2 GPU(s)" in err and "this machine has 0" in err
    assert not (tmp_path / "run").exists()  # refused before anything was made
    # Connected to a cluster that offers no GPU at all: the same, once connected.
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 64.0})
    with pytest.raises(ConfigError, match="the Ray cluster offers 0"):
        check_gpus(ClusterConfig(use_gpu=True, address="ray://head:10001"), connected=True)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 64.0, "GPU": 1.0})
    check_gpus(
        ClusterConfig(use_gpu=True, address="ray://head:10001"), connected=True
    )  # may scale up


# ------------------------------------------------ a failed validation leaves no directory
def test_failed_validation_leaves_no_output_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.chdir(tmp_path)
    code, _, err = kiln(
        capsys, "pretrain", "--config", str(TINY_BERT), "data_dir=missing", "--out", "runs/new"
    )
    assert code == 2 and "not a prepared data directory" in err and err.count("\n") == 1
    assert not (tmp_path / "runs" / "new").exists()
    (
        tmp_path / "mine"
    ).mkdir()  # the user's own empty directory stays, emptied of what the run made
    code, _, _ = kiln(
        capsys, "pretrain", "--config", str(TINY_BERT), "data_dir=missing", "--out", "mine"
    )
    assert code == 2 and (tmp_path / "mine").is_dir() and not any((tmp_path / "mine").iterdir())
    ckpt = make_run(tmp_path / "old", (1,))[0]  # a run being continued is never removed
    code, _, _ = kiln(
        capsys,
        "pretrain",
        "--config",
        str(TINY_BERT),
        "data_dir=missing",
        "--out",
        "old",
        "trainer.resume=auto",
    )
    assert code == 2 and ckpt.is_dir() and (tmp_path / "old" / MARKER).is_file()


def test_a_user_error_raised_on_a_worker_is_found_in_ray_trains_wrapper() -> None:
    from ray.exceptions import RayTaskError
    from ray.train.v2.api.exceptions import ControllerError, WorkerGroupError

    from cluster.launch import worker_user_error
    from data_pipeline.errors import DataError

    bad = DataError("/d/mlm_nsp/train/part-00000.parquet: cannot read this shard")
    group = WorkerGroupError("rank 0 and 1 failed", {1: bad, 0: RuntimeError("collective aborted")})
    assert worker_user_error(group) is bad
    wrapped = RayTaskError("train_fn", "Traceback ...\nDataError: ...", bad).as_instanceof_cause()
    assert isinstance(wrapped, DataError) and worker_user_error(ControllerError(wrapped)) is bad
    try:
        raise RuntimeError("v1 TrainingFailedError") from bad
    except RuntimeError as chained:
        assert worker_user_error(chained) is bad
    assert worker_user_error(WorkerGroupError("oom", {0: MemoryError()})) is None
