"""`kiln cluster` and `kiln submit` against a real local Ray head, through the CLI: `kiln cluster up` on loopback
(free ports), a data job and a tiny pretraining job through the Jobs API (PENDING → RUNNING → SUCCEEDED, progress in
the logs), a second job stopped, both listed, `kiln cluster down`. The head runs with a canary WANDB_API_KEY in its
environment, and the submitter has one too: neither appears in Ray's job info, the job's output or Ray's session
files. Plus the fast checks around them: the upload size check, unsafe addresses, stale state."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from cluster.local import LocalCluster, _write_state, down, free_port, up
from cluster.submit import _address, check_upload_size
from data_pipeline.configlib import ConfigError

ROOT = Path(__file__).resolve().parents[2]
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


def kiln(env: dict[str, str], *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "cluster", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def files_containing(root: Path, needle: str) -> list[Path]:
    data = needle.encode()
    return [
        p
        for p in Path(root).rglob("*")
        if p.is_file() and not p.is_symlink() and data in p.read_bytes()
    ]


def _token() -> str:
    if os.environ.get("RAY_AUTH_TOKEN"):
        return os.environ["RAY_AUTH_TOKEN"]
    return (
        Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
        .read_text()
        .strip()
    )


class JobsApi:
    """Ray's Jobs REST API read directly (what `ray job status` and the SDK see), polled from a thread so a job's
    short PENDING phase is caught."""

    def __init__(self, url: str) -> None:
        self.url, self.seen = url, {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def get(self, path: str) -> object:
        request = urllib.request.Request(
            f"{self.url}{path}", headers={"Authorization": f"Bearer {_token()}"}
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())

    def _poll(self) -> None:
        while not self._stop.is_set():
            try:
                for job in self.get("/api/jobs/"):
                    history = self.seen.setdefault(job["submission_id"], [])
                    if not history or history[-1] != job["status"]:
                        history.append(job["status"])
            except OSError:
                pass
            time.sleep(0.1)

    def wait(self, job_id: str, statuses: set[str], timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status = self.seen.get(job_id, [None])[-1]
            if status in statuses:
                return status
            time.sleep(0.2)
        raise AssertionError(
            f"{job_id} not in {statuses} after {timeout} s (seen {self.seen.get(job_id)})"
        )


@pytest.fixture(scope="module")
def head(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    home = tmp_path_factory.mktemp("kiln-home")
    canary = secrets.token_hex(20)
    port, dashboard = free_port(), free_port()
    env = {
        **os.environ,
        "KILN_HOME": str(home),
        "WANDB_API_KEY": canary,
        "TOKENIZERS_PARALLELISM": "false",
    }
    env.pop("RAY_ADDRESS", None)
    started = kiln(
        env,
        "cluster",
        "up",
        "--port",
        str(port),
        "--dashboard-port",
        str(dashboard),
        "--num-cpus",
        "2",
    )
    state = (
        json.loads((home / "cluster.json").read_text()) if (home / "cluster.json").is_file() else {}
    )
    api = JobsApi(f"http://127.0.0.1:{dashboard}")
    api._thread.start()
    try:
        assert started.returncode == 0, started.stderr[-3000:]
        yield {
            "env": env,
            "home": home,
            "canary": canary,
            "port": port,
            "dashboard": dashboard,
            "state": state,
            "api": api,
            "address": f"http://127.0.0.1:{dashboard}",
            "out": tmp_path_factory.mktemp("jobs"),
            "jobs": {},
        }
    finally:
        api._stop.set()
        kiln(env, "cluster", "down")
        if state.get("temp_dir", "").startswith("/tmp/kiln-ray-"):
            shutil.rmtree(
                state["temp_dir"], ignore_errors=True
            )  # Ray's session logs; `down` keeps them for users


def test_upload_check_names_the_biggest_offenders(tmp_path: Path) -> None:
    (tmp_path / "code.py").write_text("print('hi')\n")
    for rel, mib in (
        ("runs/out/big.bin", 2),
        ("data/raw.bin", 2),
        ("scratch/tmp.bin", 2),
        ("weights.bin", 3),
        ("pkg/cache.bin", 1),
    ):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"\0" * (mib * 2**20))
    (tmp_path / ".rayignore").write_text("scratch/\n")
    with pytest.raises(ConfigError) as err:
        check_upload_size(tmp_path, limit_mib=2.5)
    message = str(err.value)
    assert "4.0 MiB would be uploaded" in message and "over the 2.5 MiB limit" in message
    assert "weights.bin 3.0 MiB" in message and "pkg/ 1.0 MiB" in message
    assert (
        "runs" not in message and "data/" not in message and "scratch" not in message
    )  # never uploaded
    assert check_upload_size(tmp_path, limit_mib=5) == 4 * 2**20 + len("print('hi')\n") + len(
        "scratch/\n"
    )


def test_cluster_up_and_submit_refuse_unsafe_addresses(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match="--allow-remote"):
        up(host="0.0.0.0")
    for address in ("ray://10.0.0.5:10001", "10.0.0.5:6379"):
        with pytest.raises(ConfigError, match="Jobs API is the dashboard"):
            _address(address)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with pytest.raises(ConfigError, match="--address"):  # never a guessed default
        _address(None)
    assert _address("https://ray.example.org") == "https://ray.example.org"


def test_down_clears_a_stale_record_and_touches_no_other_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KILN_HOME", str(tmp_path))
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        # A recorded pid that is alive but is not the `ray start` Kiln ran (pids are reused): never signalled.
        _write_state(
            LocalCluster(bystander.pid, "127.0.0.1", 1, 2, "/tmp/kiln-ray-x", "log", "token", 0.0)
        )
        assert down() is True
        assert bystander.poll() is None and not (tmp_path / "cluster.json").exists()
        assert down() is False  # nothing recorded any more
    finally:
        bystander.kill()
        bystander.wait()


def _submitted_id(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout.split("submitted ", 1)[1].split()[0]


@pytest.mark.e2e
def test_head_listens_on_loopback_only(head: dict) -> None:
    status = kiln(head["env"], "cluster", "status")
    assert status.returncode == 0, status.stderr
    assert "1 alive node(s)" in status.stdout and "resources: 2 CPU" in status.stdout, status.stdout
    ports = {head["port"], head["dashboard"]}
    listening = [
        c
        for c in psutil.net_connections(kind="tcp")
        if c.status == psutil.CONN_LISTEN and c.laddr.port in ports
    ]
    assert {c.laddr.port for c in listening} == ports
    assert all(c.laddr.ip in ("127.0.0.1", "::ffff:127.0.0.1") for c in listening), listening


@pytest.mark.e2e
def test_pretraining_job_goes_pending_running_succeeded(head: dict) -> None:
    env, address, out = head["env"], head["address"], head["out"]
    data_job = _submitted_id(
        kiln(
            env,
            "submit",
            "data-prepare",
            "--config",
            "configs/data-sample.yaml",
            "data.sample_docs=40",
            "data.sample_pairs=10",
            "data.sample_labelled=10",
            "data.vocab_size=512",
            "data.tasks=[mlm_nsp]",
            "--out",
            str(out / "data"),
            "--address",
            address,
        )
    )
    assert head["api"].wait(data_job, TERMINAL, 600) == "SUCCEEDED", kiln(
        env, "jobs", "logs", data_job, "--address", address
    ).stdout[-3000:]
    result = kiln(
        env,
        "submit",
        "pretrain",
        "--config",
        "configs/tiny-bert.yaml",
        f"data_dir={out / 'data'}",
        "trainer.max_steps=4",
        "trainer.log_every=1",
        "trainer.batch_size=8",
        "trainer.val_every=2",
        "trainer.limit_val_batches=1",
        "cluster.num_workers=2",
        "--out",
        str(out / "bert"),
        "--address",
        address,
    )
    job = _submitted_id(result)
    head["jobs"]["pretrain"] = job
    assert f"kiln jobs logs {job} --follow" in result.stdout
    assert head["api"].wait(job, TERMINAL, 600) == "SUCCEEDED"
    assert head["api"].seen[job] == ["PENDING", "RUNNING", "SUCCEEDED"]
    logs = kiln(env, "jobs", "logs", job, "--address", address).stdout
    for line in (
        "[bert] step 1/4",
        "[bert] step 4/4",
        "[bert] validation at step 2",
        "[bert] checkpoint:",
    ):
        assert line in logs, logs[-3000:]
    assert (out / "bert" / "checkpoints" / "step-0000004" / "model.safetensors").is_file()
    info = head["api"].get(f"/api/jobs/{job}")
    assert (
        info["metadata"]["kiln_num_workers"] == "2"
        and info["metadata"]["kiln_command"] == "pretrain"
    )


@pytest.mark.e2e
def test_a_second_job_is_stopped_and_both_are_listed(head: dict) -> None:
    env, address, out = head["env"], head["address"], head["out"]
    job = _submitted_id(
        kiln(
            env,
            "submit",
            "pretrain",
            "--config",
            "configs/tiny-bert.yaml",
            f"data_dir={out / 'data'}",
            "trainer.max_steps=100000",
            "trainer.log_every=1",
            "cluster.num_workers=1",
            "--out",
            str(out / "long"),
            "--address",
            address,
        )
    )
    head["api"].wait(job, {"RUNNING"}, 300)
    wait_for_log(env, job, address, "[bert] step 1/", timeout=300)
    stop = kiln(env, "jobs", "stop", job, "--address", address)
    assert stop.returncode == 0 and "stopping" in stop.stdout
    assert head["api"].wait(job, TERMINAL, 120) == "STOPPED"
    # `ray job stop` SIGTERMs the driver; the head's RAY_JOB_STOP_WAIT_TIME_S leaves it time to have the worker
    # checkpoint and stop (preemption) before Ray's SIGKILL.
    logs = wait_for_log(env, job, address, "preempted: every worker stopped at step", timeout=60)
    summary = json.loads((out / "long" / "train_summary.json").read_text())
    assert summary["preempted"] and Path(summary["checkpoint"]).is_dir(), logs[-3000:]
    listed = kiln(env, "jobs", "list", "--address", address).stdout.splitlines()
    rows = {line.split("\t")[0]: line.split("\t")[1] for line in listed}
    assert rows[job] == "STOPPED" and rows[head["jobs"]["pretrain"]] == "SUCCEEDED"
    status = kiln(env, "jobs", "status", job, "--address", address)
    assert status.stdout.splitlines()[0] == "STOPPED"


def wait_for_log(env: dict[str, str], job: str, address: str, text: str, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        logs = kiln(env, "jobs", "logs", job, "--address", address).stdout
        if text in logs:
            return logs
        time.sleep(2)
    raise AssertionError(f"{text!r} not in the logs of {job} after {timeout} s:\n{logs[-3000:]}")


@pytest.mark.e2e
def test_the_canary_secret_is_nowhere(head: dict) -> None:
    canary, api = head["canary"], head["api"]
    assert head["jobs"], "runs after the job tests"
    for job_id in api.seen:
        assert canary not in json.dumps(
            api.get(f"/api/jobs/{job_id}")
        )  # what Ray stores and serves
    assert (
        files_containing(head["out"], canary) == []
    )  # the jobs' outputs, W&B offline runs included
    assert any(head["out"].rglob("run-*.wandb"))
    assert (
        files_containing(Path(head["state"]["temp_dir"]), canary) == []
    )  # Ray's logs and session files
    assert files_containing(head["home"], canary) == []  # Kiln's state file and the head's log


@pytest.mark.e2e
def test_down_stops_the_head_it_started(head: dict) -> None:
    pid = head["state"]["pid"]
    down = kiln(head["env"], "cluster", "down", timeout=180)
    assert down.returncode == 0 and "stopped" in down.stdout, down.stderr
    assert not (head["home"] / "cluster.json").exists()
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    gone = [
        c
        for c in psutil.net_connections(kind="tcp")
        if c.status == psutil.CONN_LISTEN and c.laddr.port in (head["port"], head["dashboard"])
    ]
    assert gone == []
    again = kiln(head["env"], "cluster", "status")
    assert again.returncode == 2 and "no Kiln cluster is running" in again.stderr
