"""Ray Jobs API: submit a kiln command to a cluster, and list / inspect / follow / stop jobs.

The cluster address is always explicit (`--address` or `RAY_ADDRESS`): Kiln never guesses a remote target.
Secrets (`WANDB_API_KEY`, `HF_TOKEN`) never travel through the Jobs API: Ray stores a job's entrypoint, metadata
and runtime_env (env_vars included, verbatim) in the job's info, which `ray job status` and the SDK show to anyone
with access to the cluster, and logs the runtime_env on the node. A job reads its secrets from the environment of
the cluster's processes instead (`kiln cluster up` passes on its own; KubeRay: secretKeyRef; SLURM: the job's).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import shlex
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from data_pipeline.configlib import ConfigError

PROJECT_ROOT = Path(__file__).resolve().parent.parent
# Never uploaded with the code: outputs, tracking runs, data, checkpoints and caches. Ray adds its own defaults
# (.git, .venv, venv, __pycache__) and everything .gitignore / .rayignore name.
EXCLUDES = [
    "runs",
    "outputs",
    "wandb",
    "/data",
    "checkpoints",
    "lightning_logs",
    "*.egg-info",
    "__pycache__",
    ".pytest_cache",
    ".ruff_cache",
    ".mypy_cache",
    "/build",
    "/dist",
]
COMMANDS = {"pretrain": "pretrain", "finetune": "finetune", "data-prepare": "data prepare"}
# Ray refuses a working_dir package of 512 MiB (its gRPC message limit, GCS_STORAGE_MAX_SIZE) and warns from half
# of that; a project's code is a few MiB, so anything near this is data that slipped in.
MAX_UPLOAD_MIB = 100.0
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


def _address(address: str | None) -> str:
    address = address or os.environ.get("RAY_ADDRESS")
    if not address:
        raise ConfigError(
            "no Ray cluster address: pass --address http://HOST:8265 or set RAY_ADDRESS"
        )
    if address.startswith("ray://") or "://" not in address:
        raise ConfigError(
            f"{address}: the Jobs API is the dashboard's http(s)://HOST:8265 address "
            "(ray:// and HOST:6379 are for drivers, not job submission)"
        )
    return address


def token_available() -> bool:
    return bool(
        os.environ.get("RAY_AUTH_TOKEN")
        or os.environ.get("RAY_AUTH_TOKEN_PATH")
        or (Path.home() / ".ray" / "auth_token").is_file()
    )


def use_token_auth_if_available() -> None:
    """Ray heads authenticate with a token by default, and a client only sends one in token mode. Ray reads the
    mode when it is first imported, so the CLI calls this before anything imports ray."""
    if token_available():
        os.environ.setdefault("RAY_AUTH_MODE", "token")


def client(address: str | None):  # noqa: ANN201 — ray's client type is imported lazily
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    resolved = _address(address)
    _warn_if_cleartext(resolved)
    # An https head signed by a private CA: REQUESTS_CA_BUNDLE, passed on so that the websocket of
    # `logs --follow` (aiohttp, which does not read that variable) trusts the same CA.
    ca_bundle = os.environ.get("REQUESTS_CA_BUNDLE") if resolved.startswith("https://") else None
    try:
        return JobSubmissionClient(resolved, verify=ca_bundle or True)
    except ConnectionError as err:
        raise ConfigError(
            f"cannot reach the Ray dashboard at {resolved}: {str(err).splitlines()[0]}"
        ) from None
    except AuthenticationError:
        raise ConfigError(
            f"{resolved} wants a Ray auth token: set RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH) to the "
            "cluster's token and RAY_AUTH_MODE=token"
        ) from None


_warned: set[str] = set()


def _warn_if_cleartext(address: str) -> None:
    host = urlparse(address).hostname or ""
    if address.startswith("http://") and host not in LOOPBACK_HOSTS and address not in _warned:
        _warned.add(address)
        print(
            f"kiln: warning: {address} is plain http: the Ray token and your code cross the network unencrypted; "
            "use an https:// address (a TLS proxy in front of the dashboard) or an SSH tunnel",
            file=sys.stderr,
        )


def entrypoint(
    command: str, config: Path | None, overrides: list[str], out: Path | str | None
) -> str:
    """The kiln command line the cluster runs, with the config path relative to the uploaded working dir."""
    # `python -m cluster` rather than the `kiln` script: the uploaded working dir is importable on the cluster,
    # the console script is only on PATH where Kiln was pip-installed.
    parts = ["python", "-m", "cluster", *COMMANDS[command].split()]
    if config is not None:
        config = Path(config).resolve()
        if not config.is_relative_to(PROJECT_ROOT):
            raise ConfigError(
                f"{config}: the config must live inside the project ({PROJECT_ROOT}) to be uploaded"
            )
        parts += ["--config", str(config.relative_to(PROJECT_ROOT))]
    parts += overrides
    if out is not None:
        parts += ["--out", str(out)]
    return " ".join(shlex.quote(p) for p in parts)


# ----------------------------------------------------------------------------------------- what gets uploaded
def upload_files(root: Path = PROJECT_ROOT, excludes: list[str] | None = None) -> dict[str, int]:
    """{relative path: bytes} of every file Ray would package from `root` with these excludes."""
    from ray._private import ray_constants
    from ray._private.runtime_env.packaging import _dir_travel, _get_excludes

    root = Path(root).resolve()
    patterns = ray_constants.get_runtime_env_default_excludes() + list(
        EXCLUDES if excludes is None else excludes
    )
    files: dict[str, int] = {}

    def record(path: Path) -> None:
        if path.is_file() and not path.is_symlink():
            files[str(path.relative_to(root))] = path.stat().st_size

    # Ray's own walk (private, but the one `working_dir` packaging runs), so the check sees exactly the upload:
    # default excludes, ours, and every .gitignore / .rayignore on the way down.
    include_gitignore = os.environ.get("RAY_RUNTIME_ENV_IGNORE_GITIGNORE", "0") != "1"
    quiet = logging.getLogger("kiln.upload")  # Ray's walk logs every ignore file it honours at INFO
    quiet.setLevel(logging.WARNING)
    _dir_travel(
        root,
        [_get_excludes(root, patterns)],
        record,
        include_gitignore=include_gitignore,
        logger=quiet,
    )
    return files


def check_upload_size(
    root: Path = PROJECT_ROOT, limit_mib: float = MAX_UPLOAD_MIB, excludes: list[str] | None = None
) -> int:
    """Total bytes to upload; a ConfigError naming the biggest offenders when it is over `limit_mib`."""
    files = upload_files(root, excludes)
    total = sum(files.values())
    if total <= limit_mib * 2**20:
        return total
    by_top: dict[str, int] = {}
    for rel, size in files.items():
        top = rel.split(os.sep)[0] + ("/" if os.sep in rel else "")
        by_top[top] = by_top.get(top, 0) + size
    tops = _largest(by_top)
    files_text = _largest(files)
    raise ConfigError(
        f"{root}: {total / 2**20:.1f} MiB would be uploaded as the job's working directory, over the "
        f"{limit_mib:g} MiB limit (Ray refuses 512 MiB); biggest: {tops}; largest files: {files_text}. "
        "Move data and outputs out of the project or list them in .rayignore"
    )


def _largest(sizes: dict[str, int], n: int = 3) -> str:
    top = sorted(sizes.items(), key=lambda kv: -kv[1])[:n]
    return ", ".join(f"{name} {size / 2**20:.1f} MiB" for name, size in top)


# ------------------------------------------------------------------------------------------------------ submit
def job_metadata(command: str, job: Any) -> dict[str, str]:
    """What the job's visible metadata records: the command and the resources its config asks for."""
    meta = {"kiln_command": command}
    cluster = getattr(job, "cluster", None)
    if cluster is not None:
        meta.update(
            {
                "kiln_num_workers": str(cluster.num_workers),
                "kiln_cpus_per_worker": str(cluster.cpus_per_worker),
                "kiln_gpus_per_worker": "1" if cluster.use_gpu else "0",
                "kiln_strategy": cluster.strategy,
                "kiln_max_failures": str(cluster.max_failures),
            }
        )
    return meta


