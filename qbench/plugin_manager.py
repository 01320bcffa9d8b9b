"""Finding plugins: one pluggy `PluginManager("qbench")` for the whole process.

Built-in hook modules and third-party distributions go through the same hooks, and every hook's
results are collected by one function, `collect_hook_results` (quantizers here, device profiles
in `qbench.embedded.devices`). Entry points (group `qbench`) are loaded one by one rather than
with pluggy's `load_setuptools_entrypoints`, so that one broken plugin (an import error, a hook
that raises, a malformed quantizer class or device profile) is reported as a `PluginLoadError`
under its own name while every other plugin keeps working: a benchmark harness must not lose
all quantizers, or every `qbench run`, to one bad install.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import pluggy
from pydantic import BaseModel, ConfigDict, Field

from qbench import __version__, hookspecs
from qbench.errors import QBenchError, describe
from qbench.quant.contract import Quantizer

PROJECT = "qbench"

#: qbench's own hook modules, registered before entry points through the same hooks.
BUILTIN_HOOK_MODULES: tuple[str, ...] = ("qbench.embedded.ladder", "qbench.checkpoints.builtin_cards",
                                         "qbench.quant.builtin_activation_schemes")


class PluginLoadError(BaseModel):
    """A plugin that could not be (fully) used: its entry-point name, distribution, and why."""

    name: str
    distribution: str | None = None
    error: str

    def __str__(self) -> str:
        where = f" ({self.distribution})" if self.distribution else ""
        return f"plugin '{self.name}'{where}: {self.error}"


class PluginOrigin(BaseModel):
    """The plugin a hook result came from, as `collect_hook_results` hands it to `accept`."""

    model_config = ConfigDict(frozen=True)

    #: entry-point name (or built-in module name) the plugin is registered under
    plugin: str
    distribution: str | None = None
    distribution_version: str | None = None
    #: registered from `BUILTIN_HOOK_MODULES`: part of qbench itself
    builtin: bool = False

    def __str__(self) -> str:
        if not self.distribution:
            return f"plugin '{self.plugin}'"
        release = f"{self.distribution} {self.distribution_version}" if self.distribution_version else self.distribution
        return f"plugin '{self.plugin}' ({release})"


class PluginContractError(QBenchError, TypeError):
    """Something a hook returned breaks that hook's contract; the message says what and why."""


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
    #: a `Quantizer` subclass, or an `ActivationQuantizer` one for an activation scheme
    cls: type = Field(exclude=True, repr=False)


class UnknownQuantizerError(QBenchError, LookupError):
    """`get_quantizer` was asked for a name no loaded plugin provides."""


@dataclass
class _Loaded:
    pm: pluggy.PluginManager
    errors: list[PluginLoadError] = field(default_factory=list)
    origins: dict[str, PluginOrigin] = field(default_factory=dict)
    #: hook name -> (the implementations collected, what `collect_hook_results` made of them)
    collected: dict[str, tuple[tuple[Any, ...], tuple[dict[str, Any], list[PluginLoadError]]]] = field(default_factory=dict)


def _own_version() -> str:
    try:
        return importlib.metadata.version(PROJECT)
    except importlib.metadata.PackageNotFoundError:  # running from a checkout that is not installed
        return __version__


def _register(loaded: _Loaded, plugin: object, origin: PluginOrigin) -> None:
    name = origin.plugin
    try:
        loaded.pm.register(plugin, name=name)
    except Exception as exc:  # duplicate names, malformed hookimpls
        loaded.errors.append(PluginLoadError(name=name, distribution=origin.distribution, error=describe(exc)))
        return
    try:
        loaded.pm.check_pending()
    except Exception as exc:  # a `qbench_*` function matching no hookspec: likely a typo
        loaded.pm.unregister(name=name)
        loaded.errors.append(PluginLoadError(name=name, distribution=origin.distribution, error=describe(exc)))
        return
    loaded.origins[name] = origin


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
    own_version = _own_version()
    for module_name in BUILTIN_HOOK_MODULES:
        origin = PluginOrigin(plugin=module_name, distribution=PROJECT, distribution_version=own_version, builtin=True)
        try:
            module = importlib.import_module(module_name)
        except Exception as exc:
            loaded.errors.append(PluginLoadError(name=module_name, distribution=PROJECT, error=describe(exc)))
            continue
        _register(loaded, module, origin)
    for ep in _entry_points():
        origin = PluginOrigin(
            plugin=ep.name,
            distribution=ep.dist.metadata["Name"] if ep.dist is not None else None,
            distribution_version=ep.dist.version if ep.dist is not None else None,
        )
        if pm.is_blocked(ep.name) or pm.get_plugin(ep.name) is not None:
            loaded.errors.append(
                PluginLoadError(name=ep.name, distribution=origin.distribution, error="another plugin is already registered under this name")
            )
            continue
        try:
            plugin = ep.load()
        except (Exception, SystemExit) as exc:  # a plugin calling sys.exit on import is still just broken
            loaded.errors.append(PluginLoadError(name=ep.name, distribution=origin.distribution, error=f"import failed: {describe(exc)}"))
            continue
        _register(loaded, plugin, origin)
    return loaded


