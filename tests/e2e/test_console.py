"""`kiln --verbose pretrain` shows Ray's and the workers' own chatter on the console (issue 13), which a plain
run keeps in <out>/logs/ray.log: what a plain piped run prints (progress lines, validation results, where the
outputs went, none of the chatter) is checked on the run of test_relative_paths.py. A real run: 2 Ray Train
workers, W&B offline, configs/tiny-bert.yaml as a user runs it."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from e2e_testlib import CONSOLE_RUN

from data_pipeline.config import DataConfig
from data_pipeline.prepare import prepare

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]


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
            *CONSOLE_RUN,
            *extra,
            "--out",
            str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_verbose_shows_rays_own_output(data_dir: Path, tmp_path: Path) -> None:
    result = pretrain(data_dir, tmp_path / "run", "trainer.max_steps=2", verbose=True)
    console = result.stdout + result.stderr
    assert result.returncode == 0, console[-3000:]
    assert re.search(r"\((RayTrainWorker|TrainController) pid=\d+", console), console
    assert "[bert] step 2/2" in result.stdout
