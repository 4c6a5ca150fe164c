"""The exception types of the data pipeline."""

from __future__ import annotations


class DataError(ValueError):
    """Bad input: a missing file, an undecodable line, a wrong column count, an invalid config key.

    The message is one line that names the file and line (``path:12: ...``) or the config key, so a
    user can go straight to the culprit; the CLI turns it into exit code 2.
    """


class DataDirError(DataError):
    """A directory given as prepared data that is not one `kiln data prepare` wrote (no manifest,
    no shards), or lacks the task or split asked for. A DataError, so it is a user error wherever
    one is caught: the CLI, `run_dir`'s clean-up, and a worker's error re-raised on the driver."""
