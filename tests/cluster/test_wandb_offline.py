"""W&B offline by default: a tiny 2-worker run leaves, under its output directory, offline runs of one run id whose
records hold the logged metric keys (from rank 0 only), the resolved config, the loss curve image and the
checkpoint artifact; `kiln wandb sync` finds them."""

from __future__ import annotations

import csv
import json
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from run_testlib import OfflineRun

from cluster.jobs import WandbConfig
from cluster.tracking import build_loggers, ensure_run_id, offline_runs

ROOT = Path(__file__).resolve().parents[2]


def wandb_records(path: Path) -> Iterator[object]:
    """The protobuf records of a `run-*.wandb` file: W&B's LevelDB-style log (a 7-byte file header, then 32 KiB
    blocks of records, each with a 7-byte header: crc32, length, type full/first/middle/last)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path}: not a W&B transaction log"
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind == 0:
            continue
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record


def _summarise(run_file: Path) -> dict:
    found: dict = {"history": [], "config": {}, "artifacts": [], "exit": False, "run_id": None}
    for record in wandb_records(run_file):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            found["run_id"] = record.run.run_id
            found["config"].update(
                {i.key: json.loads(i.value_json) for i in record.run.config.update}
            )
        elif kind == "config":
            found["config"].update({i.key: json.loads(i.value_json) for i in record.config.update})
        elif kind == "history":
            found["history"].append(
                {i.key or "/".join(i.nested_key): i.value_json for i in record.history.item}
            )
        elif kind == "artifact":
            found["artifacts"].append((record.artifact.type, record.artifact.name))
        elif kind == "exit":
            found["exit"] = True
    return found


def test_one_run_id_per_output_directory(tmp_path: Path) -> None:
    first = ensure_run_id(tmp_path / "a")
    assert ensure_run_id(tmp_path / "a") == first  # a retry (or resumed job) on the same directory
    assert ensure_run_id(tmp_path / "b") != first
    loggers = build_loggers(
        WandbConfig(mode="offline"), tmp_path / "a", "bert", {"task": "mlm_nsp"}
    )
    assert [type(lg).__name__ for lg in loggers] == ["CSVLogger", "WandbLogger"]
    assert loggers[1].version == first  # every worker and every retry resumes this id
    assert len(build_loggers(WandbConfig(mode="disabled"), tmp_path / "a", "bert", {})) == 1


def test_sync_without_offline_runs_is_a_clear_error(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "cluster", "wandb", "sync", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "no offline W&B runs" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.e2e
def test_offline_run_holds_metrics_config_and_artifacts(offline_run: OfflineRun) -> None:
    # a 2-worker, 4-step run (tests/cluster/conftest.py)
    out, data = offline_run.out, offline_run.data
    run_id = (out / "wandb" / "run_id").read_text().strip()
    runs = [_summarise(next(d.glob("run-*.wandb"))) for d in offline_runs(out)]
    assert runs and all(
        r["run_id"] == run_id and r["exit"] for r in runs
    )  # one id; every run finished

    training = [r for r in runs if any("train/loss" in h for h in r["history"])]
    assert len(training) == 1, "metrics must come from rank 0 only"
    logged = {key for row in training[0]["history"] for key in row}
    with open(out / "metrics.csv", newline="") as f:
        csv_keys = set(next(csv.reader(f))) - {"epoch", "step"}
    assert (
        {"train/loss", "train/lr", "train/mlm_acc", "train/nsp_acc", "val/loss"}
        <= csv_keys
        <= logged
    )
    assert sorted({json.loads(row["trainer/global_step"]) for row in training[0]["history"]}) == [
        0,
        1,
        2,
        3,
    ]

    config = training[0]["config"]
    assert config["task"] == "mlm_nsp" and config["data_dir"] == str(data)
    assert config["trainer"]["max_steps"] == 4 and config["cluster"]["num_workers"] == 2
    assert config["model"]["arch"] == "bert" and config["wandb"]["mode"] == "offline"

    media = {key for r in runs for row in r["history"] for key in row}
    assert (
        "images/loss_curve/_type" in media
    )  # the loss curve PNG, logged by the driver after training
    assert ("model", f"bert-{run_id}") in [a for r in runs for a in r["artifacts"]]

    sync = subprocess.run(
        [sys.executable, "-m", "cluster", "wandb", "sync", str(out), "--dry-run"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert sync.returncode == 0, sync.stderr
    assert f"{len(runs)} offline run directories" in sync.stdout
    assert sync.stderr.count(f"run-{run_id}.wandb") == len(
        runs
    )  # wandb lists each file it would upload
