"""benchmarks/gpu_check.py: a CPU smoke test that runs the script as the GPU machine would (no Ray,
DeepSpeed or W&B importable), its ZeRO-2 part on CPU, and `gpu`-marked tests that run it on CUDA
(skipped without one)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"
ABSENT = ("ray", "wandb", "deepspeed")  # not installed on the GPU machine this project may borrow
# Runs the script with ABSENT unimportable (as if not installed), then says if any was imported.
WITHOUT = f"""
import importlib.abc, runpy, sys
class Absent(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {ABSENT!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None
sys.meta_path.insert(0, Absent())
sys.argv = [{str(SCRIPT)!r}, *sys.argv[1:]]
runpy.run_path(sys.argv[0], run_name="__main__")
print("LOADED", sorted(m for m in sys.modules if m.split(".")[0] in {ABSENT!r}))
"""


def _load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _run(
    args: list[str], without: bool = False, timeout: int = 600
) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, *(["-c", WITHOUT] if without else [str(SCRIPT)]), *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def _report(out: Path) -> dict[str, Any]:
    return json.loads((out / "gpu_check.json").read_text())


def test_smoke_on_cpu_without_ray_deepspeed_or_wandb(tmp_path: Path) -> None:
    proc = _run(["--device", "cpu", "--tiny", "--out", str(tmp_path)], without=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "LOADED []" in proc.stdout  # nothing it imports pulls Ray, DeepSpeed or W&B in
    report = _report(tmp_path)
    env = report["environment"]
    assert env["date"] and env["device"] and env["torch"] and env["deepspeed"] is None
    assert {"cuda", "lightning", "python"} <= env.keys()
    parts = {r["part"]: r for r in report["results"]}
    assert list(parts) == ["gpt2-124m", "bert-base", "ddp", "zero2"]
    for name in ("gpt2-124m", "bert-base", "ddp"):
        r = parts[name]
        assert r["status"] == "ok", r
        assert r["tokens_per_s"] > 0 and 0 < r["mfu"] < 1 and r["timed_steps"] == 2, r
    assert parts["ddp"]["backend"] == "gloo" and parts["gpt2-124m"]["backend"] is None
    assert parts["zero2"]["status"] == "skipped: deepspeed not installed"
    assert 'pip install --no-build-isolation "deepspeed' in proc.stdout  # the line that adds it
    table = (tmp_path / "gpu_check.md").read_text()
    assert "| zero2 |" in table and "skipped: deepspeed not installed" in table
    assert env["date"] in table


def test_zero2_part_trains_on_cpu_through_kilns_strategy(tmp_path: Path) -> None:
    pytest.importorskip("deepspeed")
    proc = _run(["--device", "cpu", "--tiny", "--parts", "zero2", "--out", str(tmp_path)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    (r,) = _report(tmp_path)["results"]
    assert r["status"] == "ok" and r["strategy"] == "zero2", r
    assert r["backend"] == "gloo" and r["tokens_per_s"] > 0, r


def test_its_zero_config_is_kilns() -> None:
    from cluster.jobs import ClusterConfig
    from cluster.strategies import build_strategy

    gpu_check = _load_script()
    kiln = build_strategy(ClusterConfig(strategy="deepspeed_stage_2"), 8).config
    assert gpu_check.kiln_zero_config(2, 8) == kiln


def test_bad_arguments_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    gpu_check = _load_script()
    with pytest.raises(SystemExit) as exit_info:
        gpu_check.parse_args(["--out", "x", "--device", "cpu", "--parts", "gpt2-124m,bogus"])
    assert exit_info.value.code == 2
    assert "--parts: unknown ['bogus']" in capsys.readouterr().err


@pytest.mark.gpu
def test_tiny_run_on_cuda_in_bf16_with_nccl(tmp_path: Path) -> None:
    proc = _run(["--device", "cuda", "--tiny", "--out", str(tmp_path)], timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = _report(tmp_path)
    assert report["environment"]["device_type"] == "cuda" and report["environment"]["cuda"]
    parts = {r["part"]: r for r in report["results"]}
    for name in ("gpt2-124m", "bert-base", "ddp"):
        assert parts[name]["status"] == "ok", parts[name]
        assert parts[name]["precision"] == "bf16-mixed", parts[name]
        assert parts[name]["peak_memory_gib"] > 0, parts[name]
    assert parts["ddp"]["backend"] == "nccl"
    assert parts["zero2"]["status"] in ("ok", "skipped: deepspeed not installed"), parts


@pytest.mark.gpu
def test_the_device_peak_is_known_or_measured() -> None:
    import torch

    from pretrain.flops import peak_flops

    peak, source = peak_flops(None, torch.device("cuda", 0), "bf16-mixed")
    assert peak > 1e12, (peak, source)  # any GPU worth using does > 1 TFLOP/s in bf16
