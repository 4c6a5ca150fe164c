"""`kiln cluster up | down | status`: a local Ray head to submit jobs to, listening on loopback unless asked.

`up` runs `ray start --head --block` (the venv's Ray) as a detached process and records it in a state file; `down`
sends that one process SIGTERM, and Ray's own handler then stops everything it started (GCS, raylet, dashboard,
workers, job drivers). `ray stop` is never used: it kills every Ray process of the user on the machine, including
Ray instances Kiln did not start.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

from cluster.preemption import STOP_GRACE_S
from data_pipeline.configlib import ConfigError

LOOPBACK = ("127.0.0.1", "localhost", "::1")
STATE_FILE = "cluster.json"
START_TIMEOUT_S = 180.0  # `ray start` takes ~12 s on an idle 2-core machine, much longer under load
STOP_TIMEOUT_S = 60.0  # Ray drains for up to 30 s on SIGTERM before stopping its processes


@dataclass
class LocalCluster:
    """What `kiln cluster up` started: enough for `down` to stop exactly that, and for `status` to find it."""

    pid: int
    host: str
    port: int
    dashboard_port: int
    temp_dir: str
    log_file: str
    auth: str  # "token" or "disabled"
    started_at: float

    @property
    def dashboard_url(self) -> str:
        return f"http://{_connect_host(self.host)}:{self.dashboard_port}"

    @property
    def gcs_address(self) -> str:
        return f"{_connect_host(self.host)}:{self.port}"


def _connect_host(host: str) -> str:
    """Where a client on this machine reaches a server listening on `host`."""
    return "127.0.0.1" if host in ("0.0.0.0", *LOOPBACK) else host


def cmd_cluster(args: argparse.Namespace) -> int:
    """`kiln cluster up | down | status`."""
    if args.cluster_command == "up":
        up(
            args.host,
            args.port,
            args.dashboard_port,
            args.num_cpus,
            args.num_gpus,
            args.allow_remote,
        )
        return 0
    if args.cluster_command == "down":
        down()
        return 0
    return status(args.address)


def kiln_home() -> Path:
    """Where Kiln keeps machine-local state (`KILN_HOME`, default ~/.kiln)."""
    return Path(os.environ.get("KILN_HOME") or Path.home() / ".kiln")


def read_state() -> LocalCluster | None:
    file = kiln_home() / STATE_FILE
    if not file.is_file():
        return None
    try:
        return LocalCluster(**json.loads(file.read_text()))
    except (json.JSONDecodeError, TypeError) as err:
        raise ConfigError(
            f"{file}: not a Kiln cluster state file ({err}); delete it if no cluster runs"
        ) from None


def _write_state(cluster: LocalCluster) -> None:
    file = kiln_home() / STATE_FILE
    file.parent.mkdir(parents=True, exist_ok=True)
    tmp = file.with_name(f".tmp-{file.name}")
    tmp.write_text(json.dumps(asdict(cluster), indent=2))
    tmp.replace(file)


def _clear_state() -> None:
    (kiln_home() / STATE_FILE).unlink(missing_ok=True)


# ------------------------------------------------------------------------------------------------------------- up
def up(
    host: str = "127.0.0.1",
    port: int = 6379,
    dashboard_port: int = 8265,
    num_cpus: int | None = None,
    num_gpus: int | None = None,
    allow_remote: bool = False,
    timeout: float = START_TIMEOUT_S,
) -> LocalCluster:
    """Start a Ray head for job submission and wait until its Jobs API answers."""
    remote = host not in LOOPBACK
    if remote and not allow_remote:
        raise ConfigError(
            f"--host {host}: a Ray head executes code for anyone who can reach it; it listens on "
            "127.0.0.1 unless you also pass --allow-remote"
        )
    _refuse_second_cluster()
    for name, value in (("--port", port), ("--dashboard-port", dashboard_port)):
        _check_port_free(name, value)
    env = _head_env(remote, f"{_connect_host(host)}:{port}")
    auth = _ensure_token_auth(env)
    if remote:
        _warn_remote(host, port, dashboard_port, auth)
    temp_dir = Path(
        f"/tmp/kiln-ray-{os.getuid()}-{port}"
    )  # short: Ray's unix socket paths must fit 107 bytes
    log_file = kiln_home() / f"ray-head-{port}.log"
    log_file.parent.mkdir(parents=True, exist_ok=True)
    cmd = _start_command(host, port, dashboard_port, num_cpus, num_gpus, temp_dir)
    with open(log_file, "w") as log:
        # A new session: the head outlives this command, and Ctrl-C in the user's shell does not reach it.
        proc = subprocess.Popen(
            cmd,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    cluster = LocalCluster(
        proc.pid, host, port, dashboard_port, str(temp_dir), str(log_file), auth, time.time()
    )
    _write_state(cluster)
    try:
        _wait_until_ready(cluster, proc, timeout)
    except BaseException:
        _stop(cluster)
        _clear_state()
        raise
    _print_started(cluster)
    return cluster


def _refuse_second_cluster() -> None:
    running = read_state()
    if running is None:
        return
    if _is_our_head(running):
        raise ConfigError(
            f"a Kiln cluster is already running (pid {running.pid}, {running.dashboard_url}); "
            "stop it with `kiln cluster down` first"
        )
    _clear_state()  # the recorded head is gone (machine restarted, process killed): the record is stale


def _check_port_free(flag: str, port: int) -> None:
    if not 1 <= port <= 65535:
        raise ConfigError(f"{flag} {port}: not a TCP port (1-65535)")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(1.0)
        if sock.connect_ex(("127.0.0.1", port)) == 0:
            raise ConfigError(
                f"{flag} {port}: something already listens on this port; choose another"
            )


def free_port() -> int:
    """A TCP port nothing listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _head_env(remote: bool, gcs_address: str) -> dict[str, str]:
    env = dict(os.environ)
    # Ray processes that look for "the" cluster (Ray Train's helper actors call the state API without an address)
    # find this one, not whichever other Ray instance runs on the machine ("Found multiple active Ray instances").
    env["RAY_ADDRESS"] = gcs_address
    # Ray drains a node for up to 30 s on SIGTERM (for Serve replicas); a local head has none to wait for.
    env.setdefault("RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S", "3")
    # `kiln jobs stop` SIGTERMs the job's driver, which then has every worker checkpoint and stop (preemption);
    # Ray's own 3 s before SIGKILL would cut that short.
    env.setdefault("RAY_JOB_STOP_WAIT_TIME_S", str(STOP_GRACE_S))
    # Jobs run `python -m cluster ...` through the head's PATH: make that the python Kiln is installed in.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    if not remote:
        # On Linux `ray start` replaces 127.0.0.1 by the machine's routable address and binds GCS and raylet to
        # it; this switch (Ray's single-machine mode, the default on macOS and Windows) keeps every Ray server on
        # loopback. Verified with `ss -ltn`: GCS, raylet, dashboard, its agent and the client server.
        env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    return env


