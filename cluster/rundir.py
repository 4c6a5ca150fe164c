"""Output directories: a new run never mixes its files into an old run's."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from data_pipeline.configlib import ConfigError

MARKER = ".kiln-run"


def user_error_types() -> tuple[type[BaseException], ...]:
    """The errors that mean "the input is wrong" (the CLI prints them as one line, exit 2)."""
    from data_pipeline.errors import DataError
    from pretrain.checkpoint import CheckpointError

    return ConfigError, DataError, CheckpointError


@contextmanager
def run_dir(out: Path, resume: str = "never", overwrite: bool = False) -> Iterator[Path]:
    """The output directory of one run (see `prepare_run_dir`; with resume="auto" an earlier Kiln
    run's is continued). When the run fails on bad input before it wrote a checkpoint, what this
    command created is removed again, so a corrected rerun can use the same --out; a directory that
    was there before is kept."""
    # Here, not at the top: cluster.resume reads checkpoints (torch), and the CLI imports this module
    # before it has validated a config.
    from cluster.resume import continues_run, has_checkpoint

    out = Path(out)
    created, was_empty = not out.exists(), out.is_dir() and not any(out.iterdir())
    if continues_run(out, resume):
        created = was_empty = False  # a run being continued: none of its files are this command's
    else:
        prepare_run_dir(out, overwrite)
    try:
        yield out
    except user_error_types():
        if (created or was_empty) and not has_checkpoint(out):
            _remove_made(out, keep_dir=not created)
        raise


def _remove_made(out: Path, keep_dir: bool) -> None:
    if not keep_dir:
        shutil.rmtree(out, ignore_errors=True)
        return
    for child in out.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child, ignore_errors=True)
        else:
            child.unlink(missing_ok=True)


def prepare_run_dir(out: Path, overwrite: bool = False) -> Path:
    """Create `out` (absent or empty), or with `overwrite` replace a directory that an earlier Kiln run made.

    A non-empty directory Kiln did not make is never deleted, overwrite or not."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out}: output path exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise ConfigError(
                f"{out}: output directory is not empty (choose another --out, or pass --overwrite)"
            )
        if not (out / MARKER).is_file():
            raise ConfigError(
                f"{out}: not empty and not a Kiln run directory; refusing to overwrite it"
            )
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("made by kiln\n")
    return out
