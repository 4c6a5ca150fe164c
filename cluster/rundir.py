"""A run's output directory (`--out`): a local path or a URI; a new run never mixes its files into an old run's.

`RunDir` owns the layout. On a local `--out` it is that directory. On a remote one (`s3://…`, where no two
nodes share a directory) every process works in its own scratch directory under the Kiln cache
(`$KILN_CACHE/runs/<hash of the URI>/<role>`) and `RunDir` moves files between it and the URI: checkpoints
(rank 0, manifest last: cluster.callbacks), the summary and the stop request (read and written on the URI
itself), metrics, plots, logs and the W&B offline run (uploaded when written). A `RunDir` is os.PathLike:
`run / "metrics.csv"` is the file in the working directory, `run.location("metrics.csv")` the one in `--out`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from data_pipeline.configlib import ConfigError
from data_pipeline.storage import Location, cache_root, check_writable

MARKER = ".kiln-run"
CHECKPOINTS = "checkpoints"  # one directory per checkpoint: step-NNNNNNN/
SUMMARY = "train_summary.json"  # rank 0 → driver: the final checkpoint, steps, preemption
STOP = "STOP"  # driver → rank 0: checkpoint now and stop (cluster.preemption)
RUN_ID = "wandb/run_id"  # the W&B run every rank and every retry logs to


class RunDir(os.PathLike):
    """One run's outputs: `out` (where they live) and `local` (where this process writes them first)."""

    def __init__(self, out: str | os.PathLike[str], role: str = "driver") -> None:
        self.out = Location.of(out)
        if self.out.is_remote:
            digest = hashlib.sha256(self.out.text.encode()).hexdigest()[:16]
            self.local = cache_root() / "runs" / digest / role
        else:
            self.local = self.out.local_path.resolve()
            self.out = Location(str(self.local))

    @property
    def remote(self) -> bool:
        return self.out.is_remote

    def __fspath__(self) -> str:
        return str(self.local)

    def __truediv__(self, name: str) -> Path:
        return self.local / name

    def __str__(self) -> str:
        return str(self.out)

    def __repr__(self) -> str:
        return f"RunDir({self.out.text!r}, local={str(self.local)!r})"

    def location(self, name: str) -> Location:
        return self.out / name

    @property
    def checkpoints(self) -> Location:
        return self.out / CHECKPOINTS

    def fresh_scratch(self) -> None:
        """An empty working directory (remote runs: what an earlier process left there is stale)."""
        if self.remote:
            shutil.rmtree(self.local, ignore_errors=True)
        self.local.mkdir(parents=True, exist_ok=True)

    def publish(self, *names: str) -> None:
        """Upload these files or directories of the working directory to `out` (remote runs only)."""
        if not self.remote:
            return
        for name in names:
            source = self.local / name
            if source.is_dir():
                self.location(name).upload(source)
            elif source.is_file():
                self.location(name).write_bytes(source.read_bytes())

    def fetch(self, name: str) -> bool:
        """Download one file of `out` into the working directory (remote runs); whether it exists."""
        if not self.remote:
            return (self.local / name).is_file()
        loc = self.location(name)
        if not loc.is_file():
            return False
        loc.fetch(self.local / name)
        return True

    def read_json(self, name: str) -> Any:
        return json.loads(self.location(name).read_text())

    def write_json(self, name: str, obj: Any) -> None:
        self.location(name).write_text(json.dumps(obj, indent=2))


def out_location(out: str | os.PathLike[str]) -> Location:
    """Where a run's outputs live: a RunDir's `out`, or a path or URI as given."""
    return out.out if isinstance(out, RunDir) else Location.of(out)


def user_error_types() -> tuple[type[BaseException], ...]:
    """The errors that mean "the input is wrong" (the CLI prints them as one line, exit 2)."""
    from data_pipeline.errors import DataError
    from pretrain.checkpoint import CheckpointError

    return ConfigError, DataError, CheckpointError


