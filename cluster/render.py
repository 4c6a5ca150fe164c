"""`kiln render kuberay | slurm`: the same job config as a KubeRay RayJob manifest or a SLURM sbatch script.

Both run the command `kiln submit` would (`python -m cluster pretrain|finetune --config ... overrides`), on a Ray
cluster sized from the config's `cluster` section: `num_workers` Ray Train workers of `cpus_per_worker` CPUs and,
with `use_gpu`, one GPU each. Secrets are never written into either file: KubeRay pods read them from a
Kubernetes Secret (secretKeyRef), SLURM jobs from the environment `sbatch` was called in.
"""

from __future__ import annotations

import math
import shlex
from pathlib import Path
from typing import Any, get_args

import yaml

from cluster.jobs import FinetuneTask
from cluster.preemption import STOP_GRACE_S
from cluster.submit import EXCLUDES, PROJECT_ROOT, entrypoint
from cluster.tracking import find_secrets
from data_pipeline.configlib import ConfigError, parse_override, read_yaml

SECRET_NAME = "kiln-secrets"  # the Kubernetes Secret the pods read WANDB_API_KEY / HF_TOKEN from
SECRET_KEYS = {"WANDB_API_KEY": "wandb-api-key", "HF_TOKEN": "hf-token"}


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
    env = [
        {
            "name": var,
            "valueFrom": {"secretKeyRef": {"name": secret_name, "key": key, "optional": True}},
        }
        for var, key in SECRET_KEYS.items()
    ]
    worker_resources: dict[str, Any] = {"cpu": str(c.cpus_per_worker), "memory": worker_memory}
    if c.use_gpu:
        worker_resources["nvidia.com/gpu"] = "1"
    # The submitter pod (same image as the head) uploads code_dir as the job's working_dir, exactly as
    # `kiln submit` uploads the project; runtimeEnvYAML holds no secret (Ray stores it in the job's info).
    runtime_env = {"working_dir": code_dir, "excludes": EXCLUDES}
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
            "entrypoint": entrypoint(
                command, config, overrides, Path(out_dir) if out_dir else None
            ),
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
    header = (
        f"# Rendered by `kiln render kuberay` from {config or 'defaults'}: {_describe(job)}.\n"
        f"# Secrets come from the Kubernetes Secret '{secret_name}' (keys {', '.join(SECRET_KEYS.values())}):\n"
        f'#   kubectl create secret generic {secret_name} --from-literal=wandb-api-key="$WANDB_API_KEY"\n'
        "# Apply with: kubectl apply -f <this file>; follow with: kubectl get rayjob; kubectl logs -l "
        f"job-name={name}\n"
    )
    if not out_dir:
        header += "# No --job-out: outputs stay in the head pod and vanish with it; mount shared storage.\n"
    text = yaml.dump(manifest, Dumper=_ManifestDumper, sort_keys=False, width=1000)
    return _check_clean(header + text, "manifest")


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
    per_node = math.ceil(c.num_workers / nodes)
    cpus, gpus = per_node * c.cpus_per_worker, per_node if c.use_gpu else 0
    venv = venv or str(project_dir / ".venv")
    name = name or f"kiln-{command}"
    # --signal: USR1 to the batch shell STOP_GRACE_S before the time limit; run_job turns it into the driver's
    # SIGTERM, and every worker checkpoints at one step and stops (preemption) before SLURM kills the job.
    sbatch = [
        f"--job-name={name}",
        f"--nodes={nodes}",
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
    run = entrypoint(command, config, overrides, Path(out_dir) if out_dir else None)
    text = _SLURM_TEMPLATE.format(
        source=config or "defaults",
        describe=_describe(job),
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
{sbatch}
set -euo pipefail

cd {project}
# shellcheck disable=SC1091
source {activate}

# Token authentication with a token made for this job alone: srun hands it to every node through the
# environment and it is never written to disk. WANDB_API_KEY / HF_TOKEN reach the job the same way: export them
# before calling sbatch (SLURM passes the submitting environment on); never write them into this file.
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