def check_no_secrets(payload: dict[str, Any]) -> None:
    """Refuse a submission whose entrypoint, runtime_env or metadata holds the value of a secret variable."""
    from cluster.tracking import find_secrets

    leaked = find_secrets(json.dumps(payload, default=str))
    if leaked:
        raise ConfigError(
            f"the job's entrypoint/metadata would contain the value of {', '.join(leaked)}; secrets "
            "reach jobs only as environment variables of the cluster (see docs/scaling.md)"
        )


def submit(
    command: str,
    config: Path | None,
    overrides: list[str],
    out: Path | None,
    address: str | None,
    job: Any = None,
    max_upload_mib: float = MAX_UPLOAD_MIB,
) -> str:
    size = check_upload_size(PROJECT_ROOT, max_upload_mib)
    payload = {
        "entrypoint": entrypoint(command, config, overrides, out),
        "runtime_env": {"working_dir": str(PROJECT_ROOT), "excludes": EXCLUDES},
        "metadata": job_metadata(command, job),
    }
    check_no_secrets(payload)
    jobs_client = client(address)
    if job is not None and getattr(job, "cluster", None) is not None:
        _check_resources(address, job.cluster)
    # Ray logs every ignore file it honours, its new default excludes and the upload itself on each submission.
    for name in [n for n in logging.root.manager.loggerDict if n == "ray" or n.startswith("ray.")]:
        logging.getLogger(name).setLevel(logging.ERROR)
    job_id = jobs_client.submit_job(**payload)
    print(f"submitted {job_id} ({size / 2**20:.1f} MiB of code): {payload['entrypoint']}")
    if out is None or not Path(out).is_absolute():
        print(
            "note: the output directory is relative to the job's temporary working directory on the cluster; "
            "pass --out /shared/path to keep it"
        )
    print(f"follow it with: kiln jobs logs {job_id} --follow --address {_address(address)}")
    return job_id


