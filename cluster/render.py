"""`kiln render kuberay | slurm`: the same job config as a KubeRay RayJob manifest or a SLURM sbatch script.

Both run the command `kiln submit` would (`python -m cluster pretrain|finetune --config ... overrides`), on a Ray
cluster sized from the config's `cluster` section: `num_workers` Ray Train workers of `cpus_per_worker` CPUs and,
with `use_gpu`, one GPU each. Secrets are never written into either file: KubeRay pods read them from a
Kubernetes Secret (secretKeyRef), SLURM jobs from the environment `sbatch` was called in.

Storage: the job's locations (`data_dir`, `init_from`, `encoder_checkpoint`, `decoder_checkpoint`, `--out`)
travel as written, URIs unchanged, and never through the runtime-env upload (that carries the code only). A
render that spreads the job over several nodes refuses a location only one node would see: a relative path
(it resolves in the driver's working directory), and on KubeRay, whose pods share no filesystem, a local
`data_dir` or `--out` at all (docs/scaling.md, "Storage for multi-node runs").
"""

from __future__ import annotations

import math
import os
import shlex
from dataclasses import fields
from pathlib import Path
from typing import Any, get_args
from urllib.parse import urlparse

import yaml

from cluster.jobs import FinetuneTask
from cluster.preemption import STOP_GRACE_S
from cluster.submit import EXCLUDES, LOOPBACK_HOSTS, PROJECT_ROOT, entrypoint
from cluster.tracking import find_secrets
from data_pipeline.configlib import ConfigError, parse_override, read_yaml, set_dotted
from data_pipeline.storage import endpoint, is_remote

SECRET_NAME = "kiln-secrets"  # the Kubernetes Secret the pods read WANDB_API_KEY / HF_TOKEN from
SECRET_KEYS = {"WANDB_API_KEY": "wandb-api-key", "HF_TOKEN": "hf-token"}
S3_SECRET_NAME = "kiln-s3"  # the Kubernetes Secret the pods read S3 credentials from (--s3-secret)
S3_SECRET_KEYS = {
    "AWS_ACCESS_KEY_ID": "aws-access-key-id",
    "AWS_SECRET_ACCESS_KEY": "aws-secret-access-key",
    "AWS_SESSION_TOKEN": "aws-session-token",
}
# Where the S3 endpoint is and its region: settings, not secrets, so a manifest carries their values.
S3_SETTINGS = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION")
LOCATION_KEYS = ("data_dir", "init_from", "encoder_checkpoint", "decoder_checkpoint")
OUT_OPTION = "--job-out"
# Without --job-out the job writes to its command's default --out, runs/<command>.
OUT_DEFAULT = "--job-out (not given)"
HF_PREFIX = "hf:"  # a checkpoint imported from Hugging Face: a Hub name is no path


def infer_command(config: Path | None, overrides: list[str]) -> str:
    """pretrain or finetune, from the recipe's `task` (a command-line `task=` wins)."""
    task = read_yaml(config).get("task") if config is not None else None
    for item in overrides:
        key, value = parse_override(item)
        if key == "task":
            task = value
    return "finetune" if task in get_args(FinetuneTask) else "pretrain"


def _ray_version() -> str:
    import ray

    return ray.__version__


def _check_clean(text: str, what: str) -> str:
    leaked = find_secrets(text)
    if leaked:
        raise ConfigError(
            f"the {what} would contain the value of {', '.join(leaked)}; pass secrets through the "
            "cluster's environment, never the config or overrides"
        )
    return text


def _describe(job: Any) -> str:
    c = job.cluster
    gpu = ", 1 GPU each" if c.use_gpu else ""
    return (
        f"{c.num_workers} workers × {c.cpus_per_worker} CPU{gpu}, strategy {c.strategy}, "
        f"max_failures {c.max_failures}"
    )


