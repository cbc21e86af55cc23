"""Every config key with its type, default and meaning, read from the sections' dataclass fields (for --help)."""
from __future__ import annotations

import dataclasses
import functools
import shutil
import textwrap
import typing
from collections.abc import Iterator
from typing import Any

import yaml

from jaxinfra.settings.loading import SHIPPED, load_config
from jaxinfra.settings.sections import Config


@dataclasses.dataclass(frozen=True)
class Key:
    """One leaf of the config: its dotted name, type, default and meaning."""

    name: str
    type: str
    default: Any
    help: str


def _default(f: dataclasses.Field) -> Any:
    """A field's default value, built by its factory where it has one."""
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def _type_name(hint: Any) -> str:
    """int -> 'int', list[str] -> 'list[str]'."""
    if isinstance(hint, type) and not typing.get_args(hint):
        return hint.__name__
    return str(hint).replace("typing.", "")


def keys(schema: type = Config, prefix: str = "") -> Iterator[Key]:
    """The leaves of a config dataclass, nested sections walked in field order."""
    hints = typing.get_type_hints(schema)
    for f in dataclasses.fields(schema):
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            yield from keys(hint, f"{prefix}{f.name}.")
        else:
            yield Key(f"{prefix}{f.name}", _type_name(hint), _default(f), f.metadata.get("help", ""))


def show(value: Any) -> str:
    """A value as a config file or an override spells it: true, 0.003, '', '*.py', [data, fsdp]."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return "[" + ", ".join(show(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {show(v)}" for k, v in value.items()) + "}"
    if isinstance(value, str):
        try:  # bare only where YAML reads it back as this same string ('', 'def ' and '*.py' need quotes)
            bare = value.strip() == value != "" and yaml.safe_load(value) == value
        except yaml.YAMLError:
            bare = False
        return value if bare else repr(value)
    return repr(value)


def config_help(preset: str = "default", width: int | None = None) -> str:
    """Every config key by section: `key: type = default` (and the shipped `preset`'s where it differs), meaning."""
    width = max(width or shutil.get_terminal_size().columns - 2, 40)  # argparse's own width
    hints = typing.get_type_hints(Config)
    # the shipped file itself, not load_config(preset), which would read a file of that name in the cwd first
    shipped = load_config(str(SHIPPED / f"{preset}.yaml"))
    lines = textwrap.wrap(f"config keys: a --config YAML file sets them by section, an override as key.sub=value "
                          f"(values in YAML: run.sample_prompts=['def '], mesh.rules.embed=[fsdp]). Each key shows "
                          f"its type and default, and '--config {preset}: value' where the shipped {preset} config "
                          f"(used without --config) sets another; --print-config shows the merged result.",
                          width) + [""]
    for f in dataclasses.fields(Config):
        section = hints[f.name]
        lines += textwrap.wrap(f"{f.name}: {' '.join((section.__doc__ or '').split())}", width)
        for key in keys(section, f"{f.name}."):
            value = show(functools.reduce(getattr, key.name.split("."), shipped))
            other = f" (--config {preset}: {value})" if value != show(key.default) else ""
            lines += textwrap.wrap(f"{key.name}: {key.type} = {show(key.default)}{other}", width, initial_indent="  ",
                                   subsequent_indent="        ", break_on_hyphens=False)
            lines += textwrap.wrap(key.help, width, initial_indent="      ", subsequent_indent="      ")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"
