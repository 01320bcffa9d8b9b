"""A quantizer's settings: `--set key=value` strings -> JSON values -> the plugin's `Config`.

The two steps are apart because they run in two processes: the command line turns strings into
values (no plugin code needed), and the plugin's own process checks them against its `Config`
(`qbench.quant.plugin_worker`), so the harness never imports a plugin to validate a setting.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from qbench.errors import QBenchError, one_line

ConfigT = TypeVar("ConfigT", bound=BaseModel)


class SettingsError(QBenchError, ValueError):
    """A `--set key=value` that is malformed or that the plugin's Config does not accept."""


def parse_value(text: str) -> Any:
    """JSON when the text is valid JSON (numbers, true/false, null, lists), else the string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _as_text(value: Any) -> str:
    """A value as the user typed it after `=` (the string itself, else its JSON)."""
    return value if isinstance(value, str) else json.dumps(value)


def parse_setting_values(settings: Sequence[str], plugin: str) -> dict[str, Any]:
    """`["bits=4", "group_size=null"]` -> `{"bits": 4, "group_size": None}`."""
    return {key: parse_value(text) for key, text in split_settings(settings, f"plugin '{plugin}'").items()}


def split_settings(settings: Sequence[str], what: str, form: str = "key=value") -> dict[str, str]:
    """`["bits=4", "group_size=null"]` -> `{"bits": "4", "group_size": "null"}`: each key and the
    text after its first `=`; a malformed item or a key given twice is a `SettingsError` naming
    `what` (the plugin, or the option the settings were given to)."""
    texts: dict[str, str] = {}
    for item in settings:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise SettingsError(f"{what}: setting {item!r} is not of the form {form}")
        if key in texts:
            raise SettingsError(f"{what}: setting '{key}' given twice")
        texts[key] = text.strip()
    return texts


def read_toml_or_json(path: Path, what: str, error: type[QBenchError]) -> Any:
    """The document of a `.toml` file, or of any other as JSON (plans, sweep files); `error`
    naming the file when it cannot be read or parsed, `what` saying what the file is."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise error(f"{path}: cannot read the {what} ({exc.strerror or exc})") from None
    try:
        if path.suffix == ".toml":
            import tomllib

            return tomllib.loads(text)
        return json.loads(text)
    except ModuleNotFoundError:
        raise error(f"{path}: TOML {what}s need Python 3.11+ (tomllib); write the {what} as JSON") from None
    except ValueError as exc:  # tomllib.TOMLDecodeError and json.JSONDecodeError are ValueErrors
        raise error(f"{path}: not valid {path.suffix.lstrip('.') or 'JSON'} ({exc})") from None


def config_from_values(values: dict[str, Any], config_cls: type[ConfigT], plugin: str) -> ConfigT:
    """The plugin's `Config` of `values`; a problem is a one-line `SettingsError` naming the key."""
    known = list(config_cls.model_fields)
    for key in values:
        if key not in config_cls.model_fields:
            raise SettingsError(f"plugin '{plugin}': unknown setting '{key}' (known: {', '.join(known) or 'none'})")
    try:
        return config_cls.model_validate(values)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(p) for p in err.get("loc", ())) or "settings"
        key = str(err["loc"][0]) if err.get("loc") else None
        got = f" (got {_as_text(values[key])!r})" if key in values else ""
        raise SettingsError(f"plugin '{plugin}': bad value for '{loc}': {one_line(err.get('msg', exc))}{got}") from None


def parse_settings(settings: Sequence[str], config_cls: type[ConfigT], plugin: str | None = None) -> ConfigT:
    """Both steps at once, for a plugin already imported (tests, benchmarks, `qbench fit`).

    Values are parsed as JSON when they are valid JSON (numbers, true/false, null, lists), else
    taken as strings. Any problem raises a one-line `SettingsError` naming the key and plugin.
    """
    plugin = plugin or config_cls.__qualname__.split(".")[0]
    return config_from_values(parse_setting_values(settings, plugin), config_cls, plugin)
