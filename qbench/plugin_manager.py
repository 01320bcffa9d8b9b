"""Finding quantizer plugins: one pluggy `PluginManager("qbench")` for the whole process.

Built-in hook modules and third-party distributions go through the same hooks. Entry points
(group `qbench`) are loaded one by one rather than with pluggy's
`load_setuptools_entrypoints`, so that one broken plugin (an import error, a hook that raises,
a malformed quantizer class) is reported as a `PluginLoadError` under its own name while every
other plugin keeps working: a benchmark harness must not lose all quantizers to one bad install.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import pluggy
from pydantic import BaseModel, ConfigDict, Field

from qbench import hookspecs
from qbench.errors import QBenchError, describe
from qbench.quant.contract import Quantizer

PROJECT = "qbench"

#: qbench's own hook modules, registered before entry points through the same hooks.
BUILTIN_HOOK_MODULES: tuple[str, ...] = ("qbench.embedded.ladder",)


class PluginLoadError(BaseModel):
    """A plugin that could not be (fully) used: its entry-point name, distribution, and why."""

    name: str
    distribution: str | None = None
    error: str

    def __str__(self) -> str:
        where = f" ({self.distribution})" if self.distribution else ""
        return f"plugin '{self.name}'{where}: {self.error}"


class QuantizerEntry(BaseModel):
    """One registered quantizer, as `qbench plugins` lists it and results record it."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    name: str
    version: str
    description: str
    needs_calibration: bool
    #: entry-point (plugin) name that registered it
    plugin: str
    distribution: str | None = None
    distribution_version: str | None = None
    config_schema: dict[str, Any]
    cls: type[Quantizer] = Field(exclude=True, repr=False)


class UnknownQuantizerError(QBenchError, LookupError):
    """`get_quantizer` was asked for a name no loaded plugin provides."""


@dataclass
class _Loaded:
    pm: pluggy.PluginManager
    errors: list[PluginLoadError] = field(default_factory=list)
    #: plugin name -> (distribution name, distribution version)
    dists: dict[str, tuple[str | None, str | None]] = field(default_factory=dict)


def _own_distribution() -> tuple[str | None, str | None]:
    try:
        return PROJECT, importlib.metadata.version(PROJECT)
    except importlib.metadata.PackageNotFoundError:
        from qbench import __version__

        return PROJECT, __version__


def _register(loaded: _Loaded, plugin: object, name: str, dist: tuple[str | None, str | None]) -> None:
    try:
        loaded.pm.register(plugin, name=name)
    except Exception as exc:  # duplicate names, malformed hookimpls
        loaded.errors.append(PluginLoadError(name=name, distribution=dist[0], error=describe(exc)))
        return
    try:
        loaded.pm.check_pending()
    except Exception as exc:  # a `qbench_*` function matching no hookspec: likely a typo
        loaded.pm.unregister(name=name)
        loaded.errors.append(PluginLoadError(name=name, distribution=dist[0], error=describe(exc)))
        return
    loaded.dists[name] = dist


def _entry_points() -> Iterable[importlib.metadata.EntryPoint]:
    seen: set[tuple[str, str]] = set()
    for ep in importlib.metadata.entry_points(group=PROJECT):
        # The same distribution can be visible twice on sys.path (editable + site-packages).
        key = (ep.name, ep.value)
        if key not in seen:
            seen.add(key)
            yield ep


@functools.cache
def _load() -> _Loaded:
    pm = pluggy.PluginManager(PROJECT)
    pm.add_hookspecs(hookspecs)
    loaded = _Loaded(pm=pm)
    own = _own_distribution()
    for module_name in BUILTIN_HOOK_MODULES:
        try:
            module = importlib.import_module(module_name)
        except Exception as exc:
            loaded.errors.append(PluginLoadError(name=module_name, distribution=own[0], error=describe(exc)))
            continue
        _register(loaded, module, module_name, own)
    for ep in _entry_points():
        dist = (ep.dist.metadata["Name"], ep.dist.version) if ep.dist is not None else (None, None)
        if pm.is_blocked(ep.name) or pm.get_plugin(ep.name) is not None:
            loaded.errors.append(
                PluginLoadError(name=ep.name, distribution=dist[0], error="another plugin is already registered under this name")
            )
            continue
        try:
            plugin = ep.load()
        except (Exception, SystemExit) as exc:  # a plugin calling sys.exit on import is still just broken
            loaded.errors.append(PluginLoadError(name=ep.name, distribution=dist[0], error=f"import failed: {describe(exc)}"))
            continue
        _register(loaded, plugin, ep.name, dist)
    return loaded


