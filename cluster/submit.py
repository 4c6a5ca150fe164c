"""Ray Jobs API: submit a kiln command to a cluster, and list / inspect / follow / stop jobs.

The cluster address is always explicit (`--address` or `RAY_ADDRESS`): Kiln never guesses a remote target.
Secrets are not put in the runtime environment (its env_vars are visible in the job's metadata); the cluster's
own environment must provide `WANDB_API_KEY` / `HF_TOKEN` when they are needed.
"""

from __future__ import annotations

import asyncio
import os
import shlex
from pathlib import Path

from cluster.config import ConfigError

PROJECT_ROOT = Path(__file__).resolve().parent.parent
# Never uploaded with the code: outputs, tracking runs and caches (Ray itself already skips .git and .venv).
EXCLUDES = ["runs", "outputs", "wandb", "*.egg-info", "__pycache__", ".pytest_cache", ".ruff_cache"]
COMMANDS = {"pretrain": "pretrain", "finetune": "finetune", "data-prepare": "data prepare"}


def _address(address: str | None) -> str:
    address = address or os.environ.get("RAY_ADDRESS")
    if not address:
        raise ConfigError("no Ray cluster address: pass --address http://HOST:8265 or set RAY_ADDRESS")
    return address


def _token_available() -> bool:
    return bool(os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH")
                or (Path.home() / ".ray" / "auth_token").is_file())


def use_token_auth_if_available() -> None:
    """Ray heads authenticate with a token by default, and a client only sends one in token mode. Ray reads the
    mode when it is first imported, so the CLI calls this before anything imports ray."""
    if _token_available():
        os.environ.setdefault("RAY_AUTH_MODE", "token")


def _client(address: str | None):  # noqa: ANN202 — ray's client type is imported lazily
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    resolved = _address(address)
    try:
        return JobSubmissionClient(resolved)
    except ConnectionError as err:
        raise ConfigError(f"cannot reach the Ray dashboard at {resolved}: {str(err).splitlines()[0]}") from None
    except AuthenticationError:
        raise ConfigError(f"{resolved} wants a Ray auth token: set RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH) to the "
                          "cluster's token and RAY_AUTH_MODE=token") from None


def entrypoint(command: str, config: Path | None, overrides: list[str], out: Path | None) -> str:
    """The kiln command line the cluster runs, with the config path relative to the uploaded working dir."""
    # `python -m cluster` rather than the `kiln` script: the uploaded working dir is importable on the cluster,
    # the console script is only on PATH where Kiln was pip-installed.
    parts = ["python", "-m", "cluster", *COMMANDS[command].split()]
    if config is not None:
        config = Path(config).resolve()
        if not config.is_relative_to(PROJECT_ROOT):
            raise ConfigError(f"{config}: the config must live inside the project ({PROJECT_ROOT}) to be uploaded")
        parts += ["--config", str(config.relative_to(PROJECT_ROOT))]
    parts += overrides
    if out is not None:
        parts += ["--out", str(out)]
    return " ".join(shlex.quote(p) for p in parts)


def submit(command: str, config: Path | None, overrides: list[str], out: Path | None, address: str | None) -> str:
    client = _client(address)
    job_id = client.submit_job(
        entrypoint=entrypoint(command, config, overrides, out),
        runtime_env={"working_dir": str(PROJECT_ROOT), "excludes": EXCLUDES},
        metadata={"kiln_command": command},
    )
    print(f"submitted {job_id}\nfollow it with: kiln jobs logs {job_id} --follow --address {_address(address)}")
    return job_id


def jobs(action: str, job_id: str | None, follow: bool, address: str | None) -> int:
    client = _client(address)
    if action == "list":
        for job in client.list_jobs():
            print(f"{job.submission_id}\t{job.status}\t{job.entrypoint}")
        return 0
    if not job_id:
        raise ConfigError(f"`kiln jobs {action}` needs a job id (see `kiln jobs list`)")
    if action == "status":
        print(client.get_job_status(job_id))
    elif action == "stop":
        print("stopping" if client.stop_job(job_id) else "already finished")
    elif follow:
        asyncio.run(_follow(client, job_id))
    else:
        print(client.get_job_logs(job_id), end="")
    return 0


async def _follow(client, job_id: str) -> None:  # noqa: ANN001
    async for lines in client.tail_job_logs(job_id):
        print(lines, end="", flush=True)