def _check_resources(address: str | None, cluster: Any) -> None:
    """Warn when the config asks for more than the cluster has: Ray Train would wait for it indefinitely."""
    from ray.util.state import list_nodes

    try:
        nodes = [
            n for n in list_nodes(address=_address(address), detail=True) if n.state == "ALIVE"
        ]
    except Exception:  # noqa: BLE001 — a missing state API must not block submission
        return
    have = {
        key: sum(float((n.resources_total or {}).get(key, 0)) for n in nodes)
        for key in ("CPU", "GPU")
    }
    need = {
        "CPU": cluster.num_workers * cluster.cpus_per_worker,
        "GPU": cluster.num_workers if cluster.use_gpu else 0,
    }
    for key in ("CPU", "GPU"):
        if need[key] > have[key]:
            print(
                f"kiln: warning: the job asks for {need[key]:g} {key} ({cluster.num_workers} workers) but the "
                f"cluster has {have[key]:g}; it waits until enough nodes join",
                file=sys.stderr,
            )


# -------------------------------------------------------------------------------------------------------- jobs
def cmd_jobs(args: argparse.Namespace) -> int:
    """`kiln jobs list | status ID | logs ID [--follow] | stop ID`."""
    return jobs(args.action, args.job_id, args.follow, args.address)


def jobs(action: str, job_id: str | None, follow: bool, address: str | None) -> int:
    jobs_client = client(address)
    if action == "list":
        for job in jobs_client.list_jobs():
            print(f"{job.submission_id}\t{job.status}\t{job.entrypoint}")
        return 0
    if not job_id:
        raise ConfigError(f"`kiln jobs {action}` needs a job id (see `kiln jobs list`)")
    try:
        _job_action(jobs_client, action, job_id, follow)
    except RuntimeError as err:  # the SDK's error for HTTP failures, e.g. 404 for an unknown id
        raise ConfigError(f"kiln jobs {action} {job_id}: {str(err).splitlines()[0]}") from None
    return 0


def _job_action(jobs_client: Any, action: str, job_id: str, follow: bool) -> None:
    if action == "status":
        info = jobs_client.get_job_info(job_id)
        print(info.status)
        if info.message and str(info.status) in ("FAILED", "STOPPED"):
            print(info.message)
    elif action == "stop":
        print("stopping" if jobs_client.stop_job(job_id) else "already finished")
    elif follow:
        asyncio.run(_follow(jobs_client, job_id))
    else:
        print(jobs_client.get_job_logs(job_id), end="")


async def _follow(jobs_client: Any, job_id: str) -> None:
    async for lines in jobs_client.tail_job_logs(job_id):
        print(lines, end="", flush=True)
