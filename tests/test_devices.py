"""Device profiles: the builtin ladder, lookups, and profiles added by a third-party plugin."""

from __future__ import annotations

import pytest

from qbench.embedded.devices import DEFAULT_DEVICE, DeviceProfile, UnknownDeviceError, get_device_profile, get_device_profiles
from qbench.hookspecs import hookimpl
from qbench.plugin_manager import get_plugin_manager, reset_plugin_manager


@pytest.fixture
def fresh_plugins():
    reset_plugin_manager()
    yield get_plugin_manager()
    reset_plugin_manager()


def test_builtin_ladder_cites_real_parts():
    profiles = get_device_profiles()
    for name in ("stm32h743", "esp32-s3", "pi-zero-2w", "jetson-nano-4gb"):
        assert name in profiles
    assert DEFAULT_DEVICE in profiles
    assert profiles["esp32-s3"].ram_bytes == (8 * 1024 + 512) * 1024 and profiles["esp32-s3"].storage_bytes == 16 * 2**20
    assert profiles["esp32-s3"].weights_execute_in_place and not profiles["pi-zero-2w"].weights_execute_in_place
    assert profiles["pi-zero-2w"].ram_bytes == 512 * 2**20
    rams = [p.ram_bytes for p in profiles.values()]
    assert rams == sorted(rams)
    assert all(p.part and p.note for p in profiles.values())


def test_unknown_device_lists_the_registered_ones():
    with pytest.raises(UnknownDeviceError) as err:
        get_device_profile("esp8266")
    assert "esp8266" in str(err.value) and "esp32-s3" in str(err.value) and "pi-zero-2w" in str(err.value)


class _ThirdParty:
    @hookimpl
    def qbench_register_device_profiles(self):
        return [DeviceProfile(name="rp2040", ram_bytes=264 * 1024, storage_bytes=2 * 2**20,
                              weights_execute_in_place=True, part="Raspberry Pi RP2040", note="RP2040 datasheet: 264 KB SRAM")]


def test_a_plugin_adds_a_device(fresh_plugins):
    fresh_plugins.register(_ThirdParty(), name="third-party-boards")
    profiles = get_device_profiles()
    assert profiles["rp2040"].part == "Raspberry Pi RP2040"
    assert next(iter(profiles)) == "rp2040"  # smallest RAM first
    assert "esp32-s3" in profiles


class _Clash:
    @hookimpl
    def qbench_register_device_profiles(self):
        return [DeviceProfile(name="esp32-s3", ram_bytes=1, storage_bytes=1, part="fake")]


def test_a_duplicate_device_name_is_an_error_naming_both(fresh_plugins):
    fresh_plugins.register(_Clash(), name="clash")
    with pytest.raises(ValueError, match="esp32-s3.*qbench.embedded.ladder.*clash"):
        get_device_profiles()
