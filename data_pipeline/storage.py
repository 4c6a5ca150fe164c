"""Where Kiln reads and writes: one layer over `pyarrow.fs` (what Ray Train uses) for local paths and URIs.

A location is a local path (`runs/gpt`, `/data/x`) or a URI (`s3://bucket/runs/gpt`, `gs://…`, `hdfs://…`,
`file:///abs`). `Location` names one and does what Kiln needs with it: read and write whole files, list,
delete, copy a directory tree in or out (with chosen files last: a manifest is written after what it
describes, since object stores have no atomic rename), and keep a verified local copy of a remote one
(`local_copy`), which is how checkpoints, tokenizers and recipes given as URIs are loaded.

S3 is configured the standard way and only from the environment: `AWS_ENDPOINT_URL` (or
`AWS_ENDPOINT_URL_S3`) for an S3-compatible server, `AWS_REGION`/`AWS_DEFAULT_REGION`, credentials from
`AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY` or a profile. Nothing here writes them anywhere.

Errors are `StorageError`s (a `DataError`: the CLI prints one line naming the URI, exit 2): unknown scheme,
missing bucket, refused credentials, an endpoint that does not answer.
"""

from __future__ import annotations

import fnmatch
import functools
import hashlib
import io
import os
import shutil
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import IO
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.fs as pafs

from data_pipeline.errors import DataError

# Where remote files are kept for local use (checkpoints, tokenizers); KILN_CACHE moves it.
CACHE_ENV = "KILN_CACHE"


class StorageError(DataError):
    """A location that cannot be used: its message is one line that names the URI and why."""


def _text(location: str | os.PathLike[str] | Location) -> str:
    return location.text if isinstance(location, Location) else os.fspath(location)


def is_uri(location: str | os.PathLike[str]) -> bool:
    text = _text(location)
    scheme = urlparse(text).scheme
    return "://" in text and len(scheme) > 1  # `C:\\x` is a Windows path, not a URI


def is_remote(location: str | os.PathLike[str]) -> bool:
    """A location that is not on this machine's filesystem (`file://` is local)."""
    return is_uri(location) and urlparse(_text(location)).scheme != "file"


def endpoint() -> str | None:
    """The S3-compatible endpoint the environment names, if any."""
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


# The AWS SDK reads credentials when a filesystem is made: one per distinct environment.
_CREDENTIAL_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE")


@functools.lru_cache(maxsize=8)
def _s3(endpoint_url: str | None, region: str | None, _credentials: int) -> pafs.FileSystem:
    kwargs: dict = {"connect_timeout": 5, "request_timeout": 60}
    if endpoint_url:
        parsed = urlparse(endpoint_url)
        kwargs["endpoint_override"] = parsed.netloc or parsed.path
        kwargs["scheme"] = parsed.scheme or "https"
    if region:
        kwargs["region"] = region
    return pafs.S3FileSystem(**kwargs)