# ----------------------------------------------------------------------------------------------------- storage
def written_locations(
    command: str, config: Path | None, overrides: list[str], job: Any, out_dir: str | None
) -> dict[str, str]:
    """{config key or --job-out: location} as the user wrote it. `job` has them absolute already, made so
    against this machine's working directory, but the cluster resolves the written ones against its own."""
    raw = read_yaml(config) if config is not None else {}
    for item in overrides:
        set_dotted(raw, *parse_override(item))
    defaults = {f.name: f.default for f in fields(job)}
    found = {}
    for key in LOCATION_KEYS:
        value = raw.get(key, defaults.get(key)) if key in defaults else None
        if value is not None:
            found[key] = str(value)
    if out_dir:
        found[OUT_OPTION] = out_dir
    else:
        found[OUT_DEFAULT] = f"runs/{command}"
    return found


def location_kind(value: str) -> str:
    """remote (a URI), hub (a Hugging Face Hub name), absolute (a local path) or relative."""
    if value.startswith(HF_PREFIX):
        rest = value.removeprefix(HF_PREFIX)
        if not (rest.startswith(("/", "./", "../", "~", "file:")) or os.path.exists(rest)):
            return "hub"  # downloaded by each process that needs it
        value = rest
    if is_remote(value):
        return "remote"
    return "absolute" if value.startswith(("/", "~", "file:")) else "relative"


def uses_s3(locations: dict[str, str]) -> bool:
    return any(value.startswith("s3://") for value in locations.values())


def check_locations(locations: dict[str, str], target: str, spread: str | None) -> None:
    """Refuse a location that only one node would see; `spread` ("3 worker pods", "2 nodes") is None for a
    single-node render, which keeps any location."""
    if spread is None:
        return
    for name, value in locations.items():
        kind = location_kind(value)
        # Pods share only their image: a local checkpoint may be baked into it, data and outputs are not.
        unshared = target == "kuberay" and name in ("data_dir", OUT_OPTION, OUT_DEFAULT)
        if kind == "relative" or (kind == "absolute" and unshared):
            raise ConfigError(_refusal(name, value, kind, target, spread))


def _refusal(name: str, value: str, kind: str, target: str, spread: str) -> str:
    label = {
        OUT_OPTION: f"{OUT_OPTION} {value}",
        OUT_DEFAULT: f"{OUT_OPTION} not given (the job would write to {value})",
    }.get(name, f"{name}={value}")
    out = name in (OUT_OPTION, OUT_DEFAULT)
    example = f"{OUT_OPTION} s3://BUCKET/runs/NAME" if out else f"{name}=s3://BUCKET/..."
    if target == "kuberay":
        why = (
            "a relative path resolves in the driver's working directory on the head pod"
            if kind == "relative"
            else "the pods of a RayJob share no filesystem (the manifest mounts no volume)"
        )
        return f"{label}: {why}, which the {spread} do not see; use an s3:// URI ({example})"
    return (
        f"{label}: a relative path resolves in the driver's working directory, on the first of the "
        f"{spread} only; use an s3:// URI ({example}) or an absolute path on a filesystem mounted "
        "at the same path on every node"
    )


def storage_comment(locations: dict[str, str], shared: str) -> str:
    """Comment lines saying how each location is reached; `shared` describes a local absolute path."""
    said = {
        "remote": "object storage, reached by every node itself",
        "hub": "downloaded from the Hugging Face Hub",
        "absolute": shared,
        "relative": "relative to the job's working directory (single node only)",
    }
    width = max(len(name) for name in locations)
    lines = [
        f"#   {name:<{width}} {' '.join(value.split())}: {said[location_kind(value)]}"
        for name, value in locations.items()
    ]
    return "# Storage (docs/scaling.md):\n" + "\n".join(lines) + "\n"


