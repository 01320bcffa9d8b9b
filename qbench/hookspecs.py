"""The hooks a qbench plugin may implement (pluggy, project name "qbench").

A plugin is an importable module (or object) exposing functions decorated with `hookimpl`,
advertised to qbench through an entry point in the `qbench` group, e.g. in its pyproject.toml:

    [project.entry-points.qbench]
    rtn = "qbench_rtn"

qbench's own built-in hook modules are registered through exactly the same hooks, so a
third-party plugin can do anything a built-in one can.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from qbench.embedded.devices import DeviceProfile
    from qbench.quant.contract import Quantizer

hookspec = pluggy.HookspecMarker("qbench")
hookimpl = pluggy.HookimplMarker("qbench")


@hookspec
def qbench_register_quantizers() -> list[type[Quantizer]]:
    """Return the `Quantizer` subclasses this plugin provides.

    Each class must set `name` (unique across every installed plugin: two distributions
    offering the same name are reported as a conflict and neither is usable), `version`,
    `description`, a pydantic `Config` with `extra="forbid"`, and `needs_calibration`.
    Keep this hook cheap and side-effect free: it runs whenever qbench lists or looks up
    quantizers. An exception raised here is reported under the plugin's name and does not
    prevent other plugins from loading.
    """


@hookspec
def qbench_register_device_profiles() -> list[DeviceProfile]:
    """Return `qbench.embedded.devices.DeviceProfile`s: embedded targets `qbench run --device` and
    `qbench fit` can budget for (RAM, storage, whether weights execute in place from flash,
    and the real part the profile stands for, with a citation).

    qbench's own ladder (`qbench/embedded/ladder.py`) is registered through this same hook. A
    name offered twice is reported as a conflict naming both plugins.
    """
