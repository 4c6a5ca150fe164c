"""Typed configs: plain data into a tree of dataclasses, checked before any work starts.

This is the one way Kiln builds a config. Every config is a flat typed dataclass next to the code
that uses it; plain data reaches it by one of four doors, all through `_Builder` below:
- `build`: a YAML recipe plus dotted command-line overrides (`cluster.config.load_config`). An error
  names the file (or "command line") and the dotted key, with the closest valid key for a typo.
- `from_preset`: a preset row of the class, keyword overrides on top.
- `from_dict`: the `dataclasses.asdict` form written earlier (a checkpoint's config.json, a
  manifest). An error names `where` and lists every unknown key; presets are not applied again (the
  form is complete).
- `check_fields`: a dataclass constructed directly in Python; `__post_init__` calls it. Field types,
  `Literal` choices and the preset name are checked, an int becomes a float where a float is
  declared, and a mapping in a dataclass-typed field becomes that dataclass (so
  `Cfg(**asdict(cfg)) == cfg`).

Conventions the builder understands:
- choices are `Literal[...]` fields;
- presets: a class with `PRESETS: ClassVar[dict[str, dict]]` and a `preset` field starts from that
  row; keys written explicitly win. The constructor alone does not apply a preset: a dataclass
  cannot tell an explicit value from a default;
- model families: a field typed as a union of dataclasses (`BertConfig | GPTConfig`) takes the
  member whose `arch` field (a `Literal`) lists the mapping's `arch` key;
  `Annotated[..., OneOf(choices)]` takes it from `choices()`, a mapping arch -> class read at build
  time (an architecture registry);
- locations (`field(metadata={"path": KIND})`) are resolved by `cluster.config.load_config` on the
  driver.

Why here: data_pipeline is the bottom package, which every package may import, and this module
imports nothing of Kiln, nor torch or Ray, so a config error costs no heavy import.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import re
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar, Union

import yaml

T = TypeVar("T")
# An exponent without a dot: PyYAML (YAML 1.1) reads 3e-4 as a string; everyone means the number.
_YAML11_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


class ConfigError(ValueError):
    """A config that cannot be used; the message is one line naming the key or file."""


@dataclass(frozen=True)
class OneOf:
    """`Annotated[Base, OneOf(choices)]`: the field holds the dataclass `choices()[arch]`, picked by
    the mapping's `arch` key (the first entry's when absent). `choices` is called at build time, so
    a registry extended after the config class was defined counts."""

    choices: Callable[[], Mapping[str, type]]


# ------------------------------------------------------------------------------ the four doors
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
        raise ConfigError(
            f"{path}: the top level must be a mapping of keys, got {type(data).__name__}"
        )
    return data


def parse_override(item: str) -> tuple[str, Any]:
    """`trainer.max_steps=50` → ("trainer.max_steps", 50); values are parsed as YAML scalars or
    lists."""
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
            section = ".".join(parts[: i + 1])
            raise ConfigError(f"override '{key}': '{section}' is a value, not a section")
        node = child
    node[parts[-1]] = value


def build(
    cls: type[T],
    data: Mapping[str, Any],
    source: str = "config",
    override_keys: set[str] | None = None,
) -> T:
    """`cls` from a recipe mapping; `override_keys` are the dotted keys that came from the command
    line."""
    return _Builder(source, "recipe", override_keys or set()).dataclass(cls, data, "")


def from_preset(cls: type[T], name: str, **overrides: Any) -> T:
    """`cls` with the values of its preset `name`, `overrides` on top (as a recipe's `preset:` key
    does)."""
    presets = getattr(cls, "PRESETS", None) or {}
    if name not in presets:
        raise ConfigError(
            f"{cls.__name__}.preset: unknown preset {name!r} (choose from {', '.join(presets)})"
        )
    return _Builder(cls.__name__, "class").dataclass(
        cls, {**presets[name], **overrides, "preset": name}, ""
    )


def from_dict(cls: type[T], values: Any, where: str | None = None) -> T:
    """The `dataclasses.asdict` form back into `cls` (nested dataclasses too); errors start with
    `where` (default: the class name), e.g. a checkpoint's config.json."""
    return _Builder(where or cls.__name__, "record").dataclass(cls, values, "")


