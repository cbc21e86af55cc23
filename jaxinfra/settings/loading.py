"""Loading a config: defaults <- a YAML file (a path or a shipped preset's name) <- dotted overrides, each read with
yaml.safe_load, bounded in size and depth, unknown keys named with the closest valid one, merged by OmegaConf."""
from __future__ import annotations

import dataclasses
import difflib
import os
import re
import typing
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from jaxinfra.core.errors import UserError
from jaxinfra.settings.sections import Config

SHIPPED = Path(__file__).resolve().parents[1] / "configs"  # the configs installed with the package


def _omegaconf_error(e: OmegaConfBaseException) -> UserError:
    """One readable line from an OmegaConf merge error."""
    key = getattr(e, "full_key", None) or getattr(e, "key", None) or "?"
    msg = str(getattr(e, "msg", None) or e).splitlines()[0]
    return UserError(f"config key {key}: {msg}")


def _check_keys(data: Any, schema: Any, prefix: str = "") -> None:
    """Reject unknown keys naming the closest valid one (before OmegaConf sees them)."""
    if not isinstance(data, dict) or not dataclasses.is_dataclass(schema):
        return
    valid = [f.name for f in dataclasses.fields(schema)]
    hints = typing.get_type_hints(schema)
    for key, value in data.items():
        name = f"{prefix}{key}"
        if key not in valid:
            close = difflib.get_close_matches(str(key), valid, n=1)
            hint = f" (did you mean {prefix}{close[0]}?)" if close else f" (valid: {', '.join(valid)})"
            raise UserError(f"unknown config key {name}{hint}")
        _check_keys(value, hints[key], f"{name}.")


# A config is a few hundred values: more (YAML aliases expand without bound, a "billion laughs") or
# deeper nesting is refused before OmegaConf copies it, which would take minutes or recurse too deep.
MAX_VALUES, MAX_DEPTH = 100_000, 32


def _bounded(data: Any, where: str) -> Any:
    """`data` if it expands to at most MAX_VALUES values nested at most MAX_DEPTH deep; the walk stops
    at the first excess, so a hostile file costs no more than the limit."""
    stack, seen = [(data, 0)], 0
    while stack:
        node, depth = stack.pop()
        seen += 1
        if seen > MAX_VALUES:
            raise UserError(f"{where}: expands to more than {MAX_VALUES:,} values (YAML aliases?): not a config")
        if depth > MAX_DEPTH:
            raise UserError(f"{where}: nested more than {MAX_DEPTH} levels deep: not a config")
        children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else ()
        stack.extend((child, depth + 1) for child in children)
    return data


def _safe_load(text: Any, where: str) -> Any:
    """yaml.safe_load, with nesting too deep for the parser reported as one line."""
    try:
        return yaml.safe_load(text)
    except RecursionError:
        raise UserError(f"{where}: nested too deeply to parse: not a config") from None


def _parse_override(item: str) -> tuple[str, Any]:
    """'a.b=value' -> ('a.b', YAML-parsed value)."""
    if "=" not in item:
        raise UserError(f"override {item!r} is not of the form key.sub=value")
    key, raw = item.split("=", 1)
    if re.fullmatch(r"\d+:\d+", raw.strip()):  # N:M, which YAML 1.1 would read as a base-60 integer
        return key.strip(), raw.strip()
    try:
        value = _safe_load(raw, f"override {key.strip()}") if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), _bounded(value, f"override {key.strip()}")


def _nest(key: str, value: Any) -> dict:
    """'a.b.c', v -> {'a': {'b': {'c': v}}}."""
    out: Any = value
    for part in reversed(key.split(".")):
        out = {part: out}
    return out


def shipped_configs() -> list[str]:
    """Names of the configs that come with the package (default, accelerator, dp, ...)."""
    return sorted(p.stem for p in SHIPPED.glob("*.yaml"))


def config_path(name: str) -> str:
    """A YAML file's path, or the name of a shipped config (`accelerator`), from any folder."""
    if os.path.isfile(name):
        return name
    shipped = SHIPPED / f"{name.removesuffix('.yaml')}.yaml"
    if os.sep not in name and shipped.is_file():
        return str(shipped)
    raise UserError(f"--config {name}: no such file (shipped configs: {', '.join(shipped_configs())})")


def load_config(path: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults <- YAML file (a path or a shipped config's name) <- dotted overrides, validated;
    raises UserError naming the key."""
    layers = []
    if path:
        path = config_path(path)
        with open(path) as f:
            try:
                data = _bounded(_safe_load(f, f"--config {path}") or {}, f"--config {path}")
            except yaml.YAMLError as e:
                raise UserError(f"--config {path}: not valid YAML ({str(e).splitlines()[0]})") from None
        if not isinstance(data, dict):
            raise UserError(f"--config {path}: expected a mapping of sections, got {type(data).__name__}")
        layers.append(data)
    for item in overrides:
        layers.append(_nest(*_parse_override(item)))
    cfg = OmegaConf.structured(Config)
    for layer in layers:
        _check_keys(layer, Config)
        try:
            cfg = OmegaConf.merge(cfg, OmegaConf.create(layer))
        except OmegaConfBaseException as e:
            raise _omegaconf_error(e) from None
    try:
        out = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as e:
        raise _omegaconf_error(e) from None
    out.model.vocab_size = out.model.vocab_size or out.data.tokenizer_vocab  # a tokenizer.json's: once it is read
    out.check_train()
    out.check_lm()  # a config file is the LM job's too: its sections must be valid even when unused
    return out


def _dotted(data: Any, prefix: str = "") -> set[str]:
    """{'a': {'b': 1}} -> {'a.b'}: every leaf key, dotted (a mapping-valued key such as mesh.rules counts whole)."""
    if not isinstance(data, dict) or prefix in ("mesh.rules.",):
        return {prefix.rstrip(".")} if prefix else set()
    return set().union(*(_dotted(v, f"{prefix}{k}.") for k, v in data.items())) if data else set()


def given_keys(path: str | None, overrides: list[str] | tuple[str, ...] = ()) -> set[str]:
    """The dotted keys the user set: in their own YAML file (a shipped config's are defaults) and the overrides.
    What a model folder may fill (checkpoint.init_from) gives way only where the user said nothing."""
    keys: set[str] = set()
    if path and not Path(config_path(path)).resolve().is_relative_to(SHIPPED):
        with open(config_path(path)) as f:
            keys |= _dotted(_safe_load(f, f"--config {path}") or {})
    for item in overrides:
        keys |= _dotted(_nest(*_parse_override(item)))
    return keys


def to_yaml(cfg: Config) -> str:
    """The resolved config as YAML (written into the run folder)."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
