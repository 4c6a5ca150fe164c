"""Two Ray nodes on one machine that share no directory: a head and a second node, each started by `ray start
--block` in a process group of its own (so one node can be killed alone, as a lost machine would be), each with
its own temp dir, working directory, Kiln cache and HOME, and a custom resource naming it. Every port a second
raylet on the same address would otherwise take by default is chosen free."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

RAY = str(Path(sys.executable).parent / "ray")


def free_port() -> int:
    return free_ports(1)[0]


_GIVEN: set[int] = set()  # ports handed out in this process: a node may not have bound its own yet


def free_ports(count: int) -> list[int]:
    """`count` free ports, distinct and never handed out before in this process. Every socket stays bound until
    all are chosen: one at a time, the OS may hand a port just released out twice, and Ray then refuses to start
    ("trying to use a port number ... used by other components", seen 2026-12-04)."""
    sockets: list[socket.socket] = []
    try:
        ports: list[int] = []
        while len(ports) < count:
            sockets.append(socket.socket())
            sockets[-1].bind(("127.0.0.1", 0))
            if (port := sockets[-1].getsockname()[1]) not in _GIVEN:
                ports.append(port)
        _GIVEN.update(ports)
        return ports
    finally:
        for s in sockets:
            s.close()


@dataclass
class RayNode:
    name: str
    root: Path  # this node's own directory: temp dir, working directory, cache, home
    env: dict[str, str]
    head_port: int
    head: bool = False
    process: subprocess.Popen | None = None
    ports: dict[str, int] = field(default_factory=dict)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.head_port}"

    def start(self) -> RayNode:
        for sub in ("tmp", "cwd", "cache", "home"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        env = {
            **self.env,
            "KILN_CACHE": str(self.root / "cache"),
            "HOME": str(self.root / "home"),
            "RAY_USAGE_STATS_ENABLED": "0",
        }
        names = (
            "node-manager-port",
            "object-manager-port",
            "dashboard-agent-listen-port",
            "dashboard-agent-grpc-port",
            "metrics-export-port",
            "runtime-env-agent-port",
            "ray-client-server-port",
        )
        ports = dict(zip(names, free_ports(len(names)), strict=True))
        cmd = [RAY, "start", "--block", "--num-cpus=1", "--node-ip-address=127.0.0.1"]
        cmd += [f"--temp-dir={self.root / 'tmp'}", f"--resources={json.dumps({self.name: 1})}"]
        client_port = ports.pop("ray-client-server-port")
        cmd += [f"--{k}={v}" for k, v in ports.items()]
        if self.head:
            cmd += [f"--port={self.head_port}", "--head", "--include-dashboard=false"]
            cmd += [f"--ray-client-server-port={client_port}"]
        else:
            cmd += [f"--address={self.address}"]
        log = open(self.root / "ray-start.log", "ab")  # noqa: SIM115 (the node outlives this call)
        self.process = subprocess.Popen(
            cmd,
            cwd=self.root / "cwd",
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        return self

    def kill(self) -> None:
        """SIGKILL the node's whole process group: its raylet and every worker on it."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()


def wait_for_nodes(address: str, count: int, env: dict[str, str], timeout: float = 90) -> None:
    """Until `count` nodes are alive in the cluster at `address`."""
    probe = (
        f"import ray; ray.init(address={address!r}, logging_level='ERROR');"
        "print(sum(n['Alive'] for n in ray.nodes()))"
    )
    deadline = time.monotonic() + timeout
    alive = ""
    while time.monotonic() < deadline:
        done = subprocess.run(
            [sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=60
        )
        alive = done.stdout.strip().splitlines()[-1:] and done.stdout.strip().splitlines()[-1]
        if alive == str(count):
            return
        time.sleep(1)
    raise RuntimeError(
        f"{count} Ray nodes not alive at {address} within {timeout:.0f} s ({alive!r})"
    )
