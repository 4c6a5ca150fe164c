"""Loading a job config on the driver: a YAML recipe plus dotted overrides, locations resolved.

The typed building itself (unknown keys with did-you-mean, wrong types, `Literal` choices, presets,
model families) is `data_pipeline.configlib`, the one config mechanism every package uses. This
module adds what only the driver does: it reads the recipe file and makes every location absolute.

Locations: a field marked `field(metadata={"path": KIND})` holds a path (see `PATH_KINDS`).
`load_config` makes relative ones absolute against the directory `kiln` runs in, on the driver: Ray
Train workers run in another working directory, so a path they read must not depend on it.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import re
import sys
from pathlib import Path
from typing import Any, TypeVar

from data_pipeline.configlib import build, parse_override, read_yaml, set_dotted

T = TypeVar("T")

# The `metadata={"path": KIND}` kinds of location fields:
#   "path": a file, directory or glob;
#   "checkpoint": a Kiln checkpoint directory, a run directory (meaning its newest complete
#     checkpoint), either as a URI (pinned to the one checkpoint's URI), or
#     `hf:<directory or Hub name>` (a Hub name is kept as written);
#   "local_or_name": a local path where one exists, else a name (a Hub dataset) kept as written.
PATH_KINDS = ("path", "checkpoint", "local_or_name")
HF_PREFIX = "hf:"  # pretrain.hf_import's prefix, repeated: loading a config never imports torch
_URI = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")  # s3://, gs://, file://... are never relative


def load_config(
    cls: type[T], path: str | Path | None, overrides: list[str] | None = None, pin: bool = True
) -> T:
    """Read a YAML recipe (or start from defaults when `path` is None), apply overrides, build `cls`.
    `pin`: checkpoint URIs naming a run become its newest checkpoint's URI, now (False: kept as
    written, for a job that runs later elsewhere: `kiln submit`, `kiln render`)."""
    raw = read_yaml(path) if path is not None else {}
    source = str(path) if path is not None else "defaults"
    override_keys = set()
    for item in overrides or []:
        key, value = parse_override(item)
        set_dotted(raw, key, value)
        override_keys.add(key)
    return resolve_paths(build(cls, raw, source=source, override_keys=override_keys), pin=pin)


def is_uri(value: str) -> bool:
    """`s3://…`, `gs://…`, `file://…`: a location that is never relative to the working directory."""
    return bool(_URI.match(value))


def absolute_path(value: str, cwd: str | Path | None = None) -> str:
    """`value` made absolute against `cwd` (default: the working directory); a URI as it is."""
    if _URI.match(value):
        return value
    return os.path.normpath(os.path.join(cwd or os.getcwd(), os.path.expanduser(value)))


def resolve_location(value: str, kind: str, cwd: str | Path | None = None, pin: bool = True) -> str:
    """One location field's value with relative paths made absolute (see PATH_KINDS)."""
    if kind == "path":
        return absolute_path(value, cwd)
    if kind == "local_or_name":
        return absolute_path(value, cwd) if _is_local(value, cwd) else value
    if value.startswith(HF_PREFIX):
        name = value.removeprefix(HF_PREFIX)
        return HF_PREFIX + absolute_path(name, cwd) if _is_local(name, cwd) else value
    path = absolute_path(value, cwd)
    local_dir = os.path.isdir(path) and not os.path.isfile(os.path.join(path, "manifest.json"))
    if not (_URI.match(value) and pin) and not local_dir:
        return path  # a checkpoint itself, or nothing yet: its loader says what is wrong
    # Imports torch: only for a URI or a run directory. A URI naming a run is pinned here, on the
    # driver, to one checkpoint's URI (verified), which every worker then fetches and loads.
    from pretrain.checkpoint import select_checkpoint

    return str(select_checkpoint(path, warn=lambda msg: print(msg, file=sys.stderr)))


def _is_local(value: str, cwd: str | Path | None) -> bool:
    """Whether `value` is a path on this machine (or a glob that matches) rather than a name."""
    if _URI.match(value):
        return False
    if value.startswith(("/", "./", "../", "~")):
        return True
    return bool(glob.glob(absolute_path(value, cwd)))


def resolve_paths(cfg: T, cwd: str | Path | None = None, pin: bool = True) -> T:
    """`cfg` (a dataclass tree, changed in place and returned), every location field resolved."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        kind = f.metadata.get("path")
        if kind is not None:
            if kind not in PATH_KINDS:
                raise TypeError(f"{type(cfg).__name__}.{f.name}: unknown path kind {kind!r}")
            value = _resolve_value(value, kind, cwd, pin)
            object.__setattr__(cfg, f.name, value)  # object's: a frozen dataclass is resolved alike
        elif dataclasses.is_dataclass(value) and not isinstance(value, type):
            resolve_paths(value, cwd, pin)
    return cfg


def _resolve_value(value: Any, kind: str, cwd: str | Path | None, pin: bool) -> Any:
    if isinstance(value, str):
        return resolve_location(value, kind, cwd, pin)
    if isinstance(value, (list, tuple)):
        return type(value)(_resolve_value(v, kind, cwd, pin) for v in value)
    return value  # None: not set
