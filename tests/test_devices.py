"""Device profiles: the builtin ladder, lookups, profiles added by a third-party plugin, and\nplugins that break (reported by name while every other profile and command keeps working)."""

from __future__ import annotations

import json
import re

import pytest

from qbench.cli import main
from qbench.embedded.devices import (
    DEFAULT_DEVICE,
    DeviceProfile,
    UnknownDeviceError,
    discover_device_profiles,
    get_device_profile,
    get_device_profiles,
)
from qbench.embedded.ladder import BUILTIN_DEVICES
from qbench.hookspecs import hookimpl
from qbench.plugin_manager import get_plugin_manager, reset_plugin_manager

BUILTIN_NAMES = tuple(p.name for p in sorted(BUILTIN_DEVICES, key=lambda p: p.ram_bytes))


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
        return [DeviceProfile(name="esp32-s3", ram_bytes=1, storage_bytes=1, part="fake"),
                DeviceProfile(name="board-x", ram_bytes=2, storage_bytes=2, part="fake x")]


class _ClashToo:
    @hookimpl
    def qbench_register_device_profiles(self):
        return [DeviceProfile(name="board-x", ram_bytes=3, storage_bytes=3, part="fake x too")]


def test_a_duplicate_device_name_is_reported_naming_both_and_the_ladder_keeps_its_own(fresh_plugins):
    """Rule: a name qbench's ladder registers keeps the ladder's profile; a name two third-party
    plugins register is used from neither. Either way the report names both plugins."""
    fresh_plugins.register(_Clash(), name="clash")
    fresh_plugins.register(_ClashToo(), name="clash-too")
    profiles, errors = discover_device_profiles()
    assert profiles["esp32-s3"].part.startswith("Espressif") and profiles["esp32-s3"].ram_bytes > 1
    assert get_device_profile("esp32-s3") == profiles["esp32-s3"]
    assert "board-x" not in profiles and "pi-zero-2w" in profiles
    by_device = {name: [e for e in errors if f"'{name}'" in e.error] for name in ("esp32-s3", "board-x")}
    (esp,) = by_device["esp32-s3"]
    assert esp.name == "clash" and re.search("esp32-s3.*qbench.embedded.ladder.*clash.*qbench's own is used", esp.error)
    (board,) = by_device["board-x"]
    assert "'clash'" in board.error and "'clash-too'" in board.error and "uninstall one" in board.error
    with pytest.raises(UnknownDeviceError, match="unknown device 'board-x'.*clash.*clash-too"):
        get_device_profile("board-x")


class _Broken:
    @hookimpl
    def qbench_register_device_profiles(self):
        raise RuntimeError("datasheet not found")


class _WrongType:
    @hookimpl
    def qbench_register_device_profiles(self):
        return [{"name": "esp8266", "ram_bytes": 80 * 1024}, DeviceProfile(name="ok-board", ram_bytes=5, storage_bytes=5, part="ok")]


class _NotAList:
    @hookimpl
    def qbench_register_device_profiles(self):
        return DeviceProfile(name="lonely", ram_bytes=5, storage_bytes=5, part="one, not in a list")


def test_a_broken_device_plugin_is_reported_by_name_and_nothing_else_breaks(fresh_plugins, capsys):
    fresh_plugins.register(_Broken(), name="broken-boards")
    fresh_plugins.register(_WrongType(), name="dict-boards")
    fresh_plugins.register(_NotAList(), name="lonely-board")
    profiles, errors = discover_device_profiles()
    assert list(profiles) == ["ok-board", *BUILTIN_NAMES]  # the ladder, and the good half of dict-boards
    by_plugin = {e.name: e.error for e in errors}
    assert by_plugin == {
        "broken-boards": "qbench_register_device_profiles raised RuntimeError: datasheet not found",
        "dict-boards": by_plugin["dict-boards"],
        "lonely-board": "qbench_register_device_profiles returned a DeviceProfile, not a list",
    }
    assert "esp8266" in by_plugin["dict-boards"] and "not a qbench.embedded.profile.DeviceProfile" in by_plugin["dict-boards"]
    assert get_device_profiles() == profiles
    assert get_device_profile("esp32-s3").part.startswith("Espressif")
    assert get_device_profile(DEFAULT_DEVICE).name == DEFAULT_DEVICE

    assert main(["plugins"]) == 0
    captured = capsys.readouterr()
    printed = " ".join((captured.out + captured.err).split())
    assert "plugin error: plugin 'broken-boards': qbench_register_device_profiles raised RuntimeError: datasheet not found" in printed
    assert "plugin 'lonely-board'" in printed and "rtn" in printed


def test_qbench_fit_still_works_beside_a_broken_device_plugin(fresh_plugins, tiny_en, capsys):
    fresh_plugins.register(_Broken(), name="broken-boards")
    assert main(["fit", "--json"]) == 0
    rows = {d["profile"]["name"]: d for d in json.loads(capsys.readouterr().out)["devices"]}
    assert list(rows) == list(BUILTIN_NAMES)
    assert main(["fit", "--device", "esp32-s3"]) == 0
    assert "esp32-s3" in capsys.readouterr().out


def test_profiles_are_collected_once_per_process(fresh_plugins):
    calls = []

    class Counting:
        @hookimpl
        def qbench_register_device_profiles(self):
            calls.append(1)
            return []

    fresh_plugins.register(Counting(), name="counting")
    get_device_profiles()
    get_device_profile("esp32-s3")
    discover_device_profiles()
    assert len(calls) == 1
    reset_plugin_manager()
    get_plugin_manager().register(Counting(), name="counting")
    get_device_profiles()
    assert len(calls) == 2
