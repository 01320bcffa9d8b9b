"""Embedded targets as data: how much RAM and storage a quantized model may use on a real part.

Profiles are registered through the `qbench_register_device_profiles` hook (qbench's own ladder
lives in `qbench.embedded.ladder`), so a third-party plugin can add a board without touching
qbench. Whether a model fits is decided by `qbench.embedded.memory` from these numbers.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from qbench.errors import QBenchError

#: `qbench run` without `--device`: see `qbench.embedded.ladder` for why this rung.
DEFAULT_DEVICE = "pi-zero-2w"
#: `--device none`: run without any budget (a workstation baseline).
NO_DEVICE = "none"


class DeviceProfile(BaseModel):
    """One emulated target: its memory budget and the real part whose datasheet it follows."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(description="short id used on the command line, e.g. esp32-s3")
    ram_bytes: int = Field(gt=0, description="RAM usable by the model (weights not in place + working memory)")
    storage_bytes: int = Field(gt=0, description="flash / SD / eMMC the weights are stored in")
    weights_execute_in_place: bool = Field(
        False, description="weights are read straight from memory-mapped flash (XIP) and need no RAM copy"
    )
    part: str = Field(description="the real part or board this profile stands for")
    note: str = Field("", description="where the numbers come from (datasheet figure) and what was left out")


class UnknownDeviceError(QBenchError, LookupError):
    """A device name no registered profile has."""


def get_device_profiles() -> dict[str, DeviceProfile]:
    """Every registered profile by name, smallest RAM first (built-ins and plugins alike).

    A hook returning something that is not a `DeviceProfile`, or a name registered twice, is
    an error naming the plugin: two boards under one name would make results ambiguous.
    """
    from qbench.plugin_manager import get_plugin_manager

    pm = get_plugin_manager()
    found: dict[str, tuple[DeviceProfile, str]] = {}
    for impl in pm.hook.qbench_register_device_profiles.get_hookimpls():
        for profile in impl.function() or []:
            if not isinstance(profile, DeviceProfile):
                raise TypeError(f"plugin '{impl.plugin_name}' registered {profile!r}, not a qbench.embedded.devices.DeviceProfile")
            if profile.name in found:
                raise ValueError(
                    f"device '{profile.name}' is registered by both '{found[profile.name][1]}' and '{impl.plugin_name}'"
                )
            found[profile.name] = (profile, impl.plugin_name)
    return {name: p for name, (p, _) in sorted(found.items(), key=lambda kv: (kv[1][0].ram_bytes, kv[0]))}


def get_device_profile(name: str) -> DeviceProfile:
    """The profile called `name`; an unknown name lists the registered ones."""
    profiles = get_device_profiles()
    if name not in profiles:
        raise UnknownDeviceError(f"unknown device '{name}'; registered: {', '.join(profiles) or 'none'}")
    return profiles[name]