def check_fields(obj: Any, where: str | None = None, error: type[ValueError] = ConfigError) -> None:
    """Check a dataclass built directly in Python, in its `__post_init__`: each field's type and
    `Literal` choice, the preset name; ints become floats where declared and mappings the declared
    dataclass. Errors read `Class.key must be ...`; with `where=""`, `key: must be ...` (a flat
    section such as `data`)."""
    cls = type(obj)
    builder = _Builder(cls.__name__ if where is None else where, "class")
    hints = _hints(cls)
    try:
        for f in dataclasses.fields(obj):
            if f.init:
                object.__setattr__(
                    obj, f.name, builder.value(hints[f.name], getattr(obj, f.name), f.name)
                )
        builder.check_preset(cls, getattr(obj, "preset", None), "")
    except ConfigError as err:
        raise error(str(err)) from None


def to_dict(cfg: Any) -> dict[str, Any]:
    """The resolved config as plain data (what `--print-config`, checkpoints and W&B record)."""
    return dataclasses.asdict(cfg)


def to_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=False)


def field_names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls) if f.init]


def choices(cls: type, name: str) -> tuple[Any, ...]:
    """The values a `Literal` field of `cls` allows."""
    return _literal_args(_hints(cls)[name])


# ------------------------------------------------------------------------------------ the builder
@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls, include_extras=True)


def _literal_args(hint: Any) -> tuple[Any, ...]:
    if typing.get_origin(hint) is Literal:
        return typing.get_args(hint)
    return tuple(a for arg in typing.get_args(hint) for a in _literal_args(arg))  # Literal | None


def _arches(cls: type) -> tuple[str, ...]:
    """The `arch` values a family member builds: its `arch` field's Literal, else that field's
    default."""
    return _literal_args(_hints(cls).get("arch")) or (cls.__dataclass_fields__["arch"].default,)


# A style is how errors read: "recipe" (a YAML file or the command line: `where: 'dotted.key' must
# be ...`, the closest key for a typo), "record" (stored data: `where: 'key' must be ...`, every
# unknown key listed) or "class" (Python code: `Class.key must be ...`). Only "recipe" applies a
# mapping's `preset:` key.
Style = Literal["recipe", "record", "class"]


