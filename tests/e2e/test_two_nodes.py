"""Two Ray nodes that share no directory (tests/e2e/ray_nodes.py: own temp dir, working directory, HOME and Kiln
cache each) and the loopback S3 server: a 2-worker job runs with one worker on each node (one CPU each), its
data and outputs under `s3://`. Prepare → pretrain → the second node is killed mid-run (SIGKILL to its raylet and
workers) and started again → Ray Train restarts the worker group, which continues from this launch's newest
checkpoint in the bucket. The final weights are bitwise equal to an uninterrupted run's. (A fine-tune from a run
in the bucket and its evaluation are the README's s3-cls and s3-evaluate commands: tests/docs.)"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from ray_nodes import RayNode, free_port, wait_for_nodes
from s3_testlib import S3Server

from data_pipeline.storage import Location
from pretrain.checkpoint import load_checkpoint, resolve_checkpoint

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]
GPT = [
    "--config",
    str(ROOT / "configs" / "tiny-gpt.yaml"),
    "cluster.num_workers=2",
    "cluster.cpus_per_worker=1",
    "cluster.max_failures=2",
    "trainer.max_steps=40",
    "trainer.batch_size=8",
    "trainer.log_every=1",
    "trainer.val_every=100",
    "trainer.checkpoint_every=4",
    "optim.warmup_steps=2",
    "optim.schedule=constant",
    "wandb.mode=disabled",
]


@pytest.fixture(scope="module")
def cluster(s3_server: S3Server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """A head and a second node, both with the S3 server's AWS_* variables (what each node of a real
    cluster needs: network access to the endpoint and credentials, no shared directory)."""
    root = tmp_path_factory.mktemp("nodes")
    # Whatever an earlier test's init_ray left in this process's environment: RAY_AUTH_MODE=token
    # (these nodes, each with a HOME of its own, would find no token and exit) and
    # RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (Ray's single-machine mode for one loopback node: a second
    # node then refuses to join). No token authentication; a cluster of several raylets on loopback.
    left = (
        "RAY_AUTH_MODE",
        "RAY_AUTH_TOKEN",
        "RAY_AUTH_TOKEN_PATH",
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER",
    )
    env = {k: v for k, v in os.environ.items() if k not in left} | s3_server.env()
    env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "1"
    port = free_port()
    head = RayNode("node_head", root / "head", env, port, head=True).start()
    second = RayNode("node_b", root / "b", env, port).start()
    try:
        wait_for_nodes(head.address, 2, env)
        # the driver's own cache and HOME (no ~/.ray/auth_token of another test's head: these nodes
        # run without token authentication)
        (root / "driver-home").mkdir()
        driver = {
            **env,
            "RAY_ADDRESS": head.address,
            "KILN_CACHE": str(root / "driver-cache"),
            "HOME": str(root / "driver-home"),
        }
        yield {"env": driver, "root": root, "second": second, "address": head.address}
    finally:
        for node in (second, head):
            node.stop()


def kiln(cluster: dict, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    cwd = cluster["root"] / "driver-cwd"
    cwd.mkdir(exist_ok=True)
    return subprocess.run(
        [sys.executable, "-m", "cluster", *args],
        cwd=cwd,
        env=cluster["env"],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _kill_second_node_at(
    proc: subprocess.Popen, step: int, cluster: dict, lines: list[str]
) -> None:
    """Reads the driver's output; at `step` kills the second node, then starts it again."""
    killed = False
    for line in proc.stdout:  # type: ignore[union-attr]
        lines.append(line)
        if not killed and f"] step {step}/" in line:
            cluster["second"].kill()
            killed = True
            lines.append("<<< second node killed >>>\n")
            time.sleep(3)
            node = cluster["second"]
            cluster["second"] = RayNode(node.name, node.root, node.env, node.head_port).start()


def test_a_job_survives_the_loss_of_a_node_with_everything_on_s3(
    cluster: dict, s3: S3Server
) -> None:
    s3_server = s3  # its AWS_* variables in this process's environment too (to read the results)
    data = s3_server.prefix("two-nodes-data")
    done = kiln(cluster, "data", "prepare", "data.sample_docs=60", "data.vocab_size=512",
                "data.tasks=[clm,classification]", "data.sample_labelled=60", "--out", data)  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]

    reference = s3_server.prefix("reference")
    done = kiln(cluster, "pretrain", *GPT, f"data_dir={data}", "--out", reference)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    out, lines = s3_server.prefix("survivor"), []
    proc = subprocess.Popen(
        [sys.executable, "-m", "cluster", "pretrain", *GPT, f"data_dir={data}", "--out", out],
        cwd=cluster["root"] / "driver-cwd",
        env=cluster["env"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    reader = threading.Thread(
        target=_kill_second_node_at, args=(proc, 10, cluster, lines), daemon=True
    )
    reader.start()
    try:
        code = proc.wait(timeout=600)
    finally:
        proc.kill()
    reader.join(timeout=10)
    output = "".join(lines)
    assert code == 0 and "<<< second node killed >>>" in output, output[-4000:]
    assert f"continuing from {out}/checkpoints/step-" in output, output[-4000:]
    summary = json.loads(Location.of(f"{out}/train_summary.json").read_text())
    assert summary["steps"] == 40 and summary["checkpoint"] == f"{out}/checkpoints/step-0000040"
    # one worker on each node: each node's own cache holds a rank's scratch directory of this run
    digest = hashlib.sha256(out.encode()).hexdigest()[:16]
    for node in ("head", "b"):
        assert list((cluster["root"] / node / "cache" / "runs" / digest).glob("rank-*")), node
    want = load_checkpoint(resolve_checkpoint(reference)).state_dict
    got = load_checkpoint(resolve_checkpoint(out)).state_dict
    assert [k for k in want if not torch.equal(got[k], want[k])] == []  # bitwise, every tensor

    assert not any((cluster["root"] / "driver-cwd").iterdir())  # nothing local but the caches
