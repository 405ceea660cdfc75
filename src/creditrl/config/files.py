"""Reading and writing configurations: YAML files, dotted `key=value` overrides, and the one
formatter that turns a pydantic error into a message naming each offending key."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError


class ConfigError(ValueError):
    """A configuration that cannot be used; the message names the offending key."""


def describe_errors(err: ValidationError, where: Path | str | None = None, prefix: str = "") -> str:
    """One line per error: `<where>: unknown key 'a.b'` or `<where>: a.b: <why> (got <input>)`; `prefix`
    goes before each key (`method_params.`)."""
    at = f"{where}: " if where else ""
    lines = []
    for e in err.errors():
        key = prefix + ".".join(str(p) for p in e["loc"]) or "(top level)"
        if e["type"] == "extra_forbidden":
            lines.append(f"{at}unknown key '{key}'")
        else:
            lines.append(f"{at}{key}: {e['msg']} (got {e.get('input')!r})")
    return "invalid configuration:\n  " + "\n  ".join(lines)


def validated(model: type[BaseModel], data: dict[str, Any], where: Path | str | None = None,
              prefix: str = "") -> BaseModel:
    """`model(**data)`, or a ConfigError from `describe_errors`."""
    try:
        return model(**data)
    except ValidationError as err:
        raise ConfigError(describe_errors(err, where, prefix)) from None


def read_config_file(path: Path) -> dict[str, Any]:
    """A YAML file's top-level mapping; errors name the file (and the line, for a repeated key)."""
    try:
        loaded = yaml.load(Path(path).read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text (byte {err.start})") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if loaded is not None and not isinstance(loaded, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(loaded).__name__}")
    return loaded or {}


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (PyYAML would keep the last, so a
    repeated section header silently dropped the whole earlier section)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *defaults`: merged keys may be overridden
                continue
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"the key {key!r} is given twice",
                                                        key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """`["train.lr=3e-5", "loss.agg=token-mean"]` -> nested dict; each value read by `_scalar`."""
    nested: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {pair!r} is not of the form key=value")
        set_dotted(nested, key.strip(), _scalar(raw))
    return nested


def _scalar(raw: str) -> Any:
    """An override's value: a list or mapping (`[0.9, 0.99]`) as YAML; a JSON scalar (`1e3`, `true`,
    `null`, `"quoted"`) or a float (`nan`, `.nan`, `inf`) as such, except a fraction Python would write
    otherwise (`3e-5`, `2024.10`), which stays text for pydantic to read; anything else as the string
    written, a prompt template such as `{question} Answer:` included.  Plain YAML would also read `#` as a
    comment, `a: b` as a mapping, `010` as octal 8 and `1:30` as 90."""
    text = raw.strip()
    if not text:
        return None
    if text[0] in "[{":
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            return raw
        placeholders = isinstance(value, dict) and None in value.values()  # `{question}` is text, not a mapping
        return raw if placeholders else value
    try:
        value = json.loads(text)
    except ValueError:
        pass
    else:  # a fraction keeps the text it was written as (2024.10, 3e-5) unless that is how Python writes it: a
        # text setting then gets those characters, and pydantic reads a number setting from them; a whole number
        # (1e3) stays a number, which an integer setting takes
        written_otherwise = type(value) is float and repr(value) != text and not value.is_integer()
        return text if written_otherwise else value
    if text.lstrip("+-").lower() in ("nan", "inf", "infinity", ".nan", ".inf"):  # and YAML's spelling, .nan, .inf
        return float(text.replace(".", "", 1))
    return raw


def deep_merge(base: dict[str, Any], top: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """`top` over `base`, section by section; a section in `top` over a value in `base` is an error."""
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and out.get(key) is not None and not isinstance(out[key], dict):
            raise ConfigError(f"{prefix}{key}: a section (key: value lines), got {out[key]!r}")
        out[key] = deep_merge(out[key], value, f"{prefix}{key}.") if isinstance(value, dict) and out.get(key) else value
    return out


def set_dotted(nested: dict[str, Any], key: str, value: Any) -> None:
    """`nested["a"]["b"] = value` for the key `a.b`, making sections on the way."""
    *parents, leaf = key.split(".")
    node = nested
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {key!r}: {part!r} is a value, not a section")
    node[leaf] = value


def save_config(cfg: BaseModel, path: Path) -> None:
    """Write a config as YAML, atomically (a kill mid-write leaves the old file)."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    os.replace(tmp, path)
