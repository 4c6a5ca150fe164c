"""Checkpoints on an object store (a real S3 server on loopback, the `s3` fixture): published files
first and manifest.json last, listed from complete manifests only, selected and loaded through a
verified local copy in the cache, pruned without touching uploads in progress."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
import torch
from kiln_testlib import word_tokenizer

from cluster.config import resolve_location
from data_pipeline.configlib import from_preset
from data_pipeline.storage import Location, StorageError, local_copy
from pretrain.checkpoint import (
    CheckpointError,
    fetch_checkpoint,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    load_trainer_state,
    newest_valid_checkpoint,
    prune_checkpoints,
    publish_checkpoint,
    read_manifest,
    resolve_checkpoint,
    save_checkpoint,
    select_checkpoint,
    verify_checkpoint,
)
from pretrain.hf_export import export_hf
from pretrain.models.gpt import GPTConfig, GPTLMHeadModel

WORDS = ["the", "cat", "sat", "on", "mat"]
VOCAB = 7 + len(WORDS)  # the specials, then the words (kiln_testlib.word_tokenizer)


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh KILN_CACHE: what a test fetches is fetched by this test."""
    monkeypatch.setenv("KILN_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def tokenizer_file(tmp_path: Path) -> Path:
    file = tmp_path / "data" / "tokenizer.json"
    file.parent.mkdir()
    word_tokenizer(WORDS).save(str(file))
    return file


def tiny_gpt(seed: int = 0) -> tuple[GPTLMHeadModel, GPTConfig]:
    torch.manual_seed(seed)
    cfg = from_preset(GPTConfig, "tiny", vocab_size=VOCAB, n_inner=96, n_positions=32)
    return GPTLMHeadModel(cfg), cfg


def saved(
    tmp_path: Path, step: int, tokenizer: Path | None = None, launch: str | None = None
) -> Path:
    """A complete local checkpoint of a tiny GPT at `step` (weights differ per step)."""
    model, cfg = tiny_gpt(seed=step)
    path = tmp_path / "local" / f"step-{step:07d}"
    state = {"step": step, "loader": {"batches_served": step}}
    return save_checkpoint(path, model, cfg, tokenizer, trainer_state=state, launch=launch)


def published(tmp_path: Path, root: str, step: int, **kwargs: object) -> str:
    local = saved(tmp_path, step, **kwargs)  # type: ignore[arg-type]
    uri = f"{root}/{local.name}"
    publish_checkpoint(local, uri)
    return uri


def upload_without_manifest(local: Path, uri: str, scratch: Path) -> None:
    """An upload cut short before its last object: every file but manifest.json."""
    partial = scratch / f"partial-{local.name}"
    shutil.copytree(local, partial)
    (partial / "manifest.json").unlink()
    Location.of(uri).upload(partial)


def test_a_published_checkpoint_is_selected_and_loads_the_same_weights(
    s3: object,
    tmp_path: Path,
    cache: Path,
    tokenizer_file: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    run = s3.prefix("run")  # type: ignore[attr-defined]
    local = saved(tmp_path, 2, tokenizer_file)
    uri = f"{run}/checkpoints/step-0000002"
    publish_checkpoint(local, uri)
    assert Location.of(uri).walk() == sorted(
        p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file()
    )
    assert (
        list_checkpoints(f"{run}/checkpoints") == [uri] == [latest_checkpoint(run + "/checkpoints")]
    )
    assert select_checkpoint(run) == uri  # a run directory means its newest checkpoint, by URI
    assert select_checkpoint(uri) == uri and read_manifest(uri) == read_manifest(local)
    assert resolve_location(run, "checkpoint") == uri  # a job's init_from, pinned on the driver

    remote, here = load_checkpoint(uri), load_checkpoint(local)
    assert remote.path.is_relative_to(cache) and remote.tokenizer_file is not None
    assert remote.state_dict.keys() == here.state_dict.keys()
    assert all(torch.equal(remote.state_dict[k], v) for k, v in here.state_dict.items())
    assert load_trainer_state(uri)["loader"] == {"batches_served": 2}
    assert resolve_checkpoint(run) == fetch_checkpoint(uri) == remote.path
    assert fetch_checkpoint(local) == local  # a local checkpoint is itself

    def no_upload(*args: object, **kwargs: object) -> None:
        raise AssertionError("published again")

    monkeypatch.setattr(Location, "upload", no_upload)
    publish_checkpoint(local, uri)  # already there, complete and the same: nothing to do


def test_an_upload_without_its_manifest_is_never_listed_or_selected(
    s3: object, tmp_path: Path, cache: Path
) -> None:
    root = s3.prefix("ckpts")  # type: ignore[attr-defined]
    older = published(tmp_path, root, 2)
    upload_without_manifest(saved(tmp_path, 4), f"{root}/step-0000004", tmp_path)
    short = published(tmp_path, root, 6)
    (Location.of(short) / "model.safetensors").write_bytes(b"truncated")  # a listed size is wrong
    assert list_checkpoints(root) == [older] and select_checkpoint(root) == older
    assert newest_valid_checkpoint(root) == older
    with pytest.raises(
        CheckpointError,
        match=rf"^{root}/step-0000004: holds no complete checkpoint \(no manifest\.json",
    ):
        select_checkpoint(f"{root}/step-0000004")
    with pytest.raises(CheckpointError, match=rf"^{root}/empty: holds no complete checkpoint"):
        select_checkpoint(f"{root}/empty")
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        publish_checkpoint(tmp_path / "nowhere", f"{root}/step-0000008")


def test_bytes_changed_on_the_server_are_skipped_for_the_older_intact_checkpoint(
    s3: object, tmp_path: Path, cache: Path
) -> None:
    run = s3.prefix("run")  # type: ignore[attr-defined]
    root = f"{run}/checkpoints"
    older, newer = published(tmp_path, root, 2), published(tmp_path, root, 4)
    weights = Location.of(newer) / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01  # same size: only the sha256 tells
    weights.write_bytes(bytes(data))
    assert list_checkpoints(root) == [older, newer]  # complete by sizes

    warnings: list[str] = []
    assert newest_valid_checkpoint(root, warnings.append) == older
    assert len(warnings) == 1 and "skipping step-0000004" in warnings[0]
    assert f"{newer}/model.safetensors: sha256 mismatch" in warnings[0]  # the URI, not the cache
    assert select_checkpoint(run, warn=warnings.append) == older
    with pytest.raises(CheckpointError, match="sha256 mismatch"):
        verify_checkpoint(newer)
    with pytest.raises(CheckpointError, match="sha256 mismatch"):
        load_checkpoint(newer)
    cached = {p.name for p in cache.rglob("step-*")}
    assert cached == {"step-0000002"}  # the corrupt copy was not kept


def test_a_corrupt_cached_copy_is_deleted_and_fetched_again(
    s3: object, tmp_path: Path, cache: Path
) -> None:
    uri = published(tmp_path, s3.prefix("ckpts"), 2)  # type: ignore[attr-defined]
    key = hashlib.sha256((Location.of(uri) / "manifest.json").read_bytes()).hexdigest()
    copy = local_copy(uri, key=key)  # as an earlier process left it in the cache
    weights = copy / "model.safetensors"
    intact = weights.read_bytes()
    weights.write_bytes(intact[:-1] + bytes([intact[-1] ^ 0x01]))
    with pytest.raises(CheckpointError, match=rf"^{uri}/model\.safetensors: sha256 mismatch"):
        fetch_checkpoint(uri)
    assert not copy.exists()  # not trusted again: the next use fetches it afresh
    assert fetch_checkpoint(uri) == copy and weights.read_bytes() == intact


def test_prune_keeps_the_newest_complete_ones_and_leaves_uploads_in_progress(
    s3: object, tmp_path: Path, cache: Path
) -> None:
    root = s3.prefix("ckpts")  # type: ignore[attr-defined]
    uris = [published(tmp_path, root, step) for step in (1, 2, 3, 4)]
    for step in (0, 9):  # another writer's uploads, older and newer than every complete one
        upload_without_manifest(saved(tmp_path, step), f"{root}/step-{step:07d}", tmp_path)
    assert prune_checkpoints(root, keep_last=2) == uris[:2]
    assert list_checkpoints(root) == uris[2:]
    assert Location.of(root).list() == [
        "step-0000000",
        "step-0000003",
        "step-0000004",
        "step-0000009",
    ]
    assert "model.safetensors" in Location.of(f"{root}/step-0000000").walk()
    with pytest.raises(ValueError, match="keep_last"):
        prune_checkpoints(root, keep_last=0)


def test_order_is_by_step_and_launch_picks_one_invocations_checkpoints(
    s3: object, tmp_path: Path, cache: Path
) -> None:
    root = s3.prefix("ckpts")  # type: ignore[attr-defined]
    later_step = published(tmp_path, root, 5, launch="first")
    earlier_step = published(tmp_path, root, 3, launch="second")  # written after, by the clock
    assert list_checkpoints(root) == [earlier_step, later_step]
    assert newest_valid_checkpoint(root) == later_step
    assert newest_valid_checkpoint(root, launch="second") == earlier_step
    assert newest_valid_checkpoint(root, launch="first") == later_step
    assert newest_valid_checkpoint(root, launch="third") is None
    assert read_manifest(later_step)["launch"] == "first"

    local_root = tmp_path / "local"  # the same rules on a local directory
    assert list_checkpoints(local_root) == [
        local_root / "step-0000003",
        local_root / "step-0000005",
    ]
    assert newest_valid_checkpoint(local_root, launch="second") == local_root / "step-0000003"


def test_export_from_a_uri_matches_export_from_the_local_checkpoint(
    s3: object, tmp_path: Path, cache: Path, tokenizer_file: Path
) -> None:
    local = saved(tmp_path, 2, tokenizer_file)
    uri = f"{s3.prefix('ckpts')}/step-0000002"  # type: ignore[attr-defined]
    publish_checkpoint(local, uri)
    here, there = export_hf(local, tmp_path / "hf-local"), export_hf(uri, tmp_path / "hf-remote")
    for name in ("model.safetensors", "config.json", "tokenizer.json"):
        assert (here / name).read_bytes() == (there / name).read_bytes()


def test_a_missing_bucket_is_one_line_naming_the_uri(s3: object, cache: Path) -> None:
    with pytest.raises((CheckpointError, StorageError), match=r"^s3://no-such-bucket/run: "):
        select_checkpoint("s3://no-such-bucket/run")