class _Builder:
    def __init__(self, source: str, style: Style, override_keys: set[str] | None = None) -> None:
        self.source = source
        self.style = style
        self.override_keys = override_keys or set()

    def message(self, key: str, detail: str) -> str:
        """One line naming `key`; `detail` starts with " must ..." or ": ..."."""
        if self.style != "class":
            where = "command line" if key in self.override_keys else self.source
            return f"{where}: '{key}'{detail}"
        if self.source:
            return f"{self.source}.{key}{detail}"
        field = re.split(r"[.\[]", key, maxsplit=1)[0]  # data: `tasks: 'tasks[1]' must be ...`
        inner = "" if key == field else f" '{key}'"
        return f"{field}:{inner}{detail.removeprefix(':')}"

    def fail(self, key: str, detail: str) -> typing.NoReturn:
        raise ConfigError(self.message(key, detail))

    def dataclass(self, cls: type[T], data: Any, prefix: str) -> T:
        label = prefix.rstrip(".")
        if isinstance(data, cls):
            return data  # already built (a default, or Python code passing the dataclass itself)
        if not isinstance(data, Mapping):
            self.fail(label or cls.__name__, f" must be a mapping of keys, got {_describe(data)}")
        data = self.with_preset(cls, dict(data), prefix) if self.style == "recipe" else dict(data)
        hints, names = _hints(cls), field_names(cls)
        unknown = [k for k in data if k not in names]
        if unknown:
            self.unknown(cls, unknown, prefix, names)
        kwargs = {
            key: self.value(hints[key], value, f"{prefix}{key}") for key, value in data.items()
        }
        try:
            return cls(**kwargs)
        except (ValueError, TypeError) as err:
            if self.style == "recipe" and isinstance(err, ConfigError):
                raise  # already one line naming the key
            raise self.construction_error(label, err) from None

    def construction_error(self, label: str, err: Exception) -> ConfigError:
        """The class's own check refused the values (its __post_init__)."""
        if self.style == "recipe":
            where = "command line" if label in self.override_keys else self.source
            return ConfigError(f"{where}: {label or 'config'}: {err}")
        if label:
            return ConfigError(f"{self.source}: {label}: {err}")
        text = str(err)
        return ConfigError(text if text.startswith(self.source) else f"{self.source}: {text}")

    def with_preset(self, cls: type, data: dict[str, Any], prefix: str) -> dict[str, Any]:
        name = data.get("preset")
        if not getattr(cls, "PRESETS", None) or name is None:
            return data
        self.check_preset(cls, name, prefix)
        return {**cls.PRESETS[name], **data}  # type: ignore[attr-defined]

    def check_preset(self, cls: type, name: Any, prefix: str) -> None:
        presets = getattr(cls, "PRESETS", None)
        if presets is not None and name is not None and name not in presets:
            self.fail(
                f"{prefix}preset", f": unknown preset {name!r} (choose from {', '.join(presets)})"
            )

    def unknown(
        self, cls: type, unknown: list[Any], prefix: str, names: list[str]
    ) -> typing.NoReturn:
        if self.style == "recipe":
            dotted, valid = f"{prefix}{unknown[0]}", [f"{prefix}{n}" for n in names]
            close = difflib.get_close_matches(dotted, valid, n=1, cutoff=0.6)
            hint = (
                f" (did you mean '{close[0]}'?)" if close else f" (valid keys: {', '.join(valid)})"
            )
            where = "command line" if dotted in self.override_keys else self.source
            raise ConfigError(f"{where}: unknown key '{dotted}'{hint}")
        at = f"{self.source}.{prefix.rstrip('.')}" if prefix else self.source
        owner = "" if at == cls.__name__ else f" for {cls.__name__}"
        raise ConfigError(f"{at}: unknown key(s) {sorted(map(str, unknown))}{owner}")

    def value(self, hint: Any, value: Any, key: str) -> Any:
        origin, args = typing.get_origin(hint), typing.get_args(hint)
        if origin is Annotated:
            one_of = next((m for m in hint.__metadata__ if isinstance(m, OneOf)), None)
            return (
                self.value(args[0], value, key)
                if one_of is None
                else self.family(one_of.choices(), value, key)
            )
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
        if origin is Literal:
            return self.literal(args, value, key)
        return self.scalar(hint, value, key)

    def literal(self, allowed: tuple[Any, ...], value: Any, key: str) -> Any:
        # True == 1, but True is not the choice 1
        if value in allowed and type(value) in {type(a) for a in allowed}:
            return value
        if len(allowed) == 1:
            self.fail(key, f" must be {allowed[0]!r}, got {value!r}")
        names = [str(a) for a in allowed]
        close = (
            difflib.get_close_matches(value, names, n=1, cutoff=0.6)
            if isinstance(value, str)
            else []
        )
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        self.fail(key, f" must be one of {list(allowed)}, got {value!r}{hint}")

    def union(self, args: tuple[Any, ...], value: Any, key: str) -> Any:
        if value is None and type(None) in args:
            return None
        members = [a for a in args if a is not type(None)]
        classes = [a for a in members if dataclasses.is_dataclass(a)]
        if classes:
            return self.family({arch: c for c in classes for arch in _arches(c)}, value, key)
        errors = []
        for member in members:
            try:
                return self.value(member, value, key)
            except ConfigError as err:
                errors.append(err)
        raise errors[0]

    def family(self, arches: Mapping[str, type], value: Any, key: str) -> Any:
        if isinstance(value, tuple(set(arches.values()))):
            return value
        if dataclasses.is_dataclass(value):
            self.fail(
                key,
                f": a {type(value).__name__} is none of the architectures ({', '.join(arches)})",
            )
        if not isinstance(value, Mapping):
            self.wrong_type(key, "a mapping", value)
        arch = value.get("arch", next(iter(arches)))
        if not isinstance(arch, str) or arch not in arches:
            self.fail(
                f"{key}.arch", f": unknown architecture {arch!r} (choose from {', '.join(arches)})"
            )
        return self.dataclass(arches[arch], value, f"{key}.")

    def sequence(self, origin: type, args: tuple[Any, ...], value: Any, key: str) -> Any:
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            self.wrong_type(key, "a list", value)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                self.fail(key, f" must have {len(args)} items, got {len(value)}")
            return tuple(
                self.value(a, v, f"{key}[{i}]")
                for i, (a, v) in enumerate(zip(args, value, strict=True))
            )
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
                return float(value)
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
        self.fail(key, f" must be {expected}, got {_describe(value)}")


def _describe(value: Any) -> str:
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return f"{type(value).__name__} {value!r}"
