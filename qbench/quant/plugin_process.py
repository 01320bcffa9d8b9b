"""A quantizer plugin in its own process, as the harness sees it: `PluginProcess`.

`with PluginProcess("gptq", {"bits": 4}) as quantizer:` starts `qbench.quant.plugin_worker` and
gives an object with the `Quantizer` interface (`name`, `version`, `config`,
`needs_calibration`, `quantize(weight, stats)`), so `quantize_model` drives it as it drives an
in-process quantizer. Each layer's weight (and statistics) goes to the child and its
`QuantizedTensor` comes back as plain arrays (`qbench.quant.wire`, no pickle), which the harness
validates itself before packing.

What this isolates, and what it does not:
- the plugin cannot touch the score or the result file: scoring, packing and writing happen
  in this process, which never imports plugin code;
- it cannot see the audio, the references, this process's environment (the child gets a
  scrubbed one: PATH, locale, a temporary HOME) or the run's working directory (it starts in
  a temporary one, removed afterwards);
- a crash, any exit (`SystemExit` included), a hang (`timeout` per request) or a malformed
  tensor is one `PluginProcessError` line naming the plugin (and `quantize_model` adds the layer);
- it is NOT a sandbox against a determined attacker: the child runs as the same user and can
  read and write what that user can. What a result claims, though, is computed here from the
  returned codes and re-checked by `qbench verify`, which re-quantizes and compares digests.
"""

from __future__ import annotations

import os
import select
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict

from qbench.embedded.profile import DeviceProfile
from qbench.errors import QBenchError, one_line
from qbench.quant.contract import TENSOR_ARRAYS, LayerStats, QuantizedTensor
from qbench.quant.wire import WireError, decode_message, encode_message

#: seconds a plugin may take to answer one request (one layer); `--plugin-timeout` overrides
DEFAULT_TIMEOUT = 600.0
#: environment variables the child keeps: enough to run Python and find installed packages
_KEPT_ENV = ("PATH", "LANG", "LC_ALL", "LC_CTYPE", "PYTHONPATH", "VIRTUAL_ENV", "SYSTEMROOT", "TMPDIR")


class PluginProcessError(QBenchError, RuntimeError):
    """The plugin's process failed: it raised, exited, hung, or broke the wire format."""


class PluginConfig(BaseModel):
    """The plugin's validated config as its process reported it (plain JSON values)."""

    model_config = ConfigDict(extra="allow", frozen=True)


def scrubbed_environment(home: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k in _KEPT_ENV}
    env["HOME"] = home
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    # the child's BLAS runs one thread (see plugin_worker); no OpenMP pools either
    env["OMP_NUM_THREADS"] = env["OPENBLAS_NUM_THREADS"] = "1"
    return env