def get_plugin_manager() -> pluggy.PluginManager:
    """The process-wide plugin manager, with built-ins and installed entry points registered."""
    return _load().pm


def plugin_load_errors() -> list[PluginLoadError]:
    """Plugins that failed to import or register (hook failures come from `collect_hook_results`)."""
    return list(_load().errors)


def reset_plugin_manager() -> None:
    """Forget the cached manager and everything collected through it, so the next call re-scans
    entry points (tests, long sessions)."""
    _load.cache_clear()


class _Named(Protocol):
    name: str


Item = TypeVar("Item", bound=_Named)


def collect_hook_results(
    hook_name: str, kind: str, accept: Callable[[object, PluginOrigin], Item]
) -> tuple[dict[str, Item], list[PluginLoadError]]:
    """Everything the plugins' `hook_name` implementations returned, by name, and every problem.

    Each implementation returns a list (None counts as empty). `accept(item, origin)` turns each
    element into what the caller keeps, which has a `name`, or raises `PluginContractError`
    saying why the element is unusable. One plugin never costs another its results: a hook that
    raises, one that returns something other than a list, and each element `accept` rejects are
    reported under that plugin's name, and collection goes on.

    A name returned by two plugins is reported naming both (`kind` says what the name is, e.g.
    "quantizer" or "device"). If one of them is qbench's own (`BUILTIN_HOOK_MODULES`), that one
    is kept, so an install cannot silently redefine a board qbench ships; otherwise neither is
    used, because a result must say unambiguously which code or which board produced it.

    Collected once per process (again only if plugins are registered or unregistered in the
    meantime) and forgotten by `reset_plugin_manager`. Import and registration failures are
    not repeated here: they are `plugin_load_errors()`.
    """
    loaded = _load()
    impls = getattr(loaded.pm.hook, hook_name).get_hookimpls()
    snapshot = tuple((impl.plugin_name, impl.function) for impl in impls)
    cached = loaded.collected.get(hook_name)
    if cached is not None and cached[0] == snapshot:
        entries, errors = cached[1]
        return dict(entries), list(errors)

    errors: list[PluginLoadError] = []
    found: dict[str, list[tuple[Item, PluginOrigin]]] = {}
    for impl in impls:
        origin = loaded.origins.get(impl.plugin_name) or PluginOrigin(plugin=impl.plugin_name)

        def report(problem: str, origin: PluginOrigin = origin) -> None:
            errors.append(PluginLoadError(name=origin.plugin, distribution=origin.distribution, error=problem))

        try:
            returned = impl.function()
        except (Exception, SystemExit) as exc:
            report(f"{hook_name} raised {describe(exc)}")
            continue
        if returned is None:
            returned = []
        if not isinstance(returned, (list, tuple)):
            report(f"{hook_name} returned a {type(returned).__name__}, not a list")
            continue
        for element in returned:
            try:
                item = accept(element, origin)
            except PluginContractError as exc:
                report(str(exc))
                continue
            except Exception as exc:  # an element odd enough to break the check itself
                report(describe(exc))
                continue
            found.setdefault(item.name, []).append((item, origin))

    entries: dict[str, Item] = {}
    for name, candidates in found.items():
        if len(candidates) == 1:
            entries[name] = candidates[0][0]
            continue
        owners = " and ".join(str(origin) for _, origin in candidates)
        builtin = [(item, origin) for item, origin in candidates if origin.builtin]
        if len(builtin) == 1:
            entries[name] = builtin[0][0]
            for _, origin in candidates:
                if not origin.builtin:
                    errors.append(PluginLoadError(name=origin.plugin, distribution=origin.distribution,
                                                  error=f"{kind} name '{name}' is provided by both {owners}; qbench's own is used"))
            continue
        last = candidates[-1][1]
        errors.append(PluginLoadError(name=last.plugin, distribution=last.distribution,
                                      error=f"{kind} name '{name}' is provided by both {owners}; uninstall one of them"))
    loaded.collected[hook_name] = (snapshot, (entries, errors))
    return dict(entries), list(errors)


