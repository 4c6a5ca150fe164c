"""Prepared data on object storage, against the loopback SeaweedFS server (`s3` fixture):
`prepare(cfg, "s3://…")` uploads byte for byte what a local prepare writes, every manifest after
the shards it lists; every reader of a prepared data directory (the loader, `read_split`,
`data_view` / `cluster.tasks.data_paths`, the evaluation's split reader) reads it in place,
checking each shard's sha256; bad outputs are refused in one line before any work."""

from __future__ import annotations

import gzip
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest
import ray
import torch
from s3_testlib import S3Server

from data_pipeline import prepare as prepare_module
from data_pipeline.config import DataConfig
from data_pipeline.errors import DataDirError, DataError
from data_pipeline.loader import ShardLoader, make_loader
from data_pipeline.prepare import prepare
from data_pipeline.shards import read_manifest, read_split, sha256_file
from data_pipeline.storage import Location, StorageError

TINY = DataConfig(
    sample_docs=30,
    sample_pairs=300,
    sample_labelled=200,
    vocab_size=500,
    seq_len=32,
    validation_fraction=0.2,
    test_fraction=0.1,
    shard_rows=100,
    tasks=["clm", "classification"],
)

# the shared prepare runs Ray Data: with the e2e tests, not the fast unit run
pytestmark = pytest.mark.e2e


@dataclass
class Prepared:
    local: Path  # TINY prepared on local disk
    uri: str  # the same, prepared to the bucket
    uploads: list[str]  # the files of the remote prepare, in upload order
    messages: list[str]  # its progress lines
    cache: Path  # its KILN_CACHE


