"""A quantizer's settings: `--set key=value` strings -> JSON values -> the plugin's `Config`.

The two steps are apart because they run in two processes: the command line turns strings into
values (no plugin code needed), and the plugin's own process checks them against its `Config`
(`qbench.quant.plugin_worker`), so the harness never imports a plugin to validate a setting.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
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
    values: dict[str, Any] = {}
    for item in settings:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise SettingsError(f"plugin '{plugin}': setting {item!r} is not of the form key=value")
        if key in values:
            raise SettingsError(f"plugin '{plugin}': setting '{key}' given twice")
        values[key] = parse_value(text.strip())
    return values


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
