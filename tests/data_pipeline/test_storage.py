"""data_pipeline/storage.py on a local directory and on the loopback SeaweedFS S3 server."""

from __future__ import annotations

from pathlib import Path

import pytest
from s3_testlib import BUCKET, S3Server

from data_pipeline.storage import (
    Location,
    StorageError,
    check_readable,
    check_writable,
    expand_uri,
    local_copy,
)


@pytest.fixture(params=["local", "s3"])
def root(request: pytest.FixtureRequest, tmp_path: Path) -> Location:
    if request.param == "local":
        return Location.of(tmp_path / "store")
    s3 = request.getfixturevalue("s3")
    return Location.of(s3.prefix("storage"))


def test_files_round_trip_list_walk_and_delete(root: Location) -> None:
    (root / "a.txt").write_text("alpha")
    (root / "sub" / "b.bin").write_bytes(b"\x00\x01")
    assert (root / "a.txt").read_text() == "alpha"
    assert (root / "sub" / "b.bin").read_bytes() == b"\x00\x01"
    assert root.list() == ["a.txt", "sub"]
    assert root.walk() == ["a.txt", "sub/b.bin"]
    assert (root / "a.txt").is_file() and root.is_dir() and (root / "sub").is_dir()
    assert not (root / "missing").exists() and (root / "missing").list() == []
    (root / "sub").delete()
    assert root.walk() == ["a.txt"]
    root.delete()
    assert not root.exists() or root.walk() == []


def test_upload_puts_the_named_files_last(root: Location, tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "nested").mkdir(parents=True)
    for name in ("manifest.json", "z.bin", "nested/w.bin", "a.bin"):
        (src / name).write_text(name)
    order: list[str] = []
    original = Location._put

    def spy(self: Location, source: Path, dest: Location) -> None:
        order.append(source.relative_to(src).as_posix())
        original(self, source, dest)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Location, "_put", spy)
        (root / "ckpt").upload(src, last=("manifest.json",))
    assert order[-1] == "manifest.json" and sorted(order) == sorted(
        ["manifest.json", "z.bin", "nested/w.bin", "a.bin"]
    )
    assert (root / "ckpt").walk() == ["a.bin", "manifest.json", "nested/w.bin", "z.bin"]
    back = tmp_path / "back"
    (root / "ckpt").download(back)
    assert (back / "nested" / "w.bin").read_text() == "nested/w.bin"


