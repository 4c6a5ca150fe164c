"""`kiln render kuberay | slurm`: the manifest parses and is sized from the config; the sbatch script is valid bash;
a multi-node render carries storage URIs as written and refuses a location only one node would see."""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cluster import cli
from cluster.config import load_config
from cluster.jobs import FinetuneJob, PretrainJob
from cluster.preemption import EXIT_PREEMPTED, STOP_GRACE_S
from cluster.render import SLURM_RUN_JOB, infer_command, render_kuberay, render_slurm
from cluster.submit import entrypoint, upload_files
from data_pipeline.configlib import ConfigError, build, parse_override, read_yaml, set_dotted

ROOT = Path(__file__).resolve().parents[2]
BERT = ROOT / "configs" / "tiny-bert.yaml"
SIZED = [
    "cluster.num_workers=3",
    "cluster.cpus_per_worker=2",
    "cluster.use_gpu=true",
    "cluster.max_failures=2",
]
S3_DATA = "data_dir=s3://kiln/data/wikitext"
S3_OUT = "s3://kiln/runs/bert"


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
    overrides = [*SIZED, S3_DATA]
    _, doc = _manifest(overrides, out_dir=S3_OUT)
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayJob"
    spec = doc["spec"]
    # the URIs pass through as written (a Path would make `s3:/kiln/...` of them)
    assert spec["entrypoint"] == f"{entrypoint('pretrain', BERT, overrides, None)} --out {S3_OUT}"
    assert f" {S3_DATA} " in spec["entrypoint"]
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
        text, doc = _manifest(["cluster.num_workers=1"])
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
    overrides = [f"wandb.name={canary}", "cluster.num_workers=1"]
    with pytest.raises(ConfigError, match="HF_TOKEN") as err:
        render_kuberay("pretrain", BERT, overrides, _job(overrides), image="img")
    assert canary not in str(err.value)
    with pytest.raises(ConfigError, match="HF_TOKEN"):
        render_slurm("pretrain", BERT, overrides, _job(overrides), nodes=1)


