"""The child process a quantizer plugin runs in: `python -m qbench.quant.plugin_worker`.

It reads requests on stdin and answers on stdout in `qbench.quant.wire`'s format. This is the
only process where plugin code is imported. It gets float weights and calibration statistics,
one layer at a time, and answers with the plugin's `QuantizedTensor` as plain arrays; it never
sees the audio, the references, the scores or the result file, which live in the harness's
process (`qbench.quant.plugin_process` starts and talks to this one).

Requests (`op`): `open` (plugin name and settings: discover it, validate the settings, answer
with what it is), `quantize` (one layer's weight and, for calibrated plugins, `xtx`/`n_rows`, and `dxtx`
for one that wants float inputs),
`device_profiles` (the profiles every installed plugin registers, as data), `open_activation`
(an activation scheme's name and settings: answer with its declared `ActivationScheme`),
`calibrate_activation` (one layer input's `ActivationStats`: answer with its static scale),
`close`.
"""

from __future__ import annotations

import os
import sys
from typing import Any, BinaryIO

import numpy as np
from threadpoolctl import threadpool_limits

from qbench.errors import QBenchError, describe, one_line
from qbench.quant.contract import TENSOR_ARRAYS, LayerStats, QuantizedTensor, Quantizer
from qbench.quant.wire import decode_message, encode_message


def _protocol_streams() -> tuple[BinaryIO, BinaryIO]:
    """Private copies of stdin/stdout for the protocol; a plugin's prints go to stderr and its
    reads of stdin see an empty file, so neither can corrupt a message."""
    proto_in = os.fdopen(os.dup(0), "rb", buffering=0)
    proto_out = os.fdopen(os.dup(1), "wb", buffering=0)
    os.dup2(2, 1)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    return proto_in, proto_out


def _read_exact(stream: BinaryIO, n: int) -> bytearray:
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        k = stream.readinto(view[got:])
        if not k:
            raise EOFError("the harness closed the connection")
        got += k
    return buf


def _open(header: dict[str, Any]) -> tuple[Quantizer, dict[str, Any]]:
    from qbench.plugin_manager import discover_quantizers, get_quantizer
    from qbench.quant.settings import config_from_values

    name = header["plugin"]
    cls = get_quantizer(name)
    entry = discover_quantizers()[0][name]
    config = config_from_values(header.get("settings") or {}, cls.Config, plugin=name)
    quantizer = cls(config)
    info = {"name": entry.name, "version": entry.version, "distribution": entry.distribution,
            "distribution_version": entry.distribution_version, "needs_calibration": bool(cls.needs_calibration),
            "wants_float_inputs": bool(quantizer.wants_float_inputs), "config": config.model_dump(mode="json")}
    return quantizer, info


def _quantize(quantizer: Quantizer, header: dict[str, Any], arrays: dict[str, np.ndarray]) -> tuple[dict, dict]:
    stats = None
    if "xtx" in arrays:
        stats = LayerStats(xtx=arrays["xtx"], n_rows=int(header["n_rows"]), dxtx=arrays.get("dxtx"))
    qt = quantizer.quantize(arrays["weight"], stats)
    if not isinstance(qt, QuantizedTensor):
        raise TypeError(f"quantize returned {type(qt).__name__}, not a QuantizedTensor")
    fields = {"code_bits": qt.code_bits, "group_size": qt.group_size, "signed": qt.signed, "packing": qt.packing,
              "lowrank_dtype": qt.lowrank_dtype, "vector_dim": qt.vector_dim}
    out = {name: np.asarray(getattr(qt, name)) for name in TENSOR_ARRAYS if getattr(qt, name) is not None}
    return {"ok": True, "tensor": fields}, out


