"""Everything under `s3://` on the loopback SeaweedFS server, as a user types it: `kiln data prepare --out s3://…`,
`kiln pretrain data_dir=s3://… --out s3://…` stopped by SIGTERM and continued with `trainer.resume=auto` (weights
bitwise equal to an uninterrupted run), and bad storage input. No file of the run is left on local disk but the Kiln
cache; the bucket holds the run's layout (checkpoints with their manifests, metrics.csv, the loss curve, the
summary). `kiln finetune` from a remote run, `kiln evaluate` and `kiln export` from remote checkpoints are the
README's own commands, run against this server by tests/docs/test_docs_commands.py (s3-cls, s3-evaluate,
s3-export)."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from e2e_testlib import sigterm_after_step
from s3_testlib import S3Server

from cluster.preemption import EXIT_PREEMPTED
from data_pipeline.storage import Location
from pretrain.checkpoint import (
    list_checkpoints,
    load_checkpoint,
    resolve_checkpoint,
    verify_checkpoint,
)

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]
SAMPLE = [
    "data.sample_docs=40",
    "data.sample_pairs=20",
    "data.sample_labelled=60",
    "data.vocab_size=512",
    "data.tasks=[clm,classification]",
]
GPT = [
    "trainer.batch_size=4",
    "trainer.log_every=1",
    "trainer.val_every=3",
    "trainer.limit_val_batches=1",
    "trainer.checkpoint_every=2",
    "trainer.keep_last=2",
    "optim.warmup_steps=2",
    "optim.schedule=constant",
    "wandb.mode=offline",
]


def kiln(*args: str, cwd: Path, timeout: float = 400) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "cluster", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def s3_env(s3_server: S3Server, tmp_path_factory: pytest.TempPathFactory) -> S3Server:
    """The server's AWS_* variables, and a Kiln cache of this module's own, in os.environ (inherited
    by every `kiln` this module runs)."""
    saved = dict(os.environ)
    os.environ.update(s3_server.env())
    os.environ["KILN_CACHE"] = str(tmp_path_factory.mktemp("kiln-cache"))
    yield s3_server
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(scope="module")
def data(s3_env: S3Server, tmp_path_factory: pytest.TempPathFactory) -> str:
    uri = s3_env.prefix("data")
    done = kiln("data", "prepare", *SAMPLE, "--out", uri, cwd=tmp_path_factory.mktemp("cwd"))
    assert done.returncode == 0, done.stdout + done.stderr
    return uri


def test_pretrain_preempted_and_resumed_on_s3_equals_an_uninterrupted_run(
    data: str, s3_env: S3Server, tmp_path: Path
) -> None:
    common = ["--config", str(ROOT / "configs" / "tiny-gpt.yaml"), f"data_dir={data}", *GPT]
    out, lines = s3_env.prefix("gpt-resumed"), []
    proc = subprocess.Popen(
        [sys.executable, "-m", "cluster", "pretrain", *common, "trainer.max_steps=100000"]
        + ["--out", out],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "KILN_STOP_POLL_S": "0"},  # look at the bucket's STOP after every step
    )
    reader = threading.Thread(target=sigterm_after_step, args=(proc, 3, lines), daemon=True)
    reader.start()
    try:
        code = proc.wait(timeout=400)
    finally:
        proc.kill()
    reader.join(timeout=10)
    assert code == EXIT_PREEMPTED, "".join(lines)[-3000:]
    assert "step 3/100000" in "".join(lines)  # rank 0's progress reached the driver's console
    summary = json.loads(Location.of(out + "/train_summary.json").read_text())
    steps = summary["steps"]
    assert summary["preempted"] and summary["checkpoint"] == f"{out}/checkpoints/step-{steps:07d}"
    # every rank stopped at one step (the preemption path of a local --out is the same code: no test
    # of its own, see tests/e2e/test_resume.py)
    assert summary["stopped_at_per_rank"] == [steps, steps], summary
    assert f"every worker stopped at step {steps}" in "".join(lines)
    verify_checkpoint(summary["checkpoint"])  # complete, every sha256 right, on the bucket
    assert Location.of(out + "/STOP").is_file()  # the request went through the bucket

    end = f"trainer.max_steps={steps + 3}"
    full = s3_env.prefix("gpt-full")
    done = kiln("pretrain", *common, end, "--out", full, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    done = kiln("pretrain", *common, end, "trainer.resume=auto", "--out", out, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads(Location.of(out + "/train_summary.json").read_text())
    assert summary["resumed_from"] == f"{out}/checkpoints/step-{steps:07d}"
    assert summary["steps"] == steps + 3 and not Location.of(out + "/STOP").exists()
    names = [Location.of(c).name for c in list_checkpoints(out + "/checkpoints")]
    assert names[-1] == f"step-{steps + 3:07d}" and len(names) == 2  # keep_last=2, on the bucket
    want = load_checkpoint(resolve_checkpoint(full)).state_dict
    got = load_checkpoint(resolve_checkpoint(out)).state_dict
    assert [k for k in want if not torch.equal(got[k], want[k])] == []  # bitwise, every tensor
    files = set(Location.of(out).list())
    assert {"metrics.csv", "loss_curve.png", "train_summary.json", "checkpoints", "wandb"} <= files
    rows = csv.DictReader(io.StringIO(Location.of(out + "/metrics.csv").read_text()))
    logged = [int(float(r["step"])) for r in rows if r.get("train/loss")]
    assert logged == list(range(steps + 3))  # the rows before the stop kept, then the resumed ones
    assert not any(tmp_path.iterdir())  # nothing of the runs on local disk (the cache aside)


def test_bad_storage_input_is_one_line_and_exit_2(
    data: str, s3_env: S3Server, tmp_path: Path
) -> None:
    config = ["--config", str(ROOT / "configs" / "tiny-gpt.yaml"), *GPT, "trainer.max_steps=2"]
    cases = {
        "s3://no-such-bucket/run": "the bucket 'no-such-bucket' does not exist",
        "nosuch://b/run": "nosuch://b/run: cannot open this location",
    }
    for out, message in cases.items():
        done = kiln("pretrain", *config, f"data_dir={data}", "--out", out, cwd=tmp_path)
        assert done.returncode == 2 and message in done.stderr, done.stderr[-2000:]
        assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    missing = s3_env.prefix("absent")
    done = kiln(
        "pretrain", *config, f"data_dir={missing}", "--out", s3_env.prefix("r"), cwd=tmp_path
    )
    assert done.returncode == 2 and missing in done.stderr, done.stderr[-2000:]
    env = {**os.environ, "AWS_SECRET_ACCESS_KEY": "wrong"}
    done = subprocess.run(
        [sys.executable, "-m", "cluster", "pretrain", *config, f"data_dir={data}"]
        + ["--out", s3_env.prefix("r")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode == 2 and "access denied" in done.stderr, done.stderr[-2000:]
