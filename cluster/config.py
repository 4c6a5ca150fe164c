"""Typed configs from YAML recipes plus dotted command-line overrides.

A recipe is a YAML mapping whose shape mirrors a tree of dataclasses. Every key is checked against the
dataclass fields before any work starts: an unknown key or a value of the wrong type raises
`ConfigError` with one line that names the key (and the closest valid key). The CLI turns that into
exit code 2.

Two conventions the loader understands:
- presets: a dataclass with `PRESETS: ClassVar[dict[str, dict]]` and a `preset` field starts from that
  preset; keys written in the YAML or on the command line win over it.
- model families: a field typed as a union of dataclasses (`BertConfig | GPTConfig`) picks the member
  whose `arch` default equals the mapping's `arch` key.
- locations: a field marked `field(metadata={"path": KIND})` holds a path (see `PATH_KINDS`).
  `load_config` makes relative ones absolute against the directory `kiln` runs in, on the driver:
  Ray Train workers run in another working directory, so a path they read must not depend on it.
"""

from __future__ import annotations

import dataclasses
import difflib
import glob
import os
import re
import sys
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar, Union

import yaml

T = TypeVar("T")
_YAML11_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")  # exponent without a dot: a str to PyYAML


class ConfigError(ValueError):
    """A config that cannot be used; the message is one line naming the key or file."""


# The `metadata={"path": KIND}` kinds of location fields:
#   "path": a file, directory or glob;
#   "checkpoint": a Kiln checkpoint directory, a run directory (meaning its newest complete
#     checkpoint), or `hf:<directory or Hub name>` (a Hub name is kept as written);
#   "local_or_name": a local path where one exists, else a name (a Hub dataset) kept as written.
PATH_KINDS = ("path", "checkpoint", "local_or_name")
HF_PREFIX = "hf:"  # pretrain.hf_import's prefix, repeated: loading a config never imports torch
_URI = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")  # s3://, gs://, file://... are never relative


def load_config(cls: type[T], path: str | Path | None, overrides: list[str] | None = None) -> T:
    """Read a YAML recipe (or start from defaults when `path` is None), apply overrides, build `cls`."""
    raw = read_yaml(path) if path is not None else {}
    source = str(path) if path is not None else "defaults"
    override_keys = set()
    for item in overrides or []:
        key, value = parse_override(item)
        set_dotted(raw, key, value)
        override_keys.add(key)
    return resolve_paths(build(cls, raw, source=source, override_keys=override_keys))


def absolute_path(value: str, cwd: str | Path | None = None) -> str:
    """`value` made absolute against `cwd` (default: the working directory); a URI as it is."""
    if _URI.match(value):
        return value
    return os.path.normpath(os.path.join(cwd or os.getcwd(), os.path.expanduser(value)))


def resolve_location(value: str, kind: str, cwd: str | Path | None = None) -> str:
    """One location field's value with relative paths made absolute (see PATH_KINDS)."""
    if kind == "path":
        return absolute_path(value, cwd)
    if kind == "local_or_name":
        return absolute_path(value, cwd) if _is_local(value, cwd) else value
    if value.startswith(HF_PREFIX):
        name = value.removeprefix(HF_PREFIX)
        return HF_PREFIX + absolute_path(name, cwd) if _is_local(name, cwd) else value
    path = absolute_path(value, cwd)
    if not os.path.isdir(path) or os.path.isfile(os.path.join(path, "manifest.json")):
        return path  # a checkpoint itself, or a URI, or nothing yet: its loader says what is wrong
    from pretrain.checkpoint import resolve_checkpoint  # imports torch: only for a run directory

    return str(resolve_checkpoint(Path(path), warn=lambda msg: print(msg, file=sys.stderr)))


def _is_local(value: str, cwd: str | Path | None) -> bool:
    """Whether `value` is a path on this machine (or a glob that matches) rather than a name."""
    if _URI.match(value):
        return False
    if value.startswith(("/", "./", "../", "~")):
        return True
    return bool(glob.glob(absolute_path(value, cwd)))