def resolve(location: str | os.PathLike[str]) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem and the path within it of a local path or a URI."""
    text = _text(location)
    if not is_uri(text):
        return pafs.LocalFileSystem(), os.path.abspath(text)
    parsed = urlparse(text)
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise StorageError(f"{text}: no bucket in this URI (expected s3://bucket/prefix)")
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        credentials = hash(tuple(os.environ.get(k) for k in _CREDENTIAL_ENV))
        return _s3(endpoint(), region, credentials), f"{parsed.netloc}{parsed.path}".rstrip("/")
    try:
        fs, path = pafs.FileSystem.from_uri(text)
    except (pa.ArrowException, ValueError, OSError) as e:
        raise StorageError(f"{text}: cannot open this location ({_first_line(e)})") from None
    return fs, path.rstrip("/") or path


def _first_line(e: BaseException) -> str:
    return (str(e).splitlines() or [type(e).__name__])[0]


def explain(location: str, e: BaseException) -> StorageError:
    """One line for a storage failure: what was tried, on which URI, and the likely cause."""
    text = str(e)
    if (
        "ACCESS_DENIED" in text
        or "SIGNATURE_DOES_NOT_MATCH" in text
        or "InvalidAccessKeyId" in text
    ):
        why = "access denied: check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or the profile)"
    elif "NO_SUCH_BUCKET" in text or "bucket does not exist" in text.lower():
        why = f"the bucket {urlparse(location).netloc!r} does not exist"
    elif "NETWORK_CONNECTION" in text or "Could not connect" in text or "resolve host" in text:
        where = endpoint() or "the default AWS endpoint"
        why = f"the storage endpoint does not answer ({where}; set AWS_ENDPOINT_URL for another)"
    else:
        why = _first_line(e)
    return StorageError(f"{location}: {why}")


@dataclass(frozen=True)
class Location:
    """A file or directory, local or remote; `str()` gives it back as the user wrote it (joined)."""

    text: str

    @classmethod
    def of(cls, location: str | os.PathLike[str] | Location) -> Location:
        if isinstance(location, Location):
            return location
        text = os.fspath(location)
        return cls(text.rstrip("/") if is_uri(text) and text.count("/") > 3 else text)

    def __str__(self) -> str:
        return self.text

    def __fspath__(self) -> str:  # lets a local Location go wherever a path goes
        if self.is_remote:
            raise StorageError(f"{self.text}: a remote location, not a local path")
        return self.local_path.as_posix()

    def __truediv__(self, name: str) -> Location:
        if is_uri(self.text):
            return Location(f"{self.text.rstrip('/')}/{name}")
        return Location(os.path.join(self.text, name))

    @property
    def is_remote(self) -> bool:
        return is_remote(self.text)

    @property
    def local_path(self) -> Path:
        """This location as a local path (`file://` URIs included); remote ones raise."""
        if self.is_remote:
            raise StorageError(f"{self.text}: a remote location, not a local path")
        return Path(resolve(self.text)[1] if is_uri(self.text) else self.text)

    @property
    def name(self) -> str:
        return self.text.rstrip("/").rsplit("/", 1)[-1]

    @property
    def parent(self) -> Location:
        if is_uri(self.text):
            return Location(self.text.rstrip("/").rsplit("/", 1)[0])
        return Location(str(Path(self.text).parent))

    # ------------------------------------------------------------------------------ inspection
    def _fs(self) -> tuple[pafs.FileSystem, str]:
        return resolve(self.text)

    def _info(self) -> pafs.FileInfo:
        fs, path = self._fs()
        try:
            return fs.get_file_info(path)
        except (OSError, pa.ArrowException) as e:
            raise explain(self.text, e) from None

    def exists(self) -> bool:
        return self._info().type != pafs.FileType.NotFound

    def is_file(self) -> bool:
        return self._info().type == pafs.FileType.File

    def is_dir(self) -> bool:
        """A directory, or on an object store a prefix that holds objects (or a bucket)."""
        if self._info().type == pafs.FileType.Directory:
            return True
        return self.is_remote and bool(self.list())

    def size(self) -> int:
        return int(self._info().size or 0)

    def list(self) -> list[str]:
        """Names of the entries directly under this directory, sorted ([] if there is none)."""
        fs, path = self._fs()
        try:
            infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
        except (OSError, pa.ArrowException) as e:
            raise explain(self.text, e) from None
        return sorted(info.base_name for info in infos)

    def walk(self) -> list[str]:
        """Paths of every file below this directory, relative to it, sorted."""
        fs, path = self._fs()
        try:
            infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
        except (OSError, pa.ArrowException) as e:
            raise explain(self.text, e) from None
        root = path.rstrip("/") + "/"
        return sorted(info.path[len(root) :] for info in infos if info.type == pafs.FileType.File)

    # ---------------------------------------------------------------------------- whole files
    def read_bytes(self) -> bytes:
        fs, path = self._fs()
        try:
            with fs.open_input_stream(path, compression=None) as f:
                return f.read()
        except FileNotFoundError:
            raise StorageError(f"{self.text}: no such file") from None
        except (OSError, pa.ArrowException) as e:
            raise explain(self.text, e) from None

    def read_text(self) -> str:
        return self.read_bytes().decode("utf-8")

    def write_bytes(self, data: bytes) -> None:
        """Replace the file whole: a local one through a temporary file and a rename, an object by
        one PUT (object stores never show a half-written object)."""
        if not self.is_remote:
            path = self.local_path
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
            tmp.write_bytes(data)
            os.replace(tmp, path)
            return
        fs, path = self._fs()
        try:
            with fs.open_output_stream(path, compression=None) as f:
                f.write(data)
        except (OSError, pa.ArrowException) as e:
            raise explain(self.text, e) from None

    def write_text(self, text: str) -> None:
        self.write_bytes(text.encode("utf-8"))

    def delete(self) -> None:
        """Remove this file or this directory and everything below it; absent is fine."""
        fs, path = self._fs()
        try:
            info = fs.get_file_info(path)
            if info.type == pafs.FileType.File:
                fs.delete_file(path)
            elif info.type == pafs.FileType.Directory or self.is_remote:
                fs.delete_dir_contents(path, missing_dir_ok=True)
                if fs.get_file_info(path).type != pafs.FileType.NotFound:
                    fs.delete_dir(path)
        except FileNotFoundError:
            return
        except (OSError, pa.ArrowException) as e:
            raise explain(self.text, e) from None

    # ------------------------------------------------------------------------- directory trees
    def upload(self, local_dir: Path, last: Iterable[str] = ()) -> None:
        """Copy the files under `local_dir` to this location; the relative paths in `last` go after
        every other file, in that order (a manifest after the files it lists)."""
        files = sorted(
            p.relative_to(local_dir).as_posix() for p in local_dir.rglob("*") if p.is_file()
        )
        late = [name for name in last if name in files]
        for name in [f for f in files if f not in late] + late:
            self._put(local_dir / name, self / name)

    def _put(self, source: Path, dest: Location) -> None:
        fs, path = dest._fs()
        try:
            if not dest.is_remote:
                Path(path).parent.mkdir(parents=True, exist_ok=True)
            pafs.copy_files(
                source.as_posix(),
                path,
                source_filesystem=pafs.LocalFileSystem(),
                destination_filesystem=fs,
            )
        except (OSError, pa.ArrowException) as e:
            raise explain(dest.text, e) from None

    def download(self, local_dir: Path) -> None:
        """Copy every file under this location into `local_dir` (created)."""
        local_dir.mkdir(parents=True, exist_ok=True)
        for name in self.walk():
            (self / name).fetch(local_dir / name)

    def fetch(self, target: Path) -> None:
        """Copy this file to the local path `target` (its directory created)."""
        target.parent.mkdir(parents=True, exist_ok=True)
        fs, path = self._fs()
        try:
            pafs.copy_files(
                path,
                target.as_posix(),
                source_filesystem=fs,
                destination_filesystem=pafs.LocalFileSystem(),
            )
        except FileNotFoundError:
            raise StorageError(f"{self.text}: no such file") from None
        except (OSError, pa.ArrowException) as e:
            raise explain(self.text, e) from None

    def sha256(self) -> str:
        digest = hashlib.sha256()
        fs, path = self._fs()
        try:
            with fs.open_input_stream(path, compression=None) as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    digest.update(chunk)
        except (OSError, pa.ArrowException) as e:
            raise explain(self.text, e) from None
        return digest.hexdigest()


def open_input(location: str | os.PathLike[str] | Location) -> IO[bytes]:
    """A file's bytes as a buffered, line-iterable stream, read as they come (nothing is
    decompressed: a `.gz` name is the reader's business); a missing file is a FileNotFoundError."""
    loc = Location.of(location)
    if not loc.is_remote:
        return open(loc.local_path, "rb")
    fs, path = loc._fs()
    try:
        return io.BufferedReader(fs.open_input_stream(path, compression=None), 1 << 20)
    except FileNotFoundError:
        raise
    except (OSError, pa.ArrowException) as e:
        raise explain(loc.text, e) from None