class PluginProcess:
    """A running plugin process; use as a context manager (the process ends on exit)."""

    def __init__(self, plugin: str, settings: dict[str, Any] | None = None, timeout: float | None = None):
        self.plugin = plugin
        self.settings = dict(settings or {})
        self.timeout = DEFAULT_TIMEOUT if timeout is None else float(timeout)
        self._proc: subprocess.Popen | None = None
        self._workdir: str | None = None
        self._stderr = None
        self.name = plugin
        self.version = "unknown"
        self.distribution: str | None = None
        self.distribution_version: str | None = None
        self.needs_calibration = False
        self.wants_float_inputs = False
        self.config = PluginConfig()

    # -- lifetime ----------------------------------------------------------------------------
    def start(self) -> PluginProcess:
        self._workdir = tempfile.mkdtemp(prefix="qbench-plugin-")
        self._stderr = open(os.path.join(self._workdir, ".stderr"), "w+b")  # noqa: SIM115 - closed in close()
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "qbench.quant.plugin_worker"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=self._stderr, cwd=self._workdir, env=scrubbed_environment(self._workdir), start_new_session=True,
        )
        return self

    def open(self) -> None:
        """Ask the child to load the plugin and validate its settings."""
        reply, _ = self._request({"op": "open", "plugin": self.plugin, "settings": self.settings}, what="loading it")
        self.name, self.version = str(reply["name"]), str(reply["version"])
        self.distribution, self.distribution_version = reply.get("distribution"), reply.get("distribution_version")
        self.needs_calibration = bool(reply["needs_calibration"])
        self.wants_float_inputs = bool(reply.get("wants_float_inputs", False))
        self.config = PluginConfig(**reply["config"])

    def close(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            if proc.poll() is None:
                try:
                    self._send({"op": "close"}, proc)
                    proc.wait(timeout=5)
                except (OSError, subprocess.TimeoutExpired):
                    pass
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            for stream in (proc.stdin, proc.stdout):
                if stream is not None:
                    stream.close()
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None

    def __enter__(self) -> PluginProcess:
        self.start()
        try:
            self.open()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the Quantizer interface -------------------------------------------------------------
    def quantize(self, weight: np.ndarray, stats: LayerStats | None) -> QuantizedTensor:
        arrays = {"weight": np.ascontiguousarray(weight, dtype=np.float32)}
        header: dict[str, Any] = {"op": "quantize"}
        if stats is not None:
            arrays["xtx"] = np.ascontiguousarray(stats.xtx, dtype=np.float64)
            header["n_rows"] = int(stats.n_rows)
            if stats.dxtx is not None:
                arrays["dxtx"] = np.ascontiguousarray(stats.dxtx, dtype=np.float64)
        reply, out = self._request(header, arrays)
        fields = reply.get("tensor")
        if not isinstance(fields, dict) or "codes" not in out or "scales" not in out:
            raise PluginProcessError("answered without codes and scales")
        # rebuilt and checked here: nothing the child claims about its tensor is taken on trust
        unknown = set(out) - set(TENSOR_ARRAYS)
        if unknown:
            raise PluginProcessError(f"answered with unknown arrays {sorted(unknown)}")
        return QuantizedTensor(code_bits=fields.get("code_bits"), group_size=fields.get("group_size"),
                               signed=bool(fields.get("signed")), packing=fields.get("packing", "int"),
                               lowrank_dtype=fields.get("lowrank_dtype", "float16"),
                               vector_dim=fields.get("vector_dim", 1), **out)

    def device_profiles(self) -> tuple[list[dict[str, Any]], list[str]]:
        """The device profiles every installed plugin registers, as plain data, and the errors."""
        reply, _ = self._request({"op": "device_profiles"}, what="listing device profiles")
        return list(reply.get("profiles", [])), [str(e) for e in reply.get("errors", [])]

    # -- the wire ----------------------------------------------------------------------------
    def _send(self, header: dict[str, Any], proc: subprocess.Popen, arrays: dict[str, np.ndarray] | None = None) -> None:
        for chunk in encode_message(header, arrays):
            proc.stdin.write(chunk)
        proc.stdin.flush()

    def _failure(self, what: str | None, why: str) -> PluginProcessError:
        """The error for a failed request; a layer's (`what` None) is worded for `quantize_model`
        to prefix with the plugin and layer names."""
        tail = ""
        if self._stderr is not None:
            self._stderr.flush()
            self._stderr.seek(0)
            lines = [ln for ln in self._stderr.read().decode("utf-8", "replace").splitlines() if ln.strip()]
            if lines:
                tail = f" (its last words: {one_line(lines[-1])[:300]})"
        return PluginProcessError(f"{why}{tail}" if what is None else f"plugin '{self.plugin}' {why} while {what}{tail}")

    def _request(self, header: dict[str, Any], arrays: dict[str, np.ndarray] | None = None,
                 what: str | None = None) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        proc = self._proc
        if proc is None:
            raise PluginProcessError(f"plugin '{self.plugin}': its process is not running")
        try:
            self._send(header, proc, arrays)
        except (BrokenPipeError, OSError):
            proc.wait()
            raise self._failure(what, f"exited (status {proc.returncode})") from None
        deadline = time.monotonic() + self.timeout
        fd = proc.stdout.fileno()

        def read_exact(n: int) -> bytearray:
            buf = bytearray(n)
            view, got = memoryview(buf), 0
            while got < n:
                left = deadline - time.monotonic()
                ready = select.select([fd], [], [], max(0.0, left))[0] if left > 0 else []
                if not ready:
                    self._kill(proc)
                    raise self._failure(what, f"did not answer within {self.timeout:g} s (killed)")
                chunk = os.read(fd, min(n - got, 1 << 20))
                if not chunk:
                    proc.wait()
                    raise self._failure(what, f"exited (status {proc.returncode})")
                view[got : got + len(chunk)] = chunk
                got += len(chunk)
            return buf

        try:
            reply, out = decode_message(read_exact)
        except WireError as exc:
            self._kill(proc)
            raise self._failure(what, f"broke the wire format ({exc})") from None
        if not reply.get("ok"):
            error = one_line(reply.get("error", "?"))
            if what is not None and reply.get("worded"):
                raise PluginProcessError(error)
            raise self._failure(what, f"raised {error}")
        return reply, out

    def _kill(self, proc: subprocess.Popen) -> None:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def device_profiles_from_plugins(timeout: float | None = None) -> tuple[dict[str, DeviceProfile], list[str]]:
    """Every registered device profile, smallest RAM first, and the plugin problems met, as the
    plugin process collects them: a third-party device hook is plugin code too, so a process
    that scores never runs it and receives the profiles as data."""
    process = PluginProcess("(device profiles)", timeout=timeout).start()
    try:
        profiles, errors = process.device_profiles()
    finally:
        process.close()
    return {p["name"]: DeviceProfile.model_validate(p) for p in profiles}, errors


class ActivationSchemeProcess(PluginProcess):
    """An activation-scheme plugin in its own process: `with ActivationSchemeProcess("absmax", {"bits": 8})`
    gives its declared `scheme` and identity, and `calibrate(layer, stats)` for static ones."""

    def open(self) -> None:
        from qbench.quant.activation_scheme import ActivationScheme

        reply, _ = self._request({"op": "open_activation", "scheme": self.plugin, "settings": self.settings},
                                 what="loading it")
        self.name, self.version = str(reply["name"]), str(reply["version"])
        self.distribution, self.distribution_version = reply.get("distribution"), reply.get("distribution_version")
        self.config = PluginConfig(**reply["config"])
        try:
            self.scheme = ActivationScheme.model_validate(reply["scheme"])
        except Exception as exc:  # the child's claim is checked here, not trusted
            raise PluginProcessError(f"activation scheme '{self.plugin}' declared an invalid scheme: {one_line(exc)}") from None
        self.needs_calibration = not self.scheme.dynamic

    def calibrate(self, layer: str, stats: Any) -> Any:
        from qbench.quant.activation_scheme import StaticActivationScale

        header = {"op": "calibrate_activation", "layer": layer, "n_values": stats.n_values, "min": stats.min,
                  "max": stats.max, "absmax": stats.absmax}
        arrays = {"histogram": stats.histogram, "abs_histogram": stats.abs_histogram}
        reply, _ = self._request(header, arrays, what=f"calibrating {layer}")
        try:
            scale = StaticActivationScale.model_validate(reply.get("scale"))
        except Exception as exc:
            raise PluginProcessError(f"activation scheme '{self.plugin}' returned an invalid scale for {layer}: "
                                     f"{one_line(exc)}") from None
        lo, hi = self.scheme.code_range
        if not self.scheme.symmetric and not lo <= scale.zero <= hi:
            raise PluginProcessError(f"activation scheme '{self.plugin}' returned zero point {scale.zero} for {layer}, "
                                     f"outside the codes {lo}..{hi}")
        if self.scheme.symmetric and scale.zero != 0:
            raise PluginProcessError(f"activation scheme '{self.plugin}' returned zero point {scale.zero} for {layer} "
                                     "but declared a symmetric scheme")
        return scale

    def record(self, kv_cache: bool, static_scales: dict | None, attention: bool = False) -> Any:
        from qbench.quant.activation_scheme import ActivationRecord

        return ActivationRecord(name=self.name, version=self.version, distribution=self.distribution,
                                distribution_version=self.distribution_version, config=self.config.model_dump(mode="json"),
                                scheme=self.scheme, kv_cache=kv_cache, attention=attention, static_scales=static_scales)