def _quantizer_entry(cls: object, origin: PluginOrigin, base: type = Quantizer,
                     base_name: str = "qbench.Quantizer") -> QuantizerEntry:
    """The registry entry of a class a plugin registered, or `PluginContractError` saying why not."""
    if not isinstance(cls, type) or not issubclass(cls, base):
        raise PluginContractError(f"{cls!r} is not a subclass of {base_name}")
    name = cls.__qualname__
    if not isinstance(getattr(cls, "name", None), str) or not cls.name:
        raise PluginContractError(f"{name}.name must be a non-empty string")
    # A class without its own version is versioned by the distribution that ships it.
    version = cls.version if cls.version is not None else origin.distribution_version
    if version is None:
        raise PluginContractError(f"{name} sets no version and no distribution ships it: set {name}.version")
    if not isinstance(version, str) or not version:
        raise PluginContractError(f"{name}.version must be a non-empty string")
    config = cls.Config
    if not isinstance(config, type) or not issubclass(config, BaseModel):
        raise PluginContractError(f"{name}.Config must be a pydantic BaseModel subclass")
    if config.model_config.get("extra") != "forbid":
        # else a typo in `--set` would silently run the defaults
        raise PluginContractError(f"{name}.Config must forbid unknown keys: derive it from qbench.QuantizerConfig")
    if getattr(cls, "__abstractmethods__", None):
        raise PluginContractError(f"{name} does not implement {', '.join(sorted(cls.__abstractmethods__))}")
    try:
        schema = config.model_json_schema()
    except Exception as exc:
        raise PluginContractError(f"{name}.Config has no JSON schema: {describe(exc)}") from exc
    return QuantizerEntry(
        name=cls.name,
        version=version,
        description=(getattr(cls, "description", "") or "").strip(),
        needs_calibration=bool(getattr(cls, "needs_calibration", False)),
        plugin=origin.plugin,
        distribution=origin.distribution,
        distribution_version=origin.distribution_version,
        config_schema=schema,
        cls=cls,
    )


def discover_quantizers() -> tuple[dict[str, QuantizerEntry], list[PluginLoadError]]:
    """Every usable quantizer by name, plus every problem met while finding them.

    Problems include plugins that failed to import, hooks that raised, classes breaking the
    contract, and names offered by two distributions (then neither is usable, because a result
    must say unambiguously which code produced it; see `collect_hook_results`).
    """
    entries, errors = collect_hook_results("qbench_register_quantizers", "quantizer", _quantizer_entry)
    return dict(sorted(entries.items())), plugin_load_errors() + errors


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


class UnknownActivationSchemeError(QBenchError, LookupError):
    """`get_activation_scheme` was asked for a name no loaded plugin provides."""


def _activation_entry(cls: object, origin: PluginOrigin) -> QuantizerEntry:
    from qbench.quant.activation_scheme import ActivationQuantizer

    return _quantizer_entry(cls, origin, ActivationQuantizer, "qbench.quant.activation_scheme.ActivationQuantizer")


def discover_activation_schemes() -> tuple[dict[str, QuantizerEntry], list[PluginLoadError]]:
    """Every usable activation scheme by name, plus every problem met (as `discover_quantizers`)."""
    entries, errors = collect_hook_results("qbench_register_activation_schemes", "activation scheme", _activation_entry)
    return dict(sorted(entries.items())), plugin_load_errors() + errors


def get_activation_scheme(name: str) -> QuantizerEntry:
    """The activation scheme registered under `name`; unknown names list what is available."""
    entries, errors = discover_activation_schemes()
    if name in entries:
        return entries[name]
    msg = f"unknown activation scheme '{name}'; available: {', '.join(entries) or 'none installed'}"
    related = [e for e in errors if f"'{name}'" in e.error or e.name == name]
    if related:
        msg += "; " + "; ".join(str(e) for e in related)
    raise UnknownActivationSchemeError(msg)