GLOB_CHARS = frozenset("*?[")


def expand_uri(pattern: str) -> list[str]:
    """The files a URI names, as URIs, sorted: itself (a file), every file below it (a prefix; names
    starting with "." left out, as for a local directory) or those matching it (a glob: `*`, `?` and
    `[...]` within one path component, `**` across any number of them, hidden names only when the
    pattern spells the dot, as `glob.glob` does). [] when nothing is there."""
    if GLOB_CHARS & set(pattern):
        parts = pattern.split("/")
        fixed = next(i for i, part in enumerate(parts) if GLOB_CHARS & set(part))
        base = "/".join(parts[:fixed])
        found = Location.of(base).walk() if "://" in base else []
        return [f"{base}/{name}" for name in found if _glob_match(name.split("/"), parts[fixed:])]
    loc = Location.of(pattern)
    if loc.is_file():
        return [loc.text]
    names = loc.walk()
    return [str(loc / name) for name in names if not name.rsplit("/", 1)[-1].startswith(".")]


def _glob_match(parts: list[str], patterns: list[str]) -> bool:
    if not patterns:
        return not parts
    if patterns[0] == "**":
        return any(_glob_match(parts[i:], patterns[1:]) for i in range(len(parts) + 1))
    if not parts or not fnmatch.fnmatchcase(parts[0], patterns[0]):
        return False
    hidden = parts[0].startswith(".") and not patterns[0].startswith(".")
    return not hidden and _glob_match(parts[1:], patterns[1:])


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "kiln")


