"""`kiln render kuberay | slurm`: the manifest parses and is sized from the config; the sbatch script is valid bash."""

from __future__ import annotations

import secrets
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cluster import cli
from cluster.config import load_config
from cluster.jobs import PretrainJob
from cluster.preemption import EXIT_PREEMPTED, STOP_GRACE_S
from cluster.render import SLURM_RUN_JOB, infer_command, render_kuberay, render_slurm
from cluster.submit import entrypoint
from data_pipeline.configlib import ConfigError

ROOT = Path(__file__).resolve().parents[2]
BERT = ROOT / "configs" / "tiny-bert.yaml"
SIZED = [
    "cluster.num_workers=3",
    "cluster.cpus_per_worker=2",
    "cluster.use_gpu=true",
    "cluster.max_failures=2",
]


def _job(overrides: list[str]) -> PretrainJob:
    return load_config(PretrainJob, BERT, overrides)


def _manifest(overrides: list[str], **kwargs: object) -> tuple[str, dict]:
    text = render_kuberay(
        "pretrain", BERT, overrides, _job(overrides), image="registry.example/kiln:1", **kwargs
    )
    docs = list(yaml.safe_load_all(text))
    assert len(docs) == 1
    return text, docs[0]


def test_kuberay_manifest_names_the_configured_resources() -> None:
    _, doc = _manifest(SIZED, out_dir="/mnt/shared/bert")
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayJob"
    spec = doc["spec"]
    assert spec["entrypoint"] == entrypoint("pretrain", BERT, SIZED, Path("/mnt/shared/bert"))
    cluster = spec["rayClusterSpec"]
    assert cluster["authOptions"] == {"mode": "token"}
    assert cluster["headGroupSpec"]["rayStartParams"] == {
        "num-cpus": "0"
    }  # the head runs only the driver
    (group,) = cluster["workerGroupSpecs"]
    assert group["replicas"] == group["minReplicas"] == group["maxReplicas"] == 3
    (worker,) = group["template"]["spec"]["containers"]
    assert worker["image"] == "registry.example/kiln:1"
    assert worker["resources"]["limits"] == {"cpu": "2", "memory": "8Gi", "nvidia.com/gpu": "1"}
    assert worker["resources"]["requests"] == worker["resources"]["limits"]
    (head,) = cluster["headGroupSpec"]["template"]["spec"]["containers"]
    # Deleting the RayJob SIGTERMs the driver: long enough before Ray's SIGKILL for one step and a checkpoint.
    assert {"name": "RAY_JOB_STOP_WAIT_TIME_S", "value": str(STOP_GRACE_S)} in head["env"]


def test_kuberay_secrets_are_references_and_the_runtime_env_holds_none() -> None:
    canary = f"canary-{secrets.token_hex(16)}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WANDB_API_KEY", canary)
        text, doc = _manifest([])
    assert canary not in text
    runtime_env = yaml.safe_load(doc["spec"]["runtimeEnvYAML"])
    assert runtime_env["working_dir"] == "/kiln" and "env_vars" not in runtime_env
    assert "runs" in runtime_env["excludes"] and "wandb" in runtime_env["excludes"]
    cluster = doc["spec"]["rayClusterSpec"]
    containers = [
        cluster["headGroupSpec"]["template"]["spec"]["containers"][0],
        cluster["workerGroupSpecs"][0]["template"]["spec"]["containers"][0],
    ]
    for container in containers:
        refs = {
            e["name"]: e["valueFrom"]["secretKeyRef"] for e in container["env"] if "valueFrom" in e
        }
        assert refs["WANDB_API_KEY"] == {
            "name": "kiln-secrets",
            "key": "wandb-api-key",
            "optional": True,
        }
        assert refs["HF_TOKEN"]["name"] == "kiln-secrets"
        assert {e["name"] for e in container["env"] if "value" in e} <= {
            "RAY_JOB_STOP_WAIT_TIME_S"
        }  # no secret


def test_kuberay_without_gpu_and_without_image() -> None:
    _, doc = _manifest(["cluster.num_workers=1"])
    worker = doc["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][
        0
    ]
    assert "nvidia.com/gpu" not in worker["resources"]["limits"]
    with pytest.raises(ConfigError, match="--image"):
        render_kuberay("pretrain", BERT, [], _job([]), image=None)


