from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from torch import nn

from data_pipeline.configlib import from_preset
from pretrain.checkpoint import (
    CheckpointError,
    capture_rng_state,
    check_free_space,
    clean_partial_saves,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    newest_valid_checkpoint,
    prune_checkpoints,
    restore_rng_state,
    save_checkpoint,
    sha256_file,
)
from pretrain.models.bert import BertConfig, BertForPreTraining
from pretrain.models.gpt import GPTConfig, GPTLMHeadModel
from pretrain.optim import OptimConfig, build_optimizer
from pretrain.registry import PRETRAIN_ARCHITECTURES, ArchSpec


@pytest.fixture
def tokenizer_file(tmp_path: Path) -> Path:
    f = tmp_path / "data" / "tokenizer.json"
    f.parent.mkdir()
    f.write_text('{"version": "1.0", "model": {}}')
    return f


def bert() -> tuple[BertForPreTraining, BertConfig]:
    cfg = from_preset(BertConfig, "tiny", vocab_size=40)
    return BertForPreTraining(cfg), cfg


def gpt() -> tuple[GPTLMHeadModel, GPTConfig]:
    cfg = from_preset(GPTConfig, "tiny", vocab_size=40, n_inner=96)
    return GPTLMHeadModel(cfg), cfg


def trained_state(model: nn.Module) -> dict:
    opt, sched = build_optimizer(model, OptimConfig(warmup_steps=2), total_steps=10)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    sched.step()
    return {
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
        "step": 1,
        "loader": {"epoch": 0, "batches_served": 1},
        "rng": capture_rng_state(),
    }


@pytest.mark.parametrize(
    "make, head, embedding",
    [
        (bert, "cls.predictions.decoder.weight", "bert.embeddings.word_embeddings.weight"),
        (gpt, "lm_head.weight", "transformer.wte.weight"),
    ],
)
def test_round_trip_is_bitwise_and_reties(
    tmp_path: Path, tokenizer_file: Path, make, head: str, embedding: str
) -> None:
    model, cfg = make()
    state = trained_state(model)
    job = {"trainer": {"max_steps": 10}, "seed": 3}
    data_manifest = tokenizer_file.parent / "manifest.json"
    data_manifest.write_text("{}")
    out = save_checkpoint(
        tmp_path / "ckpt" / "step-1", model, cfg, tokenizer_file, job, state, data_manifest
    )
    assert out == tmp_path / "ckpt" / "step-1"
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [
        "step-1"
    ]  # no .tmp-* left behind

    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        assert embedding in f.keys() and head not in f.keys()  # the tied matrix is stored once

    loaded = load_checkpoint(out)
    assert loaded.arch == cfg.arch and loaded.model_config == cfg and loaded.job_config == job
    assert (out / "tokenizer.json").read_bytes() == tokenizer_file.read_bytes()
    assert loaded.tokenizer_file == out / "tokenizer.json"
    manifest = json.loads((out / "manifest.json").read_text())
    assert (
        manifest["data_manifest"]["sha256"] == sha256_file(data_manifest) and manifest["step"] == 1
    )
    assert set(manifest["files"]) == {
        "model.safetensors",
        "config.json",
        "tokenizer.json",
        "trainer_state/state.pt",
    }

    original = model.state_dict()
    assert set(loaded.state_dict) == set(original)
    for name, tensor in original.items():
        assert torch.equal(loaded.state_dict[name], tensor), name
        assert torch.equal(loaded.model.state_dict()[name], tensor), name
    assert loaded.model.get_parameter(head) is loaded.model.get_parameter(embedding)  # re-tied

    restored = loaded.trainer_state()
    opt, sched = build_optimizer(loaded.model, OptimConfig(warmup_steps=2), total_steps=10)
    opt.load_state_dict(restored["optimizer"])
    sched.load_state_dict(restored["scheduler"])
    assert sched.last_epoch == 1 and restored["loader"] == {"epoch": 0, "batches_served": 1}
    torch.testing.assert_close(
        opt.state_dict()["state"][0]["exp_avg"], state["optimizer"]["state"][0]["exp_avg"]
    )