def local_copy(location: str | os.PathLike[str] | Location, key: str = "") -> Path:
    """A local path holding `location`: itself when local; else a copy under the cache (a file or a
    whole directory tree), fetched once per `key` (e.g. the manifest's sha256, so a changed remote is
    fetched again) into a temporary directory and renamed into place, so a reader never sees half."""
    loc = Location.of(location)
    if not loc.is_remote:
        return loc.local_path
    digest = hashlib.sha256(f"{loc.text}\n{key}".encode()).hexdigest()[:20]
    target = cache_root() / "remote" / digest / loc.name
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".fetch-", dir=target.parent))
    try:
        if loc.is_file():
            loc.fetch(tmp / loc.name)
        else:
            loc.download(tmp / loc.name)
        try:
            os.replace(tmp / loc.name, target)
        except OSError:  # another process fetched it first
            if not target.exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def check_readable(location: str | os.PathLike[str] | Location, what: str = "") -> Location:
    """Fail fast, with one line, when `location` cannot be read (missing, bucket, credentials,
    endpoint); returns it as a Location."""
    loc = Location.of(location)
    if not loc.exists() and not (loc.is_remote and loc.list()):
        thing = f" ({what})" if what else ""
        raise StorageError(f"{loc}: does not exist{thing}")
    return loc


def check_bucket(location: str | os.PathLike[str] | Location) -> None:
    """A remote location's bucket (its first path component) exists, or a one-line StorageError:
    an object store answers "not found" alike for a missing key and a missing bucket."""
    loc = Location.of(location)
    if not loc.is_remote:
        return
    fs, path = loc._fs()
    bucket = path.split("/", 1)[0]
    try:
        if fs.get_file_info(bucket).type == pafs.FileType.NotFound:
            raise StorageError(f"{loc}: the bucket {bucket!r} does not exist")
    except (OSError, pa.ArrowException) as e:
        raise explain(loc.text, e) from None


def check_writable(location: str | os.PathLike[str] | Location) -> Location:
    """Fail fast when an output location's bucket is missing or the credentials are refused: a
    remote location's bucket is checked and a probe object written and deleted."""
    loc = Location.of(location)
    if not loc.is_remote:
        return loc
    if loc.is_file():  # a probe below an object would turn it into a "directory" (SeaweedFS)
        raise StorageError(f"{loc}: an object, not a prefix; choose another location")
    check_bucket(loc)
    probe = loc / f".kiln-probe-{os.getpid()}"
    probe.write_bytes(b"")
    probe.delete()
    return loc
