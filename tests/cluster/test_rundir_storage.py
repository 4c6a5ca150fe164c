"""cluster/rundir.py with `--out` on the loopback S3 server: the run's layout on the bucket, a working directory of
this process's own, the same refusals and clean-up as on a local disk, and what driver and workers exchange (stop
request, summary, W&B run id) kept on the bucket."""

from __future__ import annotations

from pathlib import Path

import pytest
from s3_testlib import S3Server

from cluster.preemption import clear_stop_request, stop_file
from cluster.resume import continues_run, has_checkpoint
from cluster.rundir import MARKER, RunDir, run_dir
from cluster.tracking import ensure_run_id, read_run_id
from data_pipeline.configlib import ConfigError
from data_pipeline.storage import Location


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("KILN_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_a_remote_run_works_in_its_own_scratch_and_publishes_to_the_bucket(
    s3: S3Server, cache: Path
) -> None:
    uri = s3.prefix("run")
    with run_dir(uri) as run:
        assert run.remote and str(run) == uri and Location.of(uri).list() == [MARKER]
        assert run.local.is_dir() and str(cache) in str(run.local) and run.local.name == "driver"
        (run / "metrics.csv").write_text("epoch,step\n")
        (run / "eval").mkdir()
        (run / "eval" / "metrics.json").write_text("{}")
        run.publish("metrics.csv", "eval", "absent.png")
        run.write_json("train_summary.json", {"steps": 3})
    assert Location.of(uri).walk() == [
        MARKER,
        "eval/metrics.json",
        "metrics.csv",
        "train_summary.json",
    ]
    worker = RunDir(uri, role="rank-1")
    assert worker.local != run.local and worker.read_json("train_summary.json") == {"steps": 3}
    worker.fresh_scratch()
    assert worker.fetch("metrics.csv") and (worker / "metrics.csv").read_text() == "epoch,step\n"
    assert not worker.fetch("nothing.csv")


def test_a_remote_out_is_refused_or_replaced_as_a_local_one_is(s3: S3Server, cache: Path) -> None:
    foreign = Location.of(s3.prefix("foreign"))
    (foreign / "data.bin").write_bytes(b"x")
    for overwrite in (False, True):
        with (
            pytest.raises(ConfigError, match=rf"^{foreign}: "),
            run_dir(foreign.text, overwrite=overwrite),
        ):
            pass
    assert foreign.list() == ["data.bin"]  # never deleted
    ours = s3.prefix("ours")
    with run_dir(ours) as run:
        run.write_json("train_summary.json", {})
    with pytest.raises(ConfigError, match="not empty"), run_dir(ours):
        pass
    assert continues_run(RunDir(ours), "auto") and not continues_run(RunDir(ours), "never")
    with run_dir(ours, "auto") as run:  # continued: kept as it is
        assert "train_summary.json" in run.out.list()
    with run_dir(ours, overwrite=True) as run:
        assert run.out.list() == [MARKER]


def test_bad_input_before_a_checkpoint_removes_what_the_run_wrote_to_the_bucket(
    s3: S3Server, cache: Path
) -> None:
    empty, kept = s3.prefix("empty"), s3.prefix("kept")
    with pytest.raises(ConfigError), run_dir(empty):
        raise ConfigError("bad input")
    assert not Location.of(empty).list()
    with pytest.raises(ConfigError), run_dir(kept) as run:
        (run.checkpoints / "step-0000001" / "model.safetensors").write_bytes(b"w")
        raise ConfigError("bad input")
    assert has_checkpoint(RunDir(kept)) and continues_run(RunDir(kept), "auto")


def test_stop_request_and_run_id_live_on_the_bucket(s3: S3Server, cache: Path) -> None:
    run = RunDir(s3.prefix("signals"))
    assert stop_file(run).text == f"{run.out}/STOP" and not stop_file(run).exists()
    stop_file(run).write_text("SIGTERM")
    assert stop_file(RunDir(run.out.text, role="rank-0")).exists()  # another process sees it
    clear_stop_request(run)
    assert not stop_file(run).exists()
    run_id = ensure_run_id(run)
    assert ensure_run_id(run) == run_id == read_run_id(RunDir(run.out.text, role="rank-0"))
    assert Location.of(f"{run.out}/wandb/run_id").read_text() == run_id