def _run_line(command: str, config: Path | None, overrides: list[str], out_dir: str | None) -> str:
    """The entrypoint with --out as written: `Path` would turn `s3://b/x` into `s3:/b/x`."""
    line = entrypoint(command, config, overrides, None)
    return f"{line} --out {shlex.quote(out_dir)}" if out_dir else line


# ----------------------------------------------------------------------------------------------------- KubeRay
def render_kuberay(
    command: str,
    config: Path | None,
    overrides: list[str],
    job: Any,
    image: str | None,
    out_dir: str | None = None,
    name: str | None = None,
    namespace: str | None = None,
    code_dir: str = "/kiln",
    worker_memory: str = "8Gi",
    head_cpu: str = "1",
    head_memory: str = "4Gi",
    secret_name: str = SECRET_NAME,
    s3_secret: str = S3_SECRET_NAME,
) -> str:
    """A RayJob (ray.io/v1, KubeRay ≥ 1.5.1 for `authOptions`) whose cluster has one worker pod per Ray Train
    worker; the head runs only the driver (num-cpus 0)."""
    if not image:
        raise ConfigError(
            "kiln render kuberay needs --image: a container image with Kiln's dependencies and the "
            f"project at --code-dir ({code_dir})"
        )
    c = job.cluster
    name = name or f"kiln-{command}"
    locations = written_locations(command, config, overrides, job, out_dir)
    spread = f"{c.num_workers} worker pods" if c.num_workers > 1 else None
    check_locations(locations, "kuberay", spread)
    s3 = uses_s3(locations)
    env = _secret_refs(SECRET_KEYS, secret_name) + (_s3_env(s3_secret) if s3 else [])
    worker_resources: dict[str, Any] = {"cpu": str(c.cpus_per_worker), "memory": worker_memory}
    if c.use_gpu:
        worker_resources["nvidia.com/gpu"] = "1"
    # The submitter pod (same image as the head) uploads code_dir as the job's working_dir, exactly as
    # `kiln submit` uploads the project; runtimeEnvYAML holds no secret (Ray stores it in the job's info).
    runtime_env = {"working_dir": code_dir, "excludes": upload_excludes(locations)}
    # Deleting the RayJob stops the job with SIGTERM; the driver then has every worker checkpoint at one step
    # and stop (preemption), which needs longer than Ray's default 3 s before its SIGKILL.
    head_env = [*env, {"name": "RAY_JOB_STOP_WAIT_TIME_S", "value": str(STOP_GRACE_S)}]
    head = _container(
        "ray-head", image, code_dir, head_env, {"cpu": head_cpu, "memory": head_memory}
    )
    head["ports"] = [
        {"containerPort": 6379, "name": "gcs-server"},
        {"containerPort": 8265, "name": "dashboard"},
        {"containerPort": 10001, "name": "client"},
    ]
    manifest = {
        "apiVersion": "ray.io/v1",
        "kind": "RayJob",
        "metadata": {
            "name": name,
            **({"namespace": namespace} if namespace else {}),
            "labels": {"app.kubernetes.io/name": "kiln", "kiln/command": command},
        },
        "spec": {
            "entrypoint": _run_line(command, config, overrides, out_dir),
            "runtimeEnvYAML": yaml.safe_dump(runtime_env, sort_keys=False),
            "submissionMode": "K8sJobMode",
            "shutdownAfterJobFinishes": True,
            "ttlSecondsAfterFinished": 600,
            "rayClusterSpec": {
                "rayVersion": _ray_version(),
                "authOptions": {"mode": "token"},
                "headGroupSpec": {
                    "rayStartParams": {"num-cpus": "0"},
                    "template": {"spec": {"containers": [head]}},
                },
                "workerGroupSpecs": [
                    {
                        "groupName": "train-workers",
                        "replicas": c.num_workers,
                        "minReplicas": c.num_workers,
                        "maxReplicas": c.num_workers,
                        "rayStartParams": {},
                        "template": {
                            "spec": {
                                "containers": [
                                    _container("ray-worker", image, code_dir, env, worker_resources)
                                ]
                            }
                        },
                    }
                ],
            },
        },
    }
    header = _kuberay_header(command, config, job, name, secret_name, locations)
    if s3:
        header += _s3_header(s3_secret)
    text = yaml.dump(manifest, Dumper=_ManifestDumper, sort_keys=False, width=1000)
    return _check_clean(header + text, "manifest")