@pytest.fixture(scope="module")
def prepared(s3_server: S3Server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Prepared]:
    root = tmp_path_factory.mktemp("prepared")
    uri, uploads, messages = s3_server.prefix("prepared"), [], []
    original = Location._put

    def spy(self: Location, source: Path, dest: Location) -> None:
        uploads.append(dest.text.removeprefix(f"{uri}/"))
        original(self, source, dest)

    started = not ray.is_initialized()  # another module's Ray: use it, leave it running
    if started:
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        with pytest.MonkeyPatch.context() as mp:
            for key, value in s3_server.env().items():
                mp.setenv(key, value)
            mp.setenv("KILN_CACHE", str(root / "cache"))
            prepare(TINY, root / "local")
            mp.setattr(Location, "_put", spy)
            prepare(TINY, uri, progress=messages.append)
    finally:
        if started:
            ray.shutdown()
    yield Prepared(root / "local", uri, uploads, messages, root / "cache")


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh KILN_CACHE: what a test fetches is fetched by this test."""
    monkeypatch.setenv("KILN_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _files(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def _no_ray(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("Ray was started for a refused output")

    monkeypatch.setattr(prepare_module, "_quiet_ray_data", refuse)
    monkeypatch.setattr(ray, "init", refuse)


def _copy(prepared: Prepared, s3: S3Server, name: str) -> Location:
    """A copy of the prepared data at a fresh prefix, for a test that changes it."""
    copy = Location.of(s3.prefix(name))
    copy.upload(prepared.local)
    return copy


# ---------------------------------------------------------------- prepare --out s3://
def test_remote_prepare_uploads_the_local_files_byte_for_byte(
    prepared: Prepared, s3: S3Server
) -> None:
    remote = Location.of(prepared.uri)
    assert remote.walk() == _files(prepared.local)
    for name in remote.walk():
        if name.endswith(".json"):  # manifests and tokenizer: the very same bytes
            assert (remote / name).read_bytes() == (prepared.local / name).read_bytes(), name
    for task in TINY.tasks:
        manifest = read_manifest(prepared.local / task)
        assert read_manifest(f"{prepared.uri}/{task}") == manifest
        for split in manifest["splits"].values():
            for shard in split["shards"]:
                local = sha256_file(prepared.local / task / shard["file"])
                assert (remote / task / shard["file"]).sha256() == local == shard["sha256"]
    assert prepared.messages[-1].startswith(f"prepared clm, classification in {prepared.uri} [")
    assert not any((prepared.cache / "staging").iterdir())  # the staging directory is gone


def test_every_manifest_is_uploaded_after_the_files_it_lists(prepared: Prepared) -> None:
    uploads = prepared.uploads
    assert sorted(uploads) == _files(prepared.local)
    assert uploads[-1] == "manifest.json"
    for task in TINY.tasks:
        position = uploads.index(f"{task}/manifest.json")
        listed = read_manifest(prepared.local / task)["splits"].values()
        assert all(
            uploads.index(f"{task}/{s['file']}") < position for v in listed for s in v["shards"]
        )
    assert uploads.index("tokenizer.json") < uploads.index("manifest.json")


def test_prepare_to_a_missing_bucket_fails_in_one_line_before_any_work(
    s3: S3Server, cache: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from cluster.cli import main

    _no_ray(monkeypatch)
    uri = "s3://no-such-bucket/data"
    with pytest.raises(StorageError) as error:
        prepare(TINY, uri)
    assert str(error.value) == f"{uri}: the bucket 'no-such-bucket' does not exist"
    with pytest.raises(SystemExit) as stop:
        main(["data", "prepare", "data.sample_docs=30", "--out", uri])
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith(f"{uri}: the bucket 'no-such-bucket' does not exist") and "\n" not in err
    assert not cache.exists()  # no staging directory, nothing fetched


def test_a_failed_remote_prepare_uploads_nothing_and_removes_its_staging(
    s3: S3Server, cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _no_ray(monkeypatch)
    bad = tmp_path / "pairs.tsv"
    bad.write_text("one\tun\ntwo\n")
    cfg = DataConfig(source="parallel", paths=[str(bad)], tasks=["translation"])
    out = Location.of(s3.prefix("failed"))
    with pytest.raises(DataError, match=rf"^{re.escape(str(bad))}:2: expected 2 tab-separated"):
        prepare(cfg, out.text)
    assert out.walk() == [] and not any((cache / "staging").iterdir())


def test_prepare_to_a_non_empty_prefix_is_refused_and_leaves_it_alone(
    s3: S3Server, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _no_ray(monkeypatch)
    out = Location.of(s3.prefix("full"))
    (out / "old" / "keep.txt").write_text("keep me")
    message = f"{out}: output prefix exists and is not empty; choose a new one or remove it"
    with pytest.raises(DataError, match=f"^{re.escape(message)}$"):
        prepare(TINY, out.text)
    with pytest.raises(DataError, match=f"^{re.escape(message)}$"):
        prepare(TINY, f"{out}/")  # the same prefix, written with a trailing slash
    assert out.walk() == ["old/keep.txt"] and (out / "old" / "keep.txt").read_text() == "keep me"
    file = out / "old" / "keep.txt"  # an object where the prefix should be
    with pytest.raises(DataError, match=f"^{re.escape(str(file))}: output prefix exists"):
        prepare(TINY, file.text)
    assert file.is_file() and file.read_text() == "keep me"
    assert not cache.exists()  # refused before staging


# ---------------------------------------------------------------- reading data_dir=s3://
def _batches(loader: ShardLoader, limit: int | None = None) -> list[dict[str, torch.Tensor]]:
    out = []
    for batch in loader:
        out.append(batch)
        if len(out) == limit:
            break
    return out


def _same(a: list[dict[str, torch.Tensor]], b: list[dict[str, torch.Tensor]]) -> bool:
    return len(a) == len(b) and all(
        x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
        for x, y in zip(a, b, strict=True)
    )


@pytest.mark.parametrize("rank", [0, 1])
def test_the_loader_over_s3_serves_the_local_batches_and_resumes_mid_epoch(
    prepared: Prepared, s3: S3Server, rank: int
) -> None:
    def train(data_dir: str | Path) -> ShardLoader:
        return make_loader(data_dir, "clm", "train", 8, rank=rank, world_size=2, seed=7)

    expected = _batches(train(prepared.local))
    first = train(prepared.uri)
    head = _batches(first, limit=5)
    state = first.state_dict()
    resumed = train(prepared.uri)
    resumed.load_state_dict(state)
    assert len(expected) > 10 and _same(head + _batches(resumed), expected)
    assert state["data"] == train(prepared.local).state_dict()["data"]  # the same shards

    def validation(data_dir: str | Path) -> ShardLoader:
        return make_loader(
            data_dir, "clm", "validation", 8, rank, 2, seed=7, shuffle=False, drop_last=False
        )

    assert _same(_batches(validation(prepared.uri)), _batches(validation(prepared.local)))


def test_small_windows_over_s3_read_ahead_the_same_rows(prepared: Prepared, s3: S3Server) -> None:
    def loader(task_dir: str | Path, epoch: int) -> ShardLoader:
        collate = make_loader(prepared.local, "classification", "train", 4).collate
        shards = ShardLoader(task_dir, "train", 4, collate, seed=3, block_rows=16, window_blocks=2)
        shards.set_epoch(epoch)
        return shards

    for epoch in (0, 1):
        local = loader(prepared.local / "classification", epoch)
        remote = loader(f"{prepared.uri}/classification", epoch)
        assert _same(_batches(remote), _batches(local))
        assert remote.stats["windows_read"] == local.stats["windows_read"] > 2


def test_a_shard_changed_on_the_server_is_refused_naming_its_uri(
    prepared: Prepared, s3: S3Server
) -> None:
    copy = _copy(prepared, s3, "changed")
    train = prepared.local / "clm" / "train"
    # another valid shard in its place: only its sha256 tells them apart
    (copy / "clm" / "train" / "part-00000.parquet").write_bytes(
        (train / "part-00001.parquet").read_bytes()
    )
    message = (
        f"{copy}/clm/train/part-00000.parquet: sha256 does not match {copy}/clm/manifest.json; "
        "the shard changed or is corrupt"
    )
    with pytest.raises(DataError, match=f"^{re.escape(message)}$"):
        _batches(make_loader(copy.text, "clm", "train", 8))
    with pytest.raises(DataError, match=f"^{re.escape(message)}$"):
        read_split(f"{copy}/clm", "train")


def test_read_split_and_the_evaluation_read_a_remote_split_in_place(
    prepared: Prepared, s3: S3Server, cache: Path
) -> None:
    from cluster import evaluation

    local, remote = prepared.local / "classification", f"{prepared.uri}/classification"
    for split in ("train", "validation", "test"):
        assert read_split(remote, split).equals(read_split(local, split, verify=True))
        columns = ["input_ids", "label", "text"]
        assert evaluation.read_split(remote, split, columns) == evaluation.read_split(
            local, split, columns
        )
    with pytest.raises(DataDirError, match=rf"^{re.escape(remote)}/dev: no shards"):
        evaluation.read_split(remote, "dev", ["text"])
    assert not cache.exists()  # read in place: nothing copied


def test_evaluate_checkpoint_scores_an_s3_split_as_the_local_one(
    prepared: Prepared, s3: S3Server, cache: Path, tmp_path: Path
) -> None:
    from cluster.evaluation import evaluate_checkpoint
    from cluster.jobs import DecodeConfig
    from finetune.models.classifier import LSTMClassifier, LSTMClassifierConfig
    from pretrain.checkpoint import save_checkpoint

    top, task = read_manifest(prepared.local), read_manifest(prepared.local / "classification")
    config = LSTMClassifierConfig(
        preset="tiny",
        vocab_size=top["vocab_size"],
        pad_id=top["special_tokens"]["[PAD]"],
        num_labels=len(task["labels"]),
        label_names=task["labels"],
        embedding_dim=16,
        hidden_size=16,
    )
    torch.manual_seed(0)
    tokenizer = prepared.local / "tokenizer.json"
    checkpoint = save_checkpoint(tmp_path / "ckpt", LSTMClassifier(config), config, tokenizer)
    decode = DecodeConfig()
    remote = evaluate_checkpoint(checkpoint, prepared.uri, "test", decode, tmp_path / "remote")
    local = evaluate_checkpoint(checkpoint, prepared.local, "test", decode, tmp_path / "local")
    assert remote == local and remote["examples"] == task["splits"]["test"]["rows"]
    for name in ("metrics.json", "predictions.jsonl"):
        assert (tmp_path / "remote" / name).read_bytes() == (tmp_path / "local" / name).read_bytes()


def test_data_paths_of_an_s3_data_dir(prepared: Prepared, s3: S3Server, cache: Path) -> None:
    from cluster.tasks import check_prepared_data, data_paths

    task_dir, tokenizer, manifest = data_paths(prepared.uri, "clm")
    assert task_dir == f"{prepared.uri}/clm"  # the loader streams its shards from the bucket
    assert tokenizer.is_relative_to(cache)
    assert tokenizer.read_bytes() == (prepared.local / "tokenizer.json").read_bytes()
    assert manifest == read_manifest(prepared.local)
    assert data_paths(prepared.local, "clm") == (prepared.local / "clm", *_local_rest(prepared))
    assert data_paths(prepared.uri, "clm")[1] == tokenizer  # fetched once per manifest version
    job = SimpleNamespace(
        data_dir=prepared.uri,
        task="clm",
        cluster=SimpleNamespace(num_workers=2),
        trainer=SimpleNamespace(batch_size=8),
    )
    check_prepared_data(job, manifest)  # type: ignore[arg-type]
    with pytest.raises(DataDirError, match=rf"^{re.escape(prepared.uri)}: has no 'mlm_nsp'"):
        data_paths(prepared.uri, "mlm_nsp")
    absent = s3.prefix("absent")
    with pytest.raises(DataDirError, match=rf"^{re.escape(absent)}/manifest.json: no manifest"):
        data_paths(absent, "clm")


def _local_rest(prepared: Prepared) -> tuple[Path, dict]:
    return prepared.local / "tokenizer.json", read_manifest(prepared.local)


def test_a_changed_tokenizer_or_missing_shard_is_named_before_training(
    prepared: Prepared, s3: S3Server, cache: Path
) -> None:
    from cluster.tasks import check_prepared_data, data_paths

    copy = _copy(prepared, s3, "tokenizer")
    (copy / "tokenizer.json").write_text('{"changed": true}')
    with pytest.raises(
        DataError, match=rf"^{re.escape(str(copy))}/tokenizer.json: sha256 does not"
    ):
        data_paths(copy.text, "clm")
    copy = _copy(prepared, s3, "shard")
    (copy / "clm" / "validation" / "part-00001.parquet").delete()
    job = SimpleNamespace(
        data_dir=copy.text,
        task="clm",
        cluster=SimpleNamespace(num_workers=1),
        trainer=SimpleNamespace(batch_size=8),
    )
    missing = (
        f"{copy}/clm/validation/part-00001.parquet: missing (listed in {copy}/clm/manifest.json)"
    )
    with pytest.raises(DataDirError, match=f"^{re.escape(missing)}$"):
        check_prepared_data(job, data_paths(copy.text, "clm")[2])  # type: ignore[arg-type]


# ---------------------------------------------------------------- inputs (paths) given as URIs
def test_inputs_from_s3_globs_prefixes_and_gz_prepare_as_the_same_local_files(
    s3: S3Server, cache: Path, tmp_path: Path
) -> None:
    docs = [
        "\n".join(f"line {i} of document {d}, with some words" for i in range(6)) for d in range(40)
    ]
    local = tmp_path / "raw"
    write_text = {"a.txt": "\n\n".join(docs[:20]), "sub/b.txt.gz": "\n\n".join(docs[20:])}
    remote = Location.of(s3.prefix("raw"))
    for name, text in write_text.items():
        data = gzip.compress(text.encode(), mtime=0) if name.endswith(".gz") else text.encode()
        (local / name).parent.mkdir(parents=True, exist_ok=True)
        (local / name).write_bytes(data)
        (remote / name).write_bytes(data)
    settings = {"source": "text", "text_unit": "block", "tasks": ["clm"], "seq_len": 16}
    settings |= {"vocab_size": 300, "validation_fraction": 0.2}
    started = not ray.is_initialized()
    if started:
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        mine = prepare(
            DataConfig(**settings, paths=[f"{local}/*.txt", str(local / "sub")]), tmp_path / "l"
        )
        theirs = prepare(
            DataConfig(**settings, paths=[f"{remote}/*.txt", f"{remote}/sub"]), tmp_path / "r"
        )
    finally:
        if started:
            ray.shutdown()
    assert [f["path"] for f in theirs["inputs"]["files"]] == [
        f"{remote}/a.txt",
        f"{remote}/sub/b.txt.gz",
    ]
    strip = [{k: v for k, v in f.items() if k != "path"} for f in mine["inputs"]["files"]]
    assert [{k: v for k, v in f.items() if k != "path"} for f in theirs["inputs"]["files"]] == strip
    for split in ("train", "validation"):  # documents get no test split
        ours = read_split(tmp_path / "l" / "clm", split)
        assert read_split(tmp_path / "r" / "clm", split).column("input_ids") == ours.column(
            "input_ids"
        )


def test_a_remote_input_that_is_not_there_is_one_line_before_ray(
    s3: S3Server, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    _no_ray(monkeypatch)
    base = s3.prefix("nothing")
    for paths, message in (
        ([f"{base}/*.txt"], f"{base}/*.txt: no file matches this pattern (paths)"),
        ([f"{base}/a.txt"], f"{base}/a.txt: no such object (paths)"),
        (
            ["s3://no-such-bucket/a.txt"],
            "s3://no-such-bucket/a.txt: the bucket 'no-such-bucket' does not exist",
        ),
    ):
        with pytest.raises(DataError, match=f"^{re.escape(message)}$"):
            prepare(DataConfig(source="text", paths=paths, tasks=["clm"]), tmp_path / "out")
        assert not (tmp_path / "out").exists()
