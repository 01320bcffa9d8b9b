"""Looking up embedded targets: every `DeviceProfile` registered by qbench or a plugin.

Profiles are registered through the `qbench_register_device_profiles` hook (qbench's own ladder
lives in `qbench.embedded.ladder`), so a third-party plugin can add a board without touching
qbench. They are collected like quantizers (`qbench.plugin_manager.collect_hook_results`): a
plugin whose hook raises or returns something else is reported under its name and every other
profile stays usable. Whether a model fits is decided by `qbench.embedded.memory`.
"""

from __future__ import annotations

from qbench.embedded.profile import (
    DeviceProfile as DeviceProfile,  # also importable from here
)
from qbench.errors import QBenchError
from qbench.plugin_manager import (
    PluginContractError,
    PluginLoadError,
    PluginOrigin,
    collect_hook_results,
    plugin_load_errors,
)

#: `qbench run` without `--device`: see `qbench.embedded.ladder` for why this rung.
DEFAULT_DEVICE = "pi-zero-2w"
#: `--device none`: run without any budget (a workstation baseline).
NO_DEVICE = "none"


class UnknownDeviceError(QBenchError, LookupError):
    """A device name no registered profile has."""


def _accept_profile(item: object, origin: PluginOrigin) -> DeviceProfile:
    if not isinstance(item, DeviceProfile):
        raise PluginContractError(f"{item!r} is not a qbench.embedded.profile.DeviceProfile")
    return item


def discover_device_profiles() -> tuple[dict[str, DeviceProfile], list[PluginLoadError]]:
    """Every usable profile by name, smallest RAM first, plus every plugin problem met.

    A name registered twice is reported naming both plugins (two boards under one name would
    make results ambiguous): qbench's own ladder keeps its names, and a name two third-party
    plugins both register is usable from neither.
    """
    found, errors = collect_hook_results("qbench_register_device_profiles", "device", _accept_profile)
    profiles = dict(sorted(found.items(), key=lambda kv: (kv[1].ram_bytes, kv[0])))
    return profiles, plugin_load_errors() + errors


def get_device_profiles() -> dict[str, DeviceProfile]:
    """Every usable profile by name, smallest RAM first (built-ins and plugins alike)."""
    return discover_device_profiles()[0]


def get_device_profile(name: str) -> DeviceProfile:
    """The profile called `name`; an unknown name lists the registered ones."""
    profiles, errors = discover_device_profiles()
    if name in profiles:
        return profiles[name]
    msg = f"unknown device '{name}'; registered: {', '.join(profiles) or 'none'}"
    related = [e for e in errors if f"'{name}'" in e.error]
    if related:
        msg += "; " + "; ".join(str(e) for e in related)
    raise UnknownDeviceError(msg)