def _kuberay_header(
    command: str, config: Path | None, job: Any, name: str, secret: str, locations: dict[str, str]
) -> str:
    header = (
        f"# Rendered by `kiln render kuberay` from {config or 'defaults'}: {_describe(job)}.\n"
        f"# Secrets come from the Kubernetes Secret '{secret}' (keys {', '.join(SECRET_KEYS.values())}):\n"
        f'#   kubectl create secret generic {secret} --from-literal=wandb-api-key="$WANDB_API_KEY"\n'
        "# Apply with: kubectl apply -f <this file>; follow with: kubectl get rayjob; kubectl logs -l "
        f"job-name={name}\n"
    )
    shared = "local: on one pod only, or baked into the image"
    header += storage_comment(locations, shared)
    if OUT_DEFAULT in locations or location_kind(locations.get(OUT_OPTION, "")) != "remote":
        header += (
            "# --out is not a URI: outputs stay in the pods and vanish with them unless you mount a "
            "volume there; use s3://.\n"
        )
    return header


def _secret_refs(keys: dict[str, str], secret: str) -> list[dict[str, Any]]:
    """Environment entries that read each variable from a key of a Kubernetes Secret (unset if absent)."""
    return [
        {"name": var, "valueFrom": {"secretKeyRef": {"name": secret, "key": key, "optional": True}}}
        for var, key in keys.items()
    ]


def _s3_env(s3_secret: str) -> list[dict[str, Any]]:
    """S3 credentials by reference (optional: without the Secret, a pod's IAM role is used); the endpoint
    and region by value, taken from the environment this render runs in."""
    settings = [
        {"name": var, "value": os.environ[var]} for var in S3_SETTINGS if os.environ.get(var)
    ]
    return _secret_refs(S3_SECRET_KEYS, s3_secret) + settings


def _s3_header(s3_secret: str) -> str:
    given = [var for var in S3_SETTINGS if os.environ.get(var)]
    settings = (
        f"{', '.join(given)} as set when this was rendered"
        if given
        else "no AWS_ENDPOINT_URL / AWS_REGION was set when this was rendered: AWS S3's defaults"
    )
    keys = " ".join(
        f'--from-literal={key}="${var}"' for var, key in list(S3_SECRET_KEYS.items())[:2]
    )
    text = (
        f"# S3: every pod reads credentials from the Secret '{s3_secret}' (keys "
        f"{', '.join(S3_SECRET_KEYS.values())}; none: the pod's IAM role) and needs network access "
        f"to the endpoint; {settings}.\n"
        f"#   kubectl create secret generic {s3_secret} {keys}\n"
    )
    host = urlparse(endpoint() or "").hostname
    if host in LOOPBACK_HOSTS:  # right for this machine, unreachable from a pod
        text += f"# WARNING: the endpoint is on loopback ({host}): give the pods an address they reach.\n"
    return text


def upload_excludes(locations: dict[str, str]) -> list[str]:
    """What the code upload leaves out: Kiln's defaults (runs, data, checkpoints...) and every relative
    location of this job, so that data and outputs never travel with the code."""
    extra = []
    for value in locations.values():
        if location_kind(value) == "relative":
            path = os.path.normpath(value.removeprefix(HF_PREFIX))
            top = path.split(os.sep)[0]
            # outside the project (never uploaded anyway), or under a directory already left out
            if top != ".." and top not in EXCLUDES and f"/{top}" not in EXCLUDES:
                extra.append(f"/{path}")  # anchored at the working directory's root
    return EXCLUDES + [e for e in extra if e not in EXCLUDES]


