"""Secrets travel only as environment variables: a canary WANDB_API_KEY / HF_TOKEN set in the environment appears
in nothing a run writes (checkpoints, metrics, the W&B offline run, logs) nor in what a submission sends to Ray.
(The submission against a real Ray head, and Ray's stored job info, are checked in test_local_cluster.py.)"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from run_testlib import OfflineRun, canary

import cluster.submit
from cluster.tracking import REDACTED, find_secrets, scrub
from data_pipeline.configlib import ConfigError

ROOT = Path(__file__).resolve().parents[2]


def files_containing(root: Path, needle: str) -> list[Path]:
    data = needle.encode()
    return [
        p
        for p in Path(root).rglob("*")
        if p.is_file() and not p.is_symlink() and data in p.read_bytes()
    ]


class _FakeJobsClient:
    def __init__(self) -> None:
        self.submitted: dict[str, Any] = {}

    def submit_job(self, **kwargs: Any) -> str:
        self.submitted = kwargs
        return "raysubmit_fake"


def test_a_submission_sends_no_secret(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    key, token = canary(), canary()
    monkeypatch.setenv("WANDB_API_KEY", key)
    monkeypatch.setenv("HF_TOKEN", token)
    fake = _FakeJobsClient()
    monkeypatch.setattr(cluster.submit, "client", lambda address: fake)
    monkeypatch.setattr(cluster.submit, "_check_resources", lambda address, cfg: None)
    from cluster.config import load_config
    from cluster.jobs import PretrainJob

    job = load_config(PretrainJob, ROOT / "configs" / "tiny-bert.yaml", ["wandb.mode=online"])
    job_id = cluster.submit.submit(
        "pretrain",
        ROOT / "configs" / "tiny-bert.yaml",
        ["wandb.mode=online"],
        Path("/shared/out"),
        "http://127.0.0.1:8265",
        job=job,
    )
    assert job_id == "raysubmit_fake"
    sent = json.dumps(fake.submitted)
    assert key not in sent and token not in sent
    assert set(fake.submitted) == {"entrypoint", "runtime_env", "metadata"}
    assert "env_vars" not in fake.submitted["runtime_env"]  # Ray would store and log them verbatim
    assert fake.submitted["metadata"]["kiln_num_workers"] == "2"
    assert key not in capsys.readouterr().out


def test_a_secret_typed_into_an_override_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    key = canary()
    monkeypatch.setenv("WANDB_API_KEY", key)
    payload = {
        "entrypoint": cluster.submit.entrypoint("pretrain", None, [f"wandb.name={key}"], None),
        "runtime_env": {},
        "metadata": {},
    }
    with pytest.raises(ConfigError, match="WANDB_API_KEY") as err:
        cluster.submit.check_no_secrets(payload)
    assert key not in str(err.value)


def test_scrub_replaces_secret_values_everywhere(monkeypatch: pytest.MonkeyPatch) -> None:
    token = canary()
    monkeypatch.setenv("HF_TOKEN", token)
    config = {"wandb": {"tags": [f"x{token}y"], "name": token}, "steps": 3}
    clean = scrub(config)
    assert clean == {"wandb": {"tags": [f"x{REDACTED}y"], "name": REDACTED}, "steps": 3}
    assert (
        find_secrets(json.dumps(config)) == ["HF_TOKEN"] and find_secrets(json.dumps(clean)) == []
    )
    monkeypatch.setenv("HF_TOKEN", "short")  # too short to match without flagging ordinary words
    assert scrub({"a": "short"}) == {"a": "short"}


@pytest.mark.e2e
def test_no_file_a_run_writes_holds_a_secret(offline_run: OfflineRun) -> None:
    # A 2-worker run with a canary WANDB_API_KEY and HF_TOKEN in its environment (tests/cluster/conftest.py)
    written = [p for p in offline_run.out.rglob("*") if p.is_file()]
    # The grep covers what a run writes: checkpoints, metrics, the loss curve and the W&B offline run.
    assert any(p.suffix == ".wandb" for p in written) and any(
        p.name == "model.safetensors" for p in written
    )
    assert (offline_run.out / "metrics.csv").is_file()
    assert (offline_run.out / "loss_curve.png").is_file()
    for secret in offline_run.secrets:
        assert files_containing(offline_run.out, secret) == []
        assert secret not in offline_run.result.stdout and secret not in offline_run.result.stderr
