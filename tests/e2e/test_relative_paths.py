"""Issue 13's first hour, at smoke size: `kiln data prepare` and `kiln pretrain` run from a
directory of the user's with RELATIVE --out and data_dir on 2 Ray Train workers (whose working
directory is not the user's), and the checkpoint records the resolved paths. Its console, captured
without a terminal, is what issue 13 asks of one: progress lines every trainer.log_every steps and
at the last, validation results, where the checkpoint and outputs went, none of Ray's or W&B's own
chatter (that is in <out>/logs/ray.log; `--verbose` shows it: test_console.py). And a data error only a
worker can see (a shard whose bytes were overwritten, listed and present, so the driver's checks
pass) ends the command like a driver's error: one line, exit code 2, no traceback, and no output
directory left behind."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from e2e_testlib import CONSOLE_NOISE, CONSOLE_RUN

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]
PREPARE = ["data.sample_docs=60", "data.tasks=[mlm_nsp]", "data.vocab_size=512", "data.seq_len=32"]
SMOKE = [
    "trainer.max_steps=2",
    "trainer.batch_size=4",
    "trainer.val_every=2",
    "trainer.log_every=1",
    "trainer.limit_val_batches=1",
    "trainer.checkpoint_every=0",
    "wandb.mode=disabled",
]


def kiln(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "cluster", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_relative_paths_on_ray_workers_and_a_worker_side_data_error(tmp_path: Path) -> None:
    (tmp_path / "configs").mkdir()
    for recipe in ("data-sample.yaml", "tiny-bert.yaml"):
        shutil.copy(ROOT / "configs" / recipe, tmp_path / "configs" / recipe)
    prepared = kiln(
        tmp_path,
        "data",
        "prepare",
        "--config",
        "configs/data-sample.yaml",
        "--out",
        "runs/data",
        *PREPARE,
    )
    assert prepared.returncode == 0, prepared.stderr[-3000:]

    run = kiln(
        tmp_path,
        "pretrain",
        "--config",
        "configs/tiny-bert.yaml",
        "--out",
        "runs/bert",
        *CONSOLE_RUN,
    )
    assert run.returncode == 0, (run.stdout + run.stderr)[-3000:]
    out = tmp_path / "runs" / "bert"
    manifest = out / "checkpoints" / "step-0000004" / "manifest.json"
    recorded = json.loads(manifest.read_text())["job_config"]["data_dir"]
    assert recorded == str(tmp_path / "runs" / "data")  # the resolved path
    check_console(run, out)

    # The same data with one training shard's bytes overwritten: present and listed (what the
    # driver checks), its bytes not those of the manifest's sha256 (only the worker that reads it
    # can tell: the loader checks each shard on its first read).
    shutil.copytree(tmp_path / "runs" / "data", tmp_path / "broken")
    shard = tmp_path / "broken" / "mlm_nsp" / "train" / "part-00000.parquet"
    shard.write_bytes(b"\0" * shard.stat().st_size)
    failed = kiln(
        tmp_path,
        "pretrain",
        "--config",
        "configs/tiny-bert.yaml",
        "data_dir=broken",
        "--out",
        "runs/broken",
        *SMOKE,
    )
    assert failed.returncode == 2, failed.stderr[-3000:]
    errors = [line for line in failed.stderr.splitlines() if line.startswith("kiln: error:")]
    assert len(errors) == 1 and errors[0].startswith(f"kiln: error: {shard}: sha256 does not match")
    assert failed.stderr.rstrip().endswith(errors[0]) and "Traceback" not in failed.stderr
    assert not (tmp_path / "runs" / "broken").exists()  # bad input, no checkpoint: nothing left


def check_console(run: subprocess.CompletedProcess, out: Path) -> None:
    """What a piped `kiln pretrain` of 4 steps logged every 2 prints: issue 13's quiet, useful console."""
    console = run.stdout + run.stderr
    assert "\r" not in console
    for noise in CONSOLE_NOISE:
        assert noise not in console, f"{noise!r} on the console:\n{console}"
    steps = re.findall(
        r"^\[bert\] step (\d+)/4 loss \S+ .*tokens/s \| .* elapsed, ETA ", run.stdout, re.M
    )
    assert steps == ["2", "4"], run.stdout  # every trainer.log_every steps, and the last
    assert re.search(r"^\[bert\] validation at step 2: val/loss \d", run.stdout, re.M), run.stdout
    assert f"[bert] checkpoint: {out / 'checkpoints' / 'step-0000004'}" in run.stdout
    assert f"[bert] outputs: {out}" in run.stdout
    assert run.stderr == "", run.stderr
    ray_log = (out / "logs" / "ray.log").read_text()
    # Ray's own output and the workers' are kept, in the run directory
    assert "Started a local Ray instance" in ray_log and "(RayTrainWorker pid=" in ray_log