class _ManifestDumper(yaml.SafeDumper):
    """kubectl-friendly YAML: multi-line strings (runtimeEnvYAML) as `|` blocks, no anchors for repeated lists."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


_ManifestDumper.add_representer(
    str,
    lambda dumper, s: dumper.represent_scalar(
        "tag:yaml.org,2002:str", s, style="|" if "\n" in s else None
    ),
)


def _container(
    name: str, image: str, code_dir: str, env: list[dict], resources: dict[str, str]
) -> dict[str, Any]:
    return {
        "name": name,
        "image": image,
        "workingDir": code_dir,
        "env": env,
        "resources": {"requests": dict(resources), "limits": dict(resources)},
    }


# ------------------------------------------------------------------------------------------------------- SLURM
def render_slurm(
    command: str,
    config: Path | None,
    overrides: list[str],
    job: Any,
    nodes: int | None,
    out_dir: str | None = None,
    name: str | None = None,
    time_limit: str = "04:00:00",
    partition: str | None = None,
    venv: str | None = None,
    project_dir: Path = PROJECT_ROOT,
) -> str:
    """An sbatch script: a Ray head on the first node, Ray workers on the others (srun), wait until all joined,
    run the job on the head node, stop Ray (also when the job fails or is cancelled)."""
    c = job.cluster
    if not nodes or nodes < 1:
        raise ConfigError("kiln render slurm needs --nodes N (at least 1)")
    if nodes > c.num_workers:
        raise ConfigError(
            f"--nodes {nodes} for cluster.num_workers={c.num_workers}: some nodes would hold no "
            "worker; use at most as many nodes as workers"
        )
    locations = written_locations(command, config, overrides, job, out_dir)
    check_locations(locations, "slurm", f"{nodes} nodes" if nodes > 1 else None)
    per_node = math.ceil(c.num_workers / nodes)
    cpus, gpus = per_node * c.cpus_per_worker, per_node if c.use_gpu else 0
    venv = venv or str(project_dir / ".venv")
    name = name or f"kiln-{command}"
    # --signal: USR1 to the batch shell STOP_GRACE_S before the time limit; run_job turns it into the driver's
    # SIGTERM, and every worker checkpoints at one step and stops (preemption) before SLURM kills the job.
    sbatch = [
        f"--job-name={name}",
        f"--nodes={nodes}",
        "--export=ALL",
        "--ntasks-per-node=1",
        f"--cpus-per-task={cpus}",
        f"--time={time_limit}",
        f"--output={name}-%j.out",
        f"--signal=B:USR1@{STOP_GRACE_S}",
    ]
    if gpus:
        sbatch.append(f"--gpus-per-task={gpus}")
    if partition:
        sbatch.append(f"--partition={partition}")
    run = _run_line(command, config, overrides, out_dir)
    shared = (
        "local, on a shared filesystem mounted at this path on every node"
        if nodes > 1
        else "a local path on the node"
    )
    text = _SLURM_TEMPLATE.format(
        source=config or "defaults",
        describe=_describe(job),
        storage=storage_comment(locations, shared),
        nodes=nodes,
        per_node=per_node,
        sbatch="\n".join(f"#SBATCH {line}" for line in sbatch),
        project=shlex.quote(str(project_dir)),
        activate=shlex.quote(f"{venv}/bin/activate"),
        cpus=cpus,
        gpus=gpus,
        entrypoint=run,
        run_job=SLURM_RUN_JOB,
    )
    return _check_clean(text, "script")


_SLURM_TEMPLATE = """#!/bin/bash
# Rendered by `kiln render slurm` from {source}: {describe};
# {nodes} node(s), up to {per_node} worker(s) per node. Submit with: sbatch <this file>
{storage}# s3:// locations: export AWS_ENDPOINT_URL, AWS_REGION and AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY
# (AWS_SESSION_TOKEN) before sbatch; --export=ALL passes them on and srun hands them to every node. Every
# node needs network access to the endpoint; never write their values into this file.
{sbatch}
set -euo pipefail