def test_rng_state_round_trips_through_a_checkpoint(tmp_path: Path) -> None:
    model, cfg = gpt()
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    path = save_checkpoint(
        tmp_path / "c", model, cfg, None, trainer_state={"rng": capture_rng_state()}
    )
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    restore_rng_state(load_checkpoint(path).trainer_state()["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_tampered_file_is_detected_and_named(tmp_path: Path, tokenizer_file: Path) -> None:
    model, cfg = bert()
    path = save_checkpoint(tmp_path / "c", model, cfg, tokenizer_file)
    load_checkpoint(path)
    original = (path / "model.safetensors").read_bytes()
    flipped = bytearray(original)
    flipped[-3] ^= 1  # one bit of one weight
    (path / "model.safetensors").write_bytes(bytes(flipped))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: sha256 mismatch"):
        load_checkpoint(path)
    (path / "model.safetensors").write_bytes(original)
    load_checkpoint(path)
    (path / "tokenizer.json").unlink()
    with pytest.raises(
        CheckpointError, match=r"tokenizer\.json: listed in manifest\.json but missing"
    ):
        load_checkpoint(path)


def test_listing_ignores_tmp_and_incomplete_dirs_and_prunes(tmp_path: Path) -> None:
    model, cfg = gpt()
    root = tmp_path / "ckpts"
    saved = [
        save_checkpoint(root / f"step-{i}", model, cfg, None, trainer_state={"step": i})
        for i in range(4)
    ]
    assert list_checkpoints(root) == saved and latest_checkpoint(root) == saved[-1]
    # A save in progress (or crashed) and a directory without a manifest are never "latest".
    (root / ".tmp-step-9").mkdir()
    (root / ".tmp-step-9" / "manifest.json").write_text((saved[0] / "manifest.json").read_text())
    (root / "step-8").mkdir()
    (root / "step-8" / "model.safetensors").write_bytes(b"partial")
    truncated = root / "step-7"
    save_checkpoint(truncated, model, cfg, None)
    (truncated / "model.safetensors").write_bytes(b"short")  # manifest present, file incomplete
    assert latest_checkpoint(root) == saved[-1]
    assert list_checkpoints(root) == saved

    removed = prune_checkpoints(root, keep_last=2)
    assert removed == saved[:2] and not saved[0].exists()
    assert list_checkpoints(root) == saved[2:]
    assert (root / ".tmp-step-9").exists() and (root / "step-8").exists()
    with pytest.raises(ValueError, match="keep_last"):
        prune_checkpoints(root, keep_last=0)
    assert latest_checkpoint(tmp_path / "nowhere") is None


def test_existing_target_needs_overwrite(tmp_path: Path) -> None:
    model, cfg = gpt()
    path = save_checkpoint(tmp_path / "c", model, cfg, None, job_config={"v": 1})
    with pytest.raises(CheckpointError, match="already exists"):
        save_checkpoint(path, model, cfg, None)
    save_checkpoint(path, model, cfg, None, job_config={"v": 2}, overwrite=True)
    assert load_checkpoint(path).job_config == {"v": 2}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]


def test_bad_inputs_are_refused_before_anything_is_written(tmp_path: Path) -> None:
    model, cfg = gpt()
    with pytest.raises(CheckpointError, match=r"trainer_state\['rng'\]\['numpy'\] is a ndarray"):
        save_checkpoint(
            tmp_path / "a", model, cfg, None, trainer_state={"rng": {"numpy": np.zeros(3)}}
        )
    with pytest.raises(CheckpointError, match="job_config is not JSON"):
        save_checkpoint(tmp_path / "b", model, cfg, None, job_config={"path": Path("x")})
    with pytest.raises(CheckpointError, match="missing.json: tokenizer file not found"):
        save_checkpoint(tmp_path / "c", model, cfg, tmp_path / "missing.json")
    with pytest.raises(CheckpointError, match="dataclass"):
        save_checkpoint(tmp_path / "d", model, {"arch": "gpt"}, None)
    assert list(tmp_path.iterdir()) == []


def test_config_and_arch_errors_name_the_file(tmp_path: Path) -> None:
    model, cfg = bert()
    path = save_checkpoint(tmp_path / "c", model, cfg, None)
    with pytest.raises(
        CheckpointError, match=r"config\.json: arch 'bert' is not in the architecture registry"
    ):
        load_checkpoint(path, registry={"gpt": PRETRAIN_ARCHITECTURES["gpt"]})
    as_gpt = ArchSpec("bert", GPTConfig, GPTLMHeadModel, "clm")  # a BERT dir read as GPT
    with pytest.raises(CheckpointError, match=r"config\.json: unknown key\(s\) \[.*'hidden_size'"):
        load_checkpoint(path, registry={"bert": as_gpt})
    doc = json.loads((path / "config.json").read_text())
    doc["config"]["hidden_size"] = 32
    (path / "config.json").write_text(json.dumps(doc))
    with pytest.raises(
        CheckpointError, match=r"model\.safetensors: weights do not fit BertForPreTraining"
    ):
        load_checkpoint(path, verify=False)
    doc["config"]["hidden_sise"] = 3
    (path / "config.json").write_text(json.dumps(doc))
    with pytest.raises(CheckpointError, match=r"config\.json: unknown key\(s\) \['hidden_sise'\]"):
        load_checkpoint(path, verify=False)
    with pytest.raises(CheckpointError, match="sha256 mismatch"):
        load_checkpoint(path)
    (path / "manifest.json").write_text("{\n  not json")
    with pytest.raises(CheckpointError, match=r"manifest\.json: invalid JSON at line 2"):
        load_checkpoint(path)


@dataclass
class ProbeConfig:
    arch: str = "probe"
    width: int = 3


class Probe(nn.Module):
    def __init__(self, config: ProbeConfig) -> None:
        super().__init__()
        self.proj = nn.Linear(config.width, config.width)


def test_a_caller_registry_extends_the_architectures(tmp_path: Path) -> None:
    cfg = ProbeConfig(width=5)
    model = Probe(cfg)
    path = save_checkpoint(tmp_path / "p", model, cfg, None)
    probe = ArchSpec("probe", ProbeConfig, Probe, "lm")
    loaded = load_checkpoint(path, registry={**PRETRAIN_ARCHITECTURES, "probe": probe})
    assert loaded.model_config == cfg and torch.equal(loaded.model.proj.weight, model.proj.weight)


def test_resume_skips_a_corrupted_newest_checkpoint_with_a_warning(tmp_path: Path) -> None:
    model, cfg = gpt()
    root = tmp_path / "checkpoints"
    older = save_checkpoint(root / "step-0000002", model, cfg, trainer_state={"step": 2})
    newer = save_checkpoint(root / "step-0000004", model, cfg, trainer_state={"step": 4})
    warnings: list[str] = []
    assert newest_valid_checkpoint(root, warnings.append) == newer and warnings == []
    weights = newer / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01  # one flipped bit
    weights.write_bytes(bytes(data))
    assert newest_valid_checkpoint(root, warnings.append) == older
    assert (
        len(warnings) == 1
        and "skipping step-0000004" in warnings[0]
        and "sha256 mismatch" in warnings[0]
    )
    (older / "model.safetensors").write_bytes(
        bytes(data)
    )  # the newer one's flipped bytes: same size, wrong sha
    with pytest.raises(CheckpointError, match=r"none of the 2 checkpoints is intact"):
        newest_valid_checkpoint(root, warnings.append)
    (older / "model.safetensors").write_bytes(
        b"truncated"
    )  # a truncated file is not even a complete checkpoint
    assert list_checkpoints(root) == [newer]
    assert newest_valid_checkpoint(tmp_path / "none", warnings.append) is None


def test_interrupted_saves_are_cleaned_and_never_listed(tmp_path: Path) -> None:
    model, cfg = gpt()
    root = tmp_path / "checkpoints"
    kept = save_checkpoint(root / "step-0000001", model, cfg)
    (root / ".tmp-step-0000002").mkdir()
    (root / ".tmp-step-0000002" / "model.safetensors").write_bytes(b"half")
    assert list_checkpoints(root) == [kept]
    assert [p.name for p in clean_partial_saves(root)] == [".tmp-step-0000002"]
    assert sorted(p.name for p in root.iterdir()) == ["step-0000001"]


def test_disk_full_during_a_save_keeps_the_previous_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno

    import pretrain.checkpoint as ckpt

    model, cfg = gpt()
    root = tmp_path / "checkpoints"
    previous = save_checkpoint(root / "step-0000002", model, cfg, trainer_state={"step": 2})

    def full_disk(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(
        ckpt.torch, "save", full_disk
    )  # the trainer state is written after the weights
    with pytest.raises(
        CheckpointError, match=r"step-0000004: the disk is full .* earlier checkpoints are intact"
    ):
        save_checkpoint(root / "step-0000004", model, cfg, trainer_state={"step": 4})
    assert sorted(p.name for p in root.iterdir()) == [
        "step-0000002"
    ]  # no half-written save left behind
    assert newest_valid_checkpoint(root) == previous


def test_free_space_is_checked_before_training(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from collections import namedtuple

    import pretrain.checkpoint as ckpt

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(
        ckpt.shutil, "disk_usage", lambda p: usage(10**9, 0, 50 * 2**20)
    )  # 50 MiB free
    check_free_space(
        tmp_path / "out" / "checkpoints", num_params=1_000_000, keep_last=2
    )  # 3 x 11.4 MiB fits
    with pytest.raises(
        CheckpointError, match=r"50 MiB free, but 3 checkpoints of ~114 MiB each \(10,000,000 "
    ):
        check_free_space(tmp_path / "out" / "checkpoints", num_params=10_000_000, keep_last=2)
    assert not (tmp_path / "out").exists()
