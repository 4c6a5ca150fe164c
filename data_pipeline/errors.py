"""The one exception type of the data pipeline."""

from __future__ import annotations


class DataError(ValueError):
    """Bad input: a missing file, an undecodable line, a wrong column count, an invalid config key.

    The message is one line that names the file and line (``path:12: ...``) or the config key, so a
    user can go straight to the culprit; the CLI turns it into exit code 2.
    """