def test_slurm_script_passes_bash_n_and_is_sized_from_the_config(tmp_path: Path) -> None:
    overrides = [
        "cluster.num_workers=4",
        "cluster.cpus_per_worker=3",
        "cluster.use_gpu=true",
        "data_dir=/shared/data/wikitext",
    ]
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
                "data_dir=s3://kiln/data/sst2",
                "encoder_checkpoint=/models/bert",  # absolute: baked into the image
                "--image",
                "img:1",
                "--out",
                str(out),
                "--job-out",
                "s3://kiln/runs/cls",
            ]
        )
    assert exit_info.value.code == 0
    doc = yaml.safe_load(out.read_text())
    assert doc["spec"]["entrypoint"].startswith(
        "python -m cluster finetune --config configs/classification.yaml"
    )
    assert doc["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["replicas"] == 2
    assert doc["spec"]["entrypoint"].endswith(
        "data_dir=s3://kiln/data/sst2 encoder_checkpoint=/models/bert --out s3://kiln/runs/cls"
    )


# ------------------------------------------------------------------------------- storage of multi-node renders
TRANSLATION = ROOT / "configs" / "translation.yaml"
S3_CHECKPOINTS = ["encoder_checkpoint=s3://kiln/runs/bert", "decoder_checkpoint=s3://kiln/runs/gpt"]


def _unresolved(cls: type, config: Path, overrides: list[str]) -> object:
    """The job with its locations as written: load_config would pin a checkpoint URI to one checkpoint,
    asking the S3 server, which the render itself never needs."""
    raw = read_yaml(config)
    for item in overrides:
        set_dotted(raw, *parse_override(item))
    return build(cls, raw, source=str(config))


def _kuberay(
    config: Path, cls: type, overrides: list[str], out_dir: str | None, **kw: object
) -> str:
    job = _unresolved(cls, config, overrides)
    command = "finetune" if cls is FinetuneJob else "pretrain"
    return render_kuberay(command, config, overrides, job, image="img:1", out_dir=out_dir, **kw)


def _slurm(overrides: list[str], nodes: int, out_dir: str | None) -> str:
    job = _job(["cluster.num_workers=4", *overrides])
    return render_slurm("pretrain", BERT, overrides, job, nodes=nodes, out_dir=out_dir)


def _one_line_refusal(render: object, *args: object) -> str:
    with pytest.raises(ConfigError) as err:
        render(*args)  # type: ignore[operator]
    message = str(err.value)
    assert "\n" not in message and "s3://" in message
    return message


@pytest.mark.parametrize(
    ("config", "cls", "overrides", "out_dir", "names"),
    [
        (BERT, PretrainJob, [], S3_OUT, "data_dir=runs/data: a relative path"),
        (BERT, PretrainJob, ["data_dir=/mnt/data"], S3_OUT, "data_dir=/mnt/data: the pods"),
        (BERT, PretrainJob, [S3_DATA], "runs/bert", "--job-out runs/bert: a relative path"),
        (BERT, PretrainJob, [S3_DATA], "/shared/bert", "--job-out /shared/bert: the pods"),
        (BERT, PretrainJob, [S3_DATA], None, "--job-out not given (the job would write to runs/"),
        (BERT, PretrainJob, [S3_DATA, "init_from=runs/gpt"], S3_OUT, "init_from=runs/gpt"),
        (TRANSLATION, FinetuneJob, [S3_DATA], S3_OUT, "encoder_checkpoint=runs/bert"),
        (
            TRANSLATION,
            FinetuneJob,
            [S3_DATA, S3_CHECKPOINTS[0], "decoder_checkpoint=./gpt"],
            S3_OUT,
            "decoder_checkpoint=./gpt",
        ),
    ],
)
def test_a_multi_pod_kuberay_render_refuses_a_location_one_pod_would_see(
    config: Path, cls: type, overrides: list[str], out_dir: str | None, names: str
) -> None:
    message = _one_line_refusal(_kuberay, config, cls, overrides, out_dir)
    assert message.startswith(names) and "2 worker pods" in message


def test_a_single_pod_kuberay_render_keeps_local_paths_but_never_uploads_them(
    tmp_path: Path,
) -> None:
    overrides = ["cluster.num_workers=1", "data_dir=prepared/wiki"]
    text = _kuberay(BERT, PretrainJob, overrides, "/mnt/out")
    doc = yaml.safe_load(text)
    assert doc["spec"]["entrypoint"].endswith("data_dir=prepared/wiki --out /mnt/out")
    excludes = yaml.safe_load(doc["spec"]["runtimeEnvYAML"])["excludes"]
    assert {"runs", "/data", "wandb", "checkpoints", "/prepared/wiki"} <= set(excludes)
    # What Ray's own packaging walk would upload with these excludes: the code, no data and no outputs.
    for name in ("cluster/cli.py", "runs/bert/model.safetensors", "data/x.txt", "prepared/wiki/a"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x")
    assert set(upload_files(tmp_path, excludes)) == {"cluster/cli.py"}


def test_an_s3_kuberay_render_carries_secret_names_and_s3_settings_never_secret_values(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    canaries = {var: f"canary-{secrets.token_hex(16)}" for var in ("ID", "KEY", "TOKEN")}
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", canaries["ID"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", canaries["KEY"])
    monkeypatch.setenv("AWS_SESSION_TOKEN", canaries["TOKEN"])
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://s3.example.internal:8333")
    monkeypatch.setenv("AWS_REGION", "eu-central-1")
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    monkeypatch.delenv("AWS_DEFAULT_REGION", raising=False)
    overrides = [S3_DATA, *S3_CHECKPOINTS, "cluster.num_workers=3"]
    text = _kuberay(TRANSLATION, FinetuneJob, overrides, S3_OUT, s3_secret="team-s3")
    assert not [value for value in canaries.values() if value in text]
    doc = yaml.safe_load(text)
    assert doc["spec"]["entrypoint"].endswith(
        f"{S3_DATA} {' '.join(S3_CHECKPOINTS)} cluster.num_workers=3 --out {S3_OUT}"
    )
    cluster = doc["spec"]["rayClusterSpec"]
    for pod in (cluster["headGroupSpec"], cluster["workerGroupSpecs"][0]):
        env = pod["template"]["spec"]["containers"][0]["env"]
        refs = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in env if "valueFrom" in e}
        assert refs["AWS_ACCESS_KEY_ID"] == {
            "name": "team-s3",
            "key": "aws-access-key-id",
            "optional": True,
        }
        assert (
            refs["AWS_SECRET_ACCESS_KEY"]["name"] == refs["AWS_SESSION_TOKEN"]["name"] == "team-s3"
        )
        values = {e["name"]: e["value"] for e in env if "value" in e}
        assert (
            values.items()
            >= {
                "AWS_ENDPOINT_URL": "http://s3.example.internal:8333",
                "AWS_REGION": "eu-central-1",
            }.items()
        )
        assert set(values) <= {"AWS_ENDPOINT_URL", "AWS_REGION", "RAY_JOB_STOP_WAIT_TIME_S"}
    assert "kubectl create secret generic team-s3" in text
    assert "loopback" not in text
    monkeypatch.setenv(
        "AWS_ENDPOINT_URL", "http://127.0.0.1:8333"
    )  # the tests' own server: no pod reaches it
    loopback = _kuberay(TRANSLATION, FinetuneJob, overrides, S3_OUT)
    assert "# WARNING: the endpoint is on loopback (127.0.0.1)" in loopback


def test_a_multi_node_slurm_render_refuses_relative_paths_and_keeps_shared_absolute_ones(
    tmp_path: Path,
) -> None:
    message = _one_line_refusal(_slurm, [], 2, "/shared/runs/bert")
    assert message.startswith("data_dir=runs/data: a relative path") and "absolute path" in message
    message = _one_line_refusal(_slurm, ["data_dir=/shared/data", "init_from=bert"], 2, S3_OUT)
    assert message.startswith("init_from=bert")
    message = _one_line_refusal(_slurm, ["data_dir=/shared/data"], 2, None)
    assert message.startswith("--job-out not given")
    text = _slurm(["data_dir=/shared/data"], 2, "/shared/runs/bert")
    assert (
        "#   data_dir  /shared/data: local, on a shared filesystem mounted at this path on every node"
        in (text)
    )
    assert (
        _slurm([], 1, None).count("runs/data") == 1
    )  # one node: today's relative paths still work


def test_an_s3_slurm_render_passes_uris_through_and_no_secret_value(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    canary = f"canary-{secrets.token_hex(16)}"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", canary)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", f"canary-{secrets.token_hex(16)}")
    text = _slurm([S3_DATA], 2, S3_OUT)
    assert canary not in text and os.environ["AWS_ACCESS_KEY_ID"] not in text
    run = f"run_job {entrypoint('pretrain', BERT, [S3_DATA], None)} --out {S3_OUT}"
    assert run in text.splitlines()
    assert "#SBATCH --export=ALL" in text.splitlines()
    assert "export AWS_ENDPOINT_URL, AWS_REGION and AWS_ACCESS_KEY_ID" in text
    script = tmp_path / "job.sbatch"
    script.write_text(text)
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_render_cli_refuses_a_relative_data_dir_on_two_nodes_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["render", "slurm", "--config", str(BERT), "--nodes", "2", "--out", str(tmp_path / "j")]
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "data_dir=runs/data" in err
    assert not (tmp_path / "j").exists()