def get_plugin_manager() -> pluggy.PluginManager:
    """The process-wide plugin manager, with built-ins and installed entry points registered."""
    return _load().pm


def plugin_load_errors() -> list[PluginLoadError]:
    """Plugins that failed to import or register (hook failures come from `discover_quantizers`)."""
    return list(_load().errors)


def reset_plugin_manager() -> None:
    """Forget the cached manager so the next call re-scans entry points (tests, long sessions)."""
    _load.cache_clear()


def _check_class(cls: object) -> str | None:
    """Why `cls` is not a usable quantizer class, or None."""
    if not isinstance(cls, type) or not issubclass(cls, Quantizer):
        return f"{cls!r} is not a subclass of qbench.quant.contract.Quantizer"
    for attr in ("name", "version"):
        if not isinstance(getattr(cls, attr, None), str) or not getattr(cls, attr):
            return f"{cls.__qualname__}.{attr} must be a non-empty string"
    config = getattr(cls, "Config", None)
    if not isinstance(config, type) or not issubclass(config, BaseModel):
        return f"{cls.__qualname__}.Config must be a pydantic BaseModel subclass"
    if getattr(cls, "__abstractmethods__", None):
        return f"{cls.__qualname__} does not implement {', '.join(sorted(cls.__abstractmethods__))}"
    return None


def discover_quantizers() -> tuple[dict[str, QuantizerEntry], list[PluginLoadError]]:
    """Every usable quantizer by name, plus every problem met while finding them.

    Problems include plugins that failed to import, hooks that raised, classes breaking the
    contract, and names offered by two distributions (then neither is usable, because a result
    must say unambiguously which code produced it).
    """
    loaded = _load()
    errors = list(loaded.errors)
    found: dict[str, list[QuantizerEntry]] = {}
    for impl in loaded.pm.hook.qbench_register_quantizers.get_hookimpls():
        plugin_name = impl.plugin_name
        dist_name, dist_version = loaded.dists.get(plugin_name, (None, None))
        try:
            classes = list(impl.function() or [])
        except Exception as exc:
            errors.append(
                PluginLoadError(name=plugin_name, distribution=dist_name, error=f"qbench_register_quantizers raised {describe(exc)}")
            )
            continue
        for cls in classes:
            problem = _check_class(cls)
            if problem is None:
                try:
                    schema = cls.Config.model_json_schema()
                except Exception as exc:
                    problem = f"{cls.__qualname__}.Config has no JSON schema: {describe(exc)}"
            if problem is not None:
                errors.append(PluginLoadError(name=plugin_name, distribution=dist_name, error=problem))
                continue
            entry = QuantizerEntry(
                name=cls.name,
                version=cls.version,
                description=(getattr(cls, "description", "") or "").strip(),
                needs_calibration=bool(cls.needs_calibration),
                plugin=plugin_name,
                distribution=dist_name,
                distribution_version=dist_version,
                config_schema=schema,
                cls=cls,
            )
            found.setdefault(cls.name, []).append(entry)
    entries: dict[str, QuantizerEntry] = {}
    for name, candidates in found.items():
        if len(candidates) == 1:
            entries[name] = candidates[0]
            continue
        owners = " and ".join(
            f"{c.distribution or c.plugin} {c.distribution_version or ''}".strip() for c in candidates
        )
        errors.append(
            PluginLoadError(
                name=candidates[-1].plugin,
                distribution=candidates[-1].distribution,
                error=f"quantizer name '{name}' is provided by both {owners}; uninstall one of them",
            )
        )
    return dict(sorted(entries.items())), errors


def get_quantizer(name: str) -> type[Quantizer]:
    """The quantizer class registered under `name`; unknown names list what is available."""
    entries, errors = discover_quantizers()
    entry = entries.get(name)
    if entry is not None:
        return entry.cls
    available = ", ".join(entries) or "none installed"
    msg = f"unknown quantizer '{name}'; available: {available}"
    related = [e for e in errors if f"'{name}'" in e.error or e.name == name]
    if related:
        msg += "; " + "; ".join(str(e) for e in related)
    elif errors:
        msg += f"; {len(errors)} plugin problem(s), see `qbench plugins`"
    raise UnknownQuantizerError(msg)


def entry_for_class(cls: type[Quantizer]) -> QuantizerEntry | None:
    """The registry entry of a quantizer class, if some plugin registered exactly this class."""
    entries, _ = discover_quantizers()
    entry = entries.get(getattr(cls, "name", ""))
    return entry if entry is not None and entry.cls is cls else None
