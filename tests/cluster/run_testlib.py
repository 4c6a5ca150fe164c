"""Helpers of the tests/cluster tests that run `kiln` for real (the shared run is conftest.py's `offline_run`)."""

from __future__ import annotations

import secrets
import subprocess
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def prepare_tiny_data(out: Path) -> None:
    """A tiny MLM+NSP dataset; the Ray this starts in the test process is shut down again (the run under test is a
    separate `kiln` process with its own Ray, and an idle one here would only compete for the 2 CPUs)."""
    import ray

    from data_pipeline.config import DataConfig
    from data_pipeline.prepare import prepare

    started_here = not ray.is_initialized()
    prepare(
        DataConfig(
            sample_docs=40, sample_pairs=10, sample_labelled=10, vocab_size=512, tasks=["mlm_nsp"]
        ),
        out,
    )
    if started_here:
        ray.shutdown()


def canary() -> str:
    """The shape of a real W&B key (40 hex characters); made now, so in no file."""
    return secrets.token_hex(20)


@dataclass(frozen=True)
class OfflineRun:
    data: Path
    out: Path
    result: subprocess.CompletedProcess
    secrets: tuple[str, ...]  # WANDB_API_KEY and HF_TOKEN of the run's environment
