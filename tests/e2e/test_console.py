"""What `kiln pretrain` prints when its output is not a terminal (issue 13: a quiet, useful console): progress
lines, validation results and where the outputs went, and none of Ray's or W&B's own chatter, which goes to
<out>/logs/ray.log instead; `--verbose` shows that chatter on the console. A real run: 2 Ray Train workers,
W&B offline, configs/tiny-bert.yaml as a user runs it."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from data_pipeline.config import DataConfig
from data_pipeline.prepare import prepare

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]
# Lines of Ray's and W&B's internals seen on the console of a run before issue 13.
NOISE = (
    "PlacementGroupCleaner",
    "core_worker",
    "RayTrainWorker pid=",
    "TrainController pid=",
    "wandb: WARNING",
    "Token authentication",
    "token authentication",
    "Started a local Ray instance",
    "GPU available",
)
SMALL = [
    "trainer.max_steps=4",
    "cluster.num_workers=2",
    "trainer.batch_size=8",
    "trainer.log_every=2",
    "trainer.val_every=2",
    "trainer.limit_val_batches=1",
    "trainer.checkpoint_every=0",
]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("data") / "data"
    prepare(
        DataConfig(
            sample_docs=60, sample_pairs=10, sample_labelled=10, vocab_size=512, tasks=["mlm_nsp"]
        ),
        out,
    )
    return out


def pretrain(
    data_dir: Path, out: Path, *extra: str, verbose: bool = False
) -> subprocess.CompletedProcess:
    flags = ["--verbose"] if verbose else []
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "cluster",
            *flags,
            "pretrain",
            "--config",
            "configs/tiny-bert.yaml",
            f"data_dir={data_dir}",
            *SMALL,
            *extra,
            "--out",
            str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_a_piped_run_prints_progress_and_outputs_and_no_internals(
    data_dir: Path, tmp_path: Path
) -> None:
    result = pretrain(data_dir, tmp_path / "run")
    console = result.stdout + result.stderr
    assert result.returncode == 0, console[-3000:]
    assert "\x1b[" not in console and "\r" not in console
    for noise in NOISE:
        assert noise not in console, f"{noise!r} on the console:\n{console}"
    steps = re.findall(
        r"^\[bert\] step (\d+)/4 loss \S+ .*tokens/s \| .* elapsed, ETA ", result.stdout, re.M
    )
    assert steps == ["2", "4"], result.stdout  # every trainer.log_every steps, and the last
    assert re.search(r"^\[bert\] validation at step 2: val/loss \d", result.stdout, re.M), (
        result.stdout
    )
    checkpoint = tmp_path / "run" / "checkpoints" / "step-0000004"
    assert f"[bert] checkpoint: {checkpoint}" in result.stdout
    assert f"[bert] outputs: {tmp_path / 'run'}" in result.stdout
    assert result.stderr == "", result.stderr
    ray_log = (tmp_path / "run" / "logs" / "ray.log").read_text()
    # Ray's own output and the workers' are kept, in the run directory
    assert "Started a local Ray instance" in ray_log and "(RayTrainWorker pid=" in ray_log


def test_verbose_shows_rays_own_output(data_dir: Path, tmp_path: Path) -> None:
    result = pretrain(data_dir, tmp_path / "run", "trainer.max_steps=2", verbose=True)
    console = result.stdout + result.stderr
    assert result.returncode == 0, console[-3000:]
    assert re.search(r"\((RayTrainWorker|TrainController) pid=\d+", console), console
    assert "[bert] step 2/2" in result.stdout