def resolve_paths(cfg: T, cwd: str | Path | None = None) -> T:
    """`cfg` (a dataclass tree, changed in place and returned), every location field resolved."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        kind = f.metadata.get("path")
        if kind is not None:
            if kind not in PATH_KINDS:
                raise TypeError(f"{type(cfg).__name__}.{f.name}: unknown path kind {kind!r}")
            value = _resolve_value(value, kind, cwd)
            object.__setattr__(cfg, f.name, value)  # object's: a frozen dataclass is resolved alike
        elif dataclasses.is_dataclass(value) and not isinstance(value, type):
            resolve_paths(value, cwd)
    return cfg


def _resolve_value(value: Any, kind: str, cwd: str | Path | None) -> Any:
    if isinstance(value, str):
        return resolve_location(value, kind, cwd)
    if isinstance(value, (list, tuple)):
        return type(value)(_resolve_value(v, kind, cwd) for v in value)
    return value  # None: not set


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text (byte {err.start})") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{path}{where}: malformed YAML: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys, got {type(data).__name__}")
    return data


def parse_override(item: str) -> tuple[str, Any]:
    """`trainer.max_steps=50` → ("trainer.max_steps", 50); values are parsed as YAML scalars/lists."""
    key, sep, text = item.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override '{item}': expected dotted.key=value")
    try:
        value = yaml.safe_load(text) if text != "" else ""
    except yaml.YAMLError:
        value = text
    return key, value


def set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = tree
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"override '{key}': '{'.'.join(parts[: i + 1])}' is a value, not a section")
        node = child
    node[parts[-1]] = value


def build(
    cls: type[T], data: Mapping[str, Any], source: str = "config", override_keys: set[str] | None = None
) -> T:
    return _Builder(source, override_keys or set()).dataclass(cls, data, "")


def from_preset(cls: type[T], name: str) -> T:
    """`cls` with the values of one of its presets (the constructor alone leaves presets unapplied)."""
    return build(cls, {"preset": name}, source=f"{cls.__name__} preset")


def to_dict(cfg: Any) -> dict[str, Any]:
    """The resolved config as plain data (what `--print-config`, checkpoints and W&B record)."""
    return dataclasses.asdict(cfg)


def to_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=False)


def field_names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls) if f.init]


class _Builder:
    def __init__(self, source: str, override_keys: set[str]) -> None:
        self.source = source
        self.override_keys = override_keys

    def fail(self, key: str, message: str) -> typing.NoReturn:
        where = "command line" if key in self.override_keys else self.source
        raise ConfigError(f"{where}: {message}")

    def dataclass(self, cls: type[T], data: Any, prefix: str) -> T:
        if not isinstance(data, Mapping):
            self.fail(prefix.rstrip("."), f"'{prefix.rstrip('.')}' must be a mapping of keys, got {_describe(data)}")
        data = self.with_preset(cls, dict(data), prefix)
        hints = typing.get_type_hints(cls)
        names = field_names(cls)
        kwargs = {}
        for key, value in data.items():
            dotted = f"{prefix}{key}"
            if key not in names:
                self.unknown(dotted, [f"{prefix}{n}" for n in names])
            kwargs[key] = self.value(hints[key], value, dotted)
        try:
            return cls(**kwargs)
        except ConfigError:
            raise
        except (ValueError, TypeError) as err:
            self.fail(prefix.rstrip("."), f"{prefix.rstrip('.') or 'config'}: {err}")

    def with_preset(self, cls: type, data: dict[str, Any], prefix: str) -> dict[str, Any]:
        presets = getattr(cls, "PRESETS", None)
        name = data.get("preset")
        if not presets or name is None:
            return data
        if name not in presets:
            choices = ", ".join(presets)
            self.fail(f"{prefix}preset", f"'{prefix}preset': unknown preset '{name}' (choose from {choices})")
        return {**presets[name], **data}

    def unknown(self, dotted: str, valid: list[str]) -> typing.NoReturn:
        close = difflib.get_close_matches(dotted, valid, n=1, cutoff=0.6)
        hint = f" (did you mean '{close[0]}'?)" if close else f" (valid keys: {', '.join(valid)})"
        self.fail(dotted, f"unknown key '{dotted}'{hint}")

    def value(self, hint: Any, value: Any, key: str) -> Any:
        origin = typing.get_origin(hint)
        args = typing.get_args(hint)
        if origin in (Union, types.UnionType):
            return self.union(args, value, key)
        if dataclasses.is_dataclass(hint):
            return self.dataclass(hint, value, f"{key}.")
        if origin in (list, tuple):
            return self.sequence(origin, args, value, key)
        if origin is dict:
            if not isinstance(value, Mapping):
                self.wrong_type(key, "a mapping", value)
            return {str(k): self.value(args[1], v, f"{key}.{k}") for k, v in value.items()}
        if origin is typing.Literal:
            if value not in args:
                self.fail(key, f"'{key}': {value!r} is not one of {', '.join(map(repr, args))}")
            return value
        return self.scalar(hint, value, key)

    def union(self, args: tuple[Any, ...], value: Any, key: str) -> Any:
        if value is None and type(None) in args:
            return None
        members = [a for a in args if a is not type(None)]
        classes = [a for a in members if dataclasses.is_dataclass(a)]
        if classes:
            return self.family(classes, value, key)
        errors = []
        for member in members:
            try:
                return self.value(member, value, key)
            except ConfigError as err:
                errors.append(err)
        raise errors[0]

    def family(self, classes: list[type], value: Any, key: str) -> Any:
        if not isinstance(value, Mapping):
            self.wrong_type(key, "a mapping", value)
        # A class may build several architectures (`ARCHES`, e.g. lstm and lstm_attention); else its `arch` default.
        arches = {arch: c for c in classes for arch in getattr(c, "ARCHES", (c.__dataclass_fields__["arch"].default,))}
        arch = value.get("arch", next(iter(arches)))
        if arch not in arches:
            self.fail(f"{key}.arch", f"'{key}.arch': unknown architecture '{arch}' (choose from {', '.join(arches)})")
        return self.dataclass(arches[arch], value, f"{key}.")

    def sequence(self, origin: type, args: tuple[Any, ...], value: Any, key: str) -> Any:
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            self.wrong_type(key, "a list", value)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                self.fail(key, f"'{key}': expected {len(args)} items, got {len(value)}")
            return tuple(self.value(a, v, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value, strict=True)))
        item = args[0] if args else Any
        items = [self.value(item, v, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items

    def scalar(self, hint: Any, value: Any, key: str) -> Any:
        if hint is Any:
            return value
        if hint is bool:
            if not isinstance(value, bool):
                self.wrong_type(key, "true or false", value)
            return value
        if hint is int:
            if isinstance(value, bool) or not isinstance(value, int):
                self.wrong_type(key, "an integer", value)
            return value
        if hint is float:
            if isinstance(value, str) and _YAML11_FLOAT.fullmatch(value):
                return float(value)  # PyYAML (YAML 1.1) reads 3e-4 as a string; everyone means the number
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                self.wrong_type(key, "a number", value)
            return float(value)
        if hint is str:
            if not isinstance(value, str):
                self.wrong_type(key, "a string", value)
            return value
        if hint is type(None):
            if value is not None:
                self.wrong_type(key, "null", value)
            return None
        raise TypeError(f"config field '{key}' has a type the loader does not handle: {hint!r}")

    def wrong_type(self, key: str, expected: str, value: Any) -> typing.NoReturn:
        self.fail(key, f"'{key}' must be {expected}, got {_describe(value)}")


def _describe(value: Any) -> str:
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return f"{type(value).__name__} {value!r}"