def _open_activation(header: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    import re

    from qbench.plugin_manager import discover_activation_schemes, get_activation_scheme
    from qbench.quant.activation_scheme import ActivationScheme
    from qbench.quant.settings import config_from_values

    name, settings = header["scheme"], dict(header.get("settings") or {})
    entries, _ = discover_activation_schemes()
    shorthand = re.fullmatch(r"(.+?)(\d+)", name)
    if name not in entries and shorthand and shorthand.group(1) in entries and "bits" not in settings:
        # `absmax8`: the `absmax` scheme at 8 bits
        name, settings["bits"] = shorthand.group(1), int(shorthand.group(2))
    entry = get_activation_scheme(name)
    config = config_from_values(settings, entry.cls.Config, plugin=name)
    scheme_plugin = entry.cls(config)
    declared = scheme_plugin.scheme()
    if not isinstance(declared, ActivationScheme):
        raise TypeError(f"scheme() returned {type(declared).__name__}, not an ActivationScheme")
    info = {"name": entry.name, "version": entry.version, "distribution": entry.distribution,
            "distribution_version": entry.distribution_version, "config": config.model_dump(mode="json"),
            "scheme": declared.model_dump(mode="json")}
    return scheme_plugin, info


def _calibrate_activation(scheme_plugin: Any, header: dict[str, Any], arrays: dict[str, np.ndarray]) -> dict[str, Any]:
    from qbench.quant.activation_scheme import ActivationStats, StaticActivationScale

    stats = ActivationStats(n_values=int(header["n_values"]), min=float(header["min"]), max=float(header["max"]),
                            absmax=float(header["absmax"]), histogram=arrays["histogram"],
                            abs_histogram=arrays["abs_histogram"])
    scale = scheme_plugin.calibrate(str(header["layer"]), stats)
    if not isinstance(scale, StaticActivationScale):
        raise TypeError(f"calibrate returned {type(scale).__name__}, not a StaticActivationScale")
    return {"ok": True, "scale": scale.model_dump(mode="json")}


def _device_profiles() -> dict[str, Any]:
    from qbench.embedded.devices import discover_device_profiles

    profiles, errors = discover_device_profiles()
    return {"ok": True, "profiles": [p.model_dump(mode="json") for p in profiles.values()], "errors": [str(e) for e in errors]}


def serve(proto_in: BinaryIO, proto_out: BinaryIO) -> None:
    quantizer: Quantizer | None = None
    scheme_plugin: Any = None
    while True:
        try:
            header, arrays = decode_message(lambda n: _read_exact(proto_in, n))
        except EOFError:
            return
        op = header.get("op")
        if op == "close":
            return
        try:
            if op == "open":
                quantizer, info = _open(header)
                chunks = encode_message({"ok": True, **info})
            elif op == "quantize":
                if quantizer is None:
                    raise RuntimeError("no plugin opened")
                chunks = encode_message(*_quantize(quantizer, header, arrays))
            elif op == "open_activation":
                scheme_plugin, info = _open_activation(header)
                chunks = encode_message({"ok": True, **info})
            elif op == "calibrate_activation":
                if scheme_plugin is None:
                    raise RuntimeError("no activation scheme opened")
                chunks = encode_message(_calibrate_activation(scheme_plugin, header, arrays))
            elif op == "device_profiles":
                chunks = encode_message(_device_profiles())
            else:
                raise RuntimeError(f"unknown request {op!r}")
        except QBenchError as exc:  # qbench's own words for the user (unknown plugin, bad setting)
            chunks = encode_message({"ok": False, "error": one_line(exc), "worded": True})
        except BaseException as exc:  # noqa: BLE001 - a plugin's SystemExit or KeyboardInterrupt is a failure too
            chunks = encode_message({"ok": False, "error": describe(exc)})
        for chunk in chunks:
            proto_out.write(chunk)


def main() -> None:
    proto_in, proto_out = _protocol_streams()
    # one BLAS thread: a plugin's own linear algebra then rounds the same on any machine size
    with threadpool_limits(limits=1, user_api="blas"):
        serve(proto_in, proto_out)


if __name__ == "__main__":
    main()
    sys.exit(0)