def test_a_secret_in_the_overrides_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    canary = f"canary-{secrets.token_hex(16)}"
    monkeypatch.setenv("HF_TOKEN", canary)
    overrides = [f"wandb.name={canary}"]
    with pytest.raises(ConfigError, match="HF_TOKEN") as err:
        render_kuberay("pretrain", BERT, overrides, _job(overrides), image="img")
    assert canary not in str(err.value)
    with pytest.raises(ConfigError, match="HF_TOKEN"):
        render_slurm("pretrain", BERT, overrides, _job(overrides), nodes=1)


def test_slurm_script_passes_bash_n_and_is_sized_from_the_config(tmp_path: Path) -> None:
    overrides = ["cluster.num_workers=4", "cluster.cpus_per_worker=3", "cluster.use_gpu=true"]
    text = render_slurm(
        "pretrain",
        BERT,
        overrides,
        _job(overrides),
        nodes=2,
        out_dir="/shared/runs/bert",
        partition="gpu",
    )
    script = tmp_path / "job.sbatch"
    script.write_text(text)
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    for line in (
        "#SBATCH --nodes=2",
        "#SBATCH --cpus-per-task=6",
        "#SBATCH --gpus-per-task=2",
        "#SBATCH --partition=gpu",
        "#SBATCH --ntasks-per-node=1",
    ):
        assert line in text.splitlines()
    assert "ray start --head --block" in text and "ray start --block --address" in text
    assert "--num-cpus=6 --num-gpus=2" in text
    assert "wait_for_nodes 2" in text and "trap stop_ray EXIT" in text
    assert (
        f"run_job {entrypoint('pretrain', BERT, overrides, Path('/shared/runs/bert'))}"
        in text.splitlines()
    )
    assert f"#SBATCH --signal=B:USR1@{STOP_GRACE_S}" in text.splitlines()


FAKE_DRIVER = """
import signal, sys, time
def stop(signum, frame):
    print("driver: SIGTERM, checkpointing", flush=True)
    sys.exit(75)
signal.signal(signal.SIGTERM, stop)
print("driver: training", flush=True)
time.sleep(60)
sys.exit(0)
"""


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM])
def test_slurm_run_job_turns_the_time_limit_signal_into_the_drivers_sigterm(
    tmp_path: Path, sig: int
) -> None:
    script = tmp_path / "job.sh"
    script.write_text(
        f"set -euo pipefail\n{SLURM_RUN_JOB}\nrun_job {sys.executable} -c '{FAKE_DRIVER}'\n"
    )
    shell = subprocess.Popen(["bash", str(script)], stdout=subprocess.PIPE, text=True)
    assert shell.stdout.readline().strip() == "driver: training"
    shell.send_signal(sig)  # what `--signal=B:USR1@...` (or scancel) sends to the batch shell
    out, _ = shell.communicate(timeout=30)
    assert shell.returncode == EXIT_PREEMPTED  # the driver's own status, not the signal's
    assert "stop requested" in out and "driver: SIGTERM, checkpointing" in out


def test_slurm_run_job_passes_a_normal_exit_through(tmp_path: Path) -> None:
    script = tmp_path / "job.sh"
    script.write_text(
        f"set -euo pipefail\n{SLURM_RUN_JOB}\nrun_job {sys.executable} -c 'import sys; sys.exit(3)'\n"
        "echo unreachable\n"
    )
    result = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 3 and "unreachable" not in result.stdout


def test_slurm_refuses_more_nodes_than_workers() -> None:
    with pytest.raises(ConfigError, match="at most as many nodes as workers"):
        render_slurm("pretrain", BERT, [], _job(["cluster.num_workers=2"]), nodes=3)
    with pytest.raises(ConfigError, match="--nodes"):
        render_slurm("pretrain", BERT, [], _job([]), nodes=None)


def test_the_command_follows_the_task() -> None:
    assert infer_command(BERT, []) == "pretrain"
    assert infer_command(ROOT / "configs" / "translation.yaml", []) == "finetune"
    assert infer_command(None, ["task=classification"]) == "finetune"
    assert infer_command(None, []) == "pretrain"


def test_render_cli_writes_a_finetune_manifest(tmp_path: Path) -> None:
    out = tmp_path / "rayjob.yaml"
    with pytest.raises(SystemExit) as exit_info:
        cli.main(
            [
                "render",
                "kuberay",
                "--config",
                str(ROOT / "configs" / "classification.yaml"),
                "cluster.num_workers=2",
                "--image",
                "img:1",
                "--out",
                str(out),
                "--job-out",
                "/shared/cls",
            ]
        )
    assert exit_info.value.code == 0
    doc = yaml.safe_load(out.read_text())
    assert doc["spec"]["entrypoint"].startswith(
        "python -m cluster finetune --config configs/classification.yaml"
    )
    assert doc["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["replicas"] == 2