cd {project}
# shellcheck disable=SC1091
source {activate}

# Token authentication with a token made for this job alone: srun hands it to every node through the
# environment and it is never written to disk. WANDB_API_KEY / HF_TOKEN (and AWS_*) reach the job the same way:
# export them before calling sbatch (--export=ALL passes them on); never write them into this file.
export RAY_AUTH_MODE=token
RAY_AUTH_TOKEN="$(python -c 'import secrets; print(secrets.token_hex(32))')"
export RAY_AUTH_TOKEN
export RAY_DEDUP_LOGS=0 TOKENIZERS_PARALLELISM=false

mapfile -t nodes < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
head_node="${{nodes[0]}}"
head_ip="$(srun --nodes=1 --ntasks=1 -w "$head_node" hostname --ip-address | awk '{{print $1}}')"
port=6379
export RAY_ADDRESS="$head_ip:$port"
ray_tmp="/tmp/kiln-ray-$SLURM_JOB_ID"

ray_steps=()
stop_ray() {{
    # srun passes SIGTERM on to `ray start --block`, whose handler stops that node's Ray processes.
    if [ "${{#ray_steps[@]}}" -gt 0 ]; then kill "${{ray_steps[@]}}" 2>/dev/null || true; fi
    wait 2>/dev/null || true
}}
trap stop_ray EXIT

wait_for_nodes() {{
    python - "$RAY_ADDRESS" "$1" <<'PY'
import sys, time
import ray
address, want = sys.argv[1], int(sys.argv[2])
deadline = time.time() + 600
alive = 0
while time.time() < deadline:
    try:
        ray.init(address=address, logging_level="ERROR")
        alive = sum(1 for node in ray.nodes() if node["Alive"])
        ray.shutdown()
    except Exception:
        pass
    if alive >= want:
        sys.exit(0)
    time.sleep(5)
sys.exit(f"only {{alive}} of {{want}} Ray nodes joined within 600 s")
PY
}}

echo "[kiln] Ray head on $head_node ($RAY_ADDRESS)"
srun --nodes=1 --ntasks=1 -w "$head_node" \\
    ray start --head --block --node-ip-address="$head_ip" --port="$port" --dashboard-host=127.0.0.1 \\
    --num-cpus={cpus} --num-gpus={gpus} --temp-dir="$ray_tmp" --disable-usage-stats &
ray_steps+=("$!")
wait_for_nodes 1

for node in "${{nodes[@]:1}}"; do
    echo "[kiln] Ray worker on $node"
    srun --nodes=1 --ntasks=1 -w "$node" \\
        ray start --block --address="$RAY_ADDRESS" --num-cpus={cpus} --num-gpus={gpus} \\
        --temp-dir="$ray_tmp" --disable-usage-stats &
    ray_steps+=("$!")
done
wait_for_nodes {nodes}

echo "[kiln] {nodes} node(s) up; running the job"
{run_job}
run_job {entrypoint}
"""

# The job runs in the background so that a signal reaches the trap at once (bash runs traps only between
# foreground commands); USR1 (sent by --signal before the time limit) or TERM becomes the driver's SIGTERM. The
# script exits with the driver's status: 75 when it stopped with a checkpoint to resume from.
SLURM_RUN_JOB = """run_job() {
    "$@" &
    local driver=$!
    trap 'echo "[kiln] stop requested: checkpointing"; kill -TERM "$driver" 2>/dev/null || true' USR1 TERM
    while kill -0 "$driver" 2>/dev/null; do wait "$driver" || true; done
    local status=0
    wait "$driver" || status=$?
    trap - USR1 TERM
    return "$status"
}"""
