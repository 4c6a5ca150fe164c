"""Output directories: a new run never mixes its files into an old run's."""

from __future__ import annotations

import shutil
from pathlib import Path

from cluster.config import ConfigError

MARKER = ".kiln-run"


def prepare_run_dir(out: Path, overwrite: bool = False) -> Path:
    """Create `out` (absent or empty), or with `overwrite` replace a directory that an earlier Kiln run made.

    A non-empty directory Kiln did not make is never deleted, overwrite or not."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out}: output path exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise ConfigError(f"{out}: output directory is not empty (choose another --out, or pass --overwrite)")
        if not (out / MARKER).is_file():
            raise ConfigError(f"{out}: not empty and not a Kiln run directory; refusing to overwrite it")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("made by kiln\n")
    return out