def _ensure_token_auth(env: dict[str, str]) -> str:
    """Token authentication on unless the user turned it off explicitly (RAY_AUTH_MODE=disabled)."""
    from cluster.submit import token_available

    mode = env.get("RAY_AUTH_MODE", "").lower()
    if mode and mode != "token":
        print(
            f"kiln: warning: RAY_AUTH_MODE={mode}: the head accepts jobs from anyone who reaches its ports",
            file=sys.stderr,
        )
        return "disabled"
    if not token_available():
        # `ray get-auth-token --generate` writes ~/.ray/auth_token (and prints it: discarded here).
        subprocess.run(
            [_ray_executable(), "get-auth-token", "--generate"],
            env=env,
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    env["RAY_AUTH_MODE"] = "token"
    os.environ["RAY_AUTH_MODE"] = (
        "token"  # this process talks to the head next; Ray is not imported yet
    )
    return "token"


def _warn_remote(host: str, port: int, dashboard_port: int, auth: str) -> None:
    lines = [
        f"WARNING: the Ray head will listen on {host} (ports {port} and {dashboard_port}, and Ray's worker ports).",
        "WARNING: Ray executes arbitrary code for anyone who can reach those ports, as this user, on this machine.",
    ]
    if auth == "token":
        lines.append(
            "WARNING: token authentication is on (RAY_AUTH_MODE=token, token in ~/.ray/auth_token or "
            "RAY_AUTH_TOKEN): it turns away callers without the token, but plain http carries the token in "
            "clear text; put the dashboard behind https or an SSH tunnel and firewall the ports."
        )
    else:
        lines.append(
            "WARNING: token authentication is OFF: anyone on the network can run code here."
        )
    print("\n".join(lines), file=sys.stderr, flush=True)


def _ray_executable() -> str:
    beside = Path(sys.executable).parent / "ray"
    found = str(beside) if beside.is_file() else shutil.which("ray")
    if not found:
        raise ConfigError(
            "the `ray` command is not installed next to this python; install Kiln's dependencies"
        )
    return found


def _start_command(
    host: str,
    port: int,
    dashboard_port: int,
    num_cpus: int | None,
    num_gpus: int | None,
    temp_dir: Path,
) -> list[str]:
    cmd = [
        _ray_executable(),
        "start",
        "--head",
        "--block",
        f"--port={port}",
        f"--dashboard-port={dashboard_port}",
        f"--dashboard-host={host}",
        "--include-dashboard=true",
        f"--temp-dir={temp_dir}",
        "--disable-usage-stats",
        # Ray's fixed defaults (10001, 52365) would collide with any other Ray on the machine.
        f"--ray-client-server-port={free_port()}",
        f"--dashboard-agent-listen-port={free_port()}",
    ]
    if host not in LOOPBACK and host != "0.0.0.0":
        cmd.append(f"--node-ip-address={host}")
    if num_cpus is not None:
        cmd.append(f"--num-cpus={num_cpus}")
    if num_gpus is not None:
        cmd.append(f"--num-gpus={num_gpus}")
    return cmd


def _wait_until_ready(cluster: LocalCluster, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = Path(cluster.log_file).read_text(errors="replace").strip().splitlines()[-3:]
            raise ConfigError(
                f"`ray start` exited with code {proc.returncode}: {' | '.join(tail)} "
                f"(full log: {cluster.log_file})"
            )
        url = cluster.dashboard_url
        # The Jobs API answers a few seconds before the head's raylet has registered; jobs need the node.
        if _dashboard_answers(url) and _jobs_api_answers(url) and _alive_nodes(url) > 0:
            return
        time.sleep(1.0)
    raise ConfigError(
        f"the Ray head did not answer on {cluster.dashboard_url} within {timeout:.0f} s "
        f"(log: {cluster.log_file})"
    )


def _dashboard_answers(url: str) -> bool:
    try:
        urllib.request.urlopen(f"{url}/api/version", timeout=2)
    except urllib.error.HTTPError:
        return True  # 401 without a token: the server is up
    except OSError:
        return False
    return True


def _jobs_api_answers(url: str) -> bool:
    from cluster.submit import client

    try:
        client(url).list_jobs()
    except (ConfigError, OSError, RuntimeError):
        return False
    return True


def _alive_nodes(url: str) -> int:
    from ray.util.state import list_nodes

    try:
        return sum(
            n.state == "ALIVE" for n in list_nodes(address=url, raise_on_missing_output=False)
        )
    except Exception:  # noqa: BLE001 — the state API wraps a not-yet-ready server in several error types
        return 0


def _print_started(cluster: LocalCluster) -> None:
    from cluster.tracking import SECRET_ENV_VARS

    passed = [name for name in SECRET_ENV_VARS if os.environ.get(name)]
    print(
        f"Ray head started (pid {cluster.pid}), listening on {cluster.host}\n"
        f"  Jobs API / dashboard: {cluster.dashboard_url}\n"
        f"  GCS address:          {cluster.gcs_address}\n"
        f"  authentication:       {cluster.auth}\n"
        f"  log:                  {cluster.log_file}"
    )
    if passed:
        print(
            f"  jobs inherit {', '.join(passed)} from this environment (never sent through the Jobs API)"
        )
    print(
        f"next: kiln submit pretrain --config configs/tiny-bert.yaml --address {cluster.dashboard_url}\n"
        "stop it with: kiln cluster down",
        flush=True,
    )


# ----------------------------------------------------------------------------------------------------------- down
def down(timeout: float = STOP_TIMEOUT_S) -> bool:
    """Stop the head `up` started (and nothing else). Returns False when none was recorded."""
    cluster = read_state()
    if cluster is None:
        print(f"no Kiln cluster recorded in {kiln_home() / STATE_FILE}; nothing to stop")
        return False
    if not _is_our_head(cluster):
        print(
            f"the recorded Ray head (pid {cluster.pid}) is no longer running; clearing {STATE_FILE}"
        )
        _clear_state()
        return True
    print(f"stopping the Ray head (pid {cluster.pid}) ...", flush=True)
    _stop(cluster, timeout)
    _clear_state()
    print("stopped")
    return True


def _stop(cluster: LocalCluster, timeout: float = STOP_TIMEOUT_S) -> None:
    import psutil

    try:
        os.kill(cluster.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and _is_our_head(cluster):
        time.sleep(0.5)
    # Whatever is left in the head's process group (it is its own session leader) did not stop: kill it.
    for proc in psutil.process_iter(["pid"]):
        try:
            if (
                os.getpgid(proc.info["pid"]) == cluster.pid
                and proc.status() != psutil.STATUS_ZOMBIE
            ):
                proc.kill()
        except (ProcessLookupError, psutil.Error):
            continue


def _is_our_head(cluster: LocalCluster) -> bool:
    """The recorded pid is alive and still the `ray start` Kiln ran (a pid can be reused after a reboot)."""
    import psutil

    try:
        proc = psutil.Process(cluster.pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        cmdline = proc.cmdline()
    except psutil.Error:
        return False
    return "--head" in cmdline and f"--temp-dir={cluster.temp_dir}" in cmdline


# --------------------------------------------------------------------------------------------------------- status
def status(address: str | None = None) -> int:
    """Nodes, resources and jobs of the recorded local head (or of `address`)."""
    cluster = read_state()
    if address is None:
        if cluster is None or not _is_our_head(cluster):
            raise ConfigError(
                "no Kiln cluster is running here (start one with `kiln cluster up`, or pass "
                "--address http://HOST:8265)"
            )
        address = cluster.dashboard_url
        print(
            f"Kiln cluster: pid {cluster.pid}, up {(time.time() - cluster.started_at) / 60:.1f} min, "
            f"listening on {cluster.host}, auth {cluster.auth}, log {cluster.log_file}"
        )
    _print_nodes(address)
    _print_jobs(address)
    return 0


def _print_nodes(address: str) -> None:
    from ray.util.state import list_nodes

    try:
        nodes = list_nodes(address=address, detail=True, raise_on_missing_output=False)
    except Exception as err:  # noqa: BLE001 — the state API wraps connection errors in several types
        raise ConfigError(
            f"cannot read the nodes of {address}: {str(err).splitlines()[0]}"
        ) from None
    alive = [n for n in nodes if n.state == "ALIVE"]
    totals: dict[str, float] = {}
    print(f"Ray at {address}: {len(alive)} alive node(s) of {len(nodes)}")
    for node in alive:
        res = node.resources_total or {}
        for key in ("CPU", "GPU", "memory"):
            totals[key] = totals.get(key, 0.0) + float(res.get(key, 0.0))
        role = "head" if node.is_head_node else "worker"
        print(f"  {node.node_ip} ({role}): {_fmt_resources(res)}")
    print(f"resources: {_fmt_resources(totals)}")


def _fmt_resources(res: dict[str, float]) -> str:
    return (
        f"{res.get('CPU', 0):g} CPU, {res.get('GPU', 0):g} GPU, "
        f"{float(res.get('memory', 0)) / 2**30:.1f} GiB memory"
    )


def _print_jobs(address: str) -> None:
    from cluster.submit import client

    jobs = client(address).list_jobs()
    counts: dict[str, int] = {}
    for job in jobs:
        counts[str(job.status)] = counts.get(str(job.status), 0) + 1
    summary = ", ".join(f"{n} {s.lower()}" for s, n in sorted(counts.items())) or "none"
    print(f"jobs: {summary}")
    for job in jobs:
        if str(job.status) in ("PENDING", "RUNNING"):
            print(f"  {job.submission_id}\t{job.status}\t{job.entrypoint}")