def test_local_copy_fetches_a_remote_tree_once_per_key(
    s3: S3Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KILN_CACHE", str(tmp_path / "cache"))
    remote = Location.of(s3.prefix("copy"))
    (remote / "x" / "f.txt").write_text("one")
    first = local_copy(remote / "x", key="v1")
    assert (first / "f.txt").read_text() == "one" and str(tmp_path / "cache") in str(first)
    (remote / "x" / "f.txt").write_text("two")
    assert (local_copy(remote / "x", key="v1") / "f.txt").read_text() == "one"  # cached
    assert (local_copy(remote / "x", key="v2") / "f.txt").read_text() == "two"
    assert local_copy(remote / "x" / "f.txt", key="v2").read_text() == "two"
    assert local_copy(tmp_path) == tmp_path  # a local path is used in place


def test_missing_bucket_wrong_keys_and_dead_endpoint_are_one_line_errors(
    s3: S3Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(StorageError, match=r"^s3://no-such-bucket/x: the bucket 'no-such-bucket'"):
        check_writable("s3://no-such-bucket/x")
    with pytest.raises(StorageError, match=r"^s3://kiln/absent-\w+: does not exist"):
        check_readable(f"s3://{BUCKET}/absent-{s3.port}")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    with pytest.raises(StorageError, match=r"access denied: check AWS_ACCESS_KEY_ID"):
        check_writable(f"s3://{BUCKET}/x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3.env()["AWS_SECRET_ACCESS_KEY"])
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    with pytest.raises(StorageError, match=r"endpoint does not answer \(http://127.0.0.1:9"):
        Location.of(f"s3://{BUCKET}/x").read_text()


def test_unknown_scheme_and_bucketless_uri_name_the_uri() -> None:
    with pytest.raises(StorageError, match=r"^nosuch://b/x: cannot open this location"):
        Location.of("nosuch://b/x").exists()
    with pytest.raises(StorageError, match=r"^s3:///x: no bucket"):
        Location.of("s3:///x").exists()


def test_paths_and_names() -> None:
    loc = Location.of("s3://b/runs/gpt/")
    assert str(loc) == "s3://b/runs/gpt" and loc.name == "gpt" and str(loc.parent) == "s3://b/runs"
    assert str(loc / "checkpoints" / "step-4") == "s3://b/runs/gpt/checkpoints/step-4"
    assert loc.is_remote and not Location.of("file:///tmp/x").is_remote
    assert Location.of("file:///tmp/x").local_path == Path("/tmp/x")
    with pytest.raises(StorageError, match="a remote location"):
        loc.local_path  # noqa: B018


# ------------------------------------------------------------------- data inputs given as URIs
def test_expand_uri_names_a_file_a_prefix_and_globs_as_glob_does(s3: S3Server) -> None:
    root = Location.of(s3.prefix("inputs"))
    for name in ("a.txt", "b.txt.gz", ".hidden.txt", "sub/c.txt", "sub/deep/d.txt", "sub/e.tsv"):
        (root / name).write_bytes(b"x\n")
    base = root.text
    assert expand_uri(f"{base}/a.txt") == [f"{base}/a.txt"]
    assert expand_uri(f"{base}/sub") == [
        f"{base}/sub/c.txt",
        f"{base}/sub/deep/d.txt",
        f"{base}/sub/e.tsv",
    ]
    assert expand_uri(f"{base}/*.txt") == [f"{base}/a.txt"]  # no hidden name, no sub-directory
    assert expand_uri(f"{base}/.*.txt") == [f"{base}/.hidden.txt"]
    assert expand_uri(f"{base}/*/*.txt") == [f"{base}/sub/c.txt"]
    assert expand_uri(f"{base}/**/*.txt") == [
        f"{base}/a.txt",
        f"{base}/sub/c.txt",
        f"{base}/sub/deep/d.txt",
    ]
    assert expand_uri(f"{base}/[ab].txt*") == [f"{base}/a.txt", f"{base}/b.txt.gz"]
    assert expand_uri(f"{base}/none*") == [] and expand_uri(f"{base}/missing") == []


def test_readers_stream_remote_text_gzip_and_parquet_as_local_files(
    s3: S3Server, tmp_path: Path
) -> None:
    import gzip

    import pyarrow as pa
    import pyarrow.parquet as pq

    from data_pipeline.errors import DataError
    from data_pipeline.readers import iter_lines, records

    root = Location.of(s3.prefix("readers"))
    text = "\ufeffÉté\r\n\r\nhiver\n" + "".join(f"line {i}\n" for i in range(20_000))
    (root / "a.txt").write_text(text)
    packed = gzip.compress(text.encode())
    (root / "a.txt.gz").write_bytes(packed)  # stored and read back as is: pyarrow's own
    assert (root / "a.txt.gz").read_bytes() == packed  # .gz detection would (de)compress it
    assert (root / "a.txt.gz").size() == len(packed)
    (root / "packed.txt").write_bytes(gzip.compress(b"x\n"))
    pq.write_table(pa.table({"s": ["un", "deux"], "t": ["one", "two"]}), tmp_path / "p.parquet")
    (root / "p.parquet").write_bytes((tmp_path / "p.parquet").read_bytes())
    (tmp_path / "a.txt").write_text(text)
    local = list(iter_lines(str(tmp_path / "a.txt")))
    assert list(iter_lines(f"{root}/a.txt")) == local == list(iter_lines(f"{root}/a.txt.gz"))
    assert list(records(f"{root}/p.parquet", "parquet", {"src": "s", "tgt": "t"})) == [
        (1, ["un", "one"], 0),
        (2, ["deux", "two"], 0),
    ]
    with pytest.raises(DataError, match=rf"^{root}/packed.txt:1: gzip-compressed data but"):
        list(iter_lines(f"{root}/packed.txt"))
    with pytest.raises(DataError, match=rf"^{root}/gone.txt: cannot read"):
        list(iter_lines(f"{root}/gone.txt"))