@contextmanager
def run_dir(
    out: str | os.PathLike[str],
    resume: str = "never",
    overwrite: bool = False,
    rerun: str | None = None,
) -> Iterator[RunDir]:
    """The output directory of one run (see `prepare_run_dir`; with resume="auto" an earlier Kiln
    run's is continued). When the run fails on bad input before it wrote a checkpoint, what this
    command created is removed again, so a corrected rerun can use the same --out; a directory that
    was there before is kept."""
    # Here, not at the top: cluster.resume reads checkpoints (torch), and the CLI imports this module
    # before it has validated a config.
    from cluster.resume import continues_run, has_checkpoint

    run = RunDir(out)
    # read-only first (a missing bucket, refused keys, a dead endpoint already fail here, in one line)
    created, was_empty = not run.out.exists(), _is_empty(run.out)
    if continues_run(run, resume):
        created = was_empty = False  # a run being continued: none of its files are this command's
    else:
        prepare_run_dir(run.out, overwrite, rerun)
    if run.remote:
        check_writable(run.out)  # and writable, before any work
    run.fresh_scratch()
    try:
        yield run
    except user_error_types():
        if (created or was_empty) and not has_checkpoint(run):
            _remove_made(run.out, keep_dir=not created)
        raise


def _is_empty(out: Location) -> bool:
    if out.is_remote:
        return not out.list()
    return out.local_path.is_dir() and not any(out.local_path.iterdir())


def _remove_made(out: Location, keep_dir: bool) -> None:
    if out.is_remote:
        out.delete()  # a prefix: "keeping the directory" has no meaning on an object store
        return
    path = out.local_path
    if not keep_dir:
        shutil.rmtree(path, ignore_errors=True)
        return
    for child in path.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child, ignore_errors=True)
        else:
            child.unlink(missing_ok=True)


def prepare_run_dir(
    out: str | os.PathLike[str] | Location, overwrite: bool = False, rerun: str | None = None
) -> Path:
    """Create `out` (absent or empty), or with `overwrite` replace a directory that an earlier Kiln run made.

    A non-empty directory Kiln did not make is never deleted, overwrite or not. Returns the local path
    (for a URI: the prefix, which holds only the run marker afterwards, and its local path is not
    meaningful: callers of a remote run use RunDir)."""
    loc = Location.of(out)
    replace = check_run_dir(loc, overwrite, rerun)
    if loc.is_remote:
        if replace:
            loc.delete()
        (loc / MARKER).write_text("made by kiln\n")
        return Path(loc.text)
    out = loc.local_path
    if replace:
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("made by kiln\n")
    return out


# What a refused --out that holds an earlier Kiln run can do instead: each command names its own way
# (the flag or setting it has), never another command's.
RERUN_TRAINING = "continue it with trainer.resume=auto"
RERUN_QUICKSTART = "replace it with --overwrite"


def check_run_dir(out: Location, overwrite: bool = False, rerun: str | None = None) -> bool:
    """Read-only: ConfigError unless `out` may become a new run's directory (absent or empty, or with
    `overwrite` an earlier Kiln run's); whether it holds such a run to replace. `--dry-run` asks this too.
    rerun: what the command offers for an earlier Kiln run there (RERUN_*), named in the refusal."""
    where = "prefix" if out.is_remote else "directory"
    if out.is_remote:
        holds_files = bool(out.list())
    else:
        path = out.local_path
        if path.exists() and not path.is_dir():
            raise ConfigError(f"{out}: output path exists and is not a directory")
        holds_files = path.is_dir() and any(path.iterdir())
    if not holds_files:
        return False
    if not overwrite:
        ours = rerun is not None and (out / MARKER).is_file()
        remedy = f"{rerun}, or choose another --out" if ours else "choose another --out"
        what = "holds an earlier Kiln run" if ours else "is not empty"
        raise ConfigError(f"{out}: output {where} {what} ({remedy})")
    if not (out / MARKER).is_file():
        raise ConfigError(f"{out}: not empty and not a Kiln run {where}; refusing to overwrite it")
    return True
