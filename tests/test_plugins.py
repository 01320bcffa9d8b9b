"""Plugin discovery: entry points, broken plugins, conflicts, and a real pip-installed plugin.

Entry points are read once per process (and cached by qbench), so discovery of distributions
created by a test is checked in a fresh interpreter.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from qbench import plugin_manager as plugins
from qbench.plugin_manager import (
    QuantizerEntry,
    UnknownQuantizerError,
    discover_quantizers,
    entry_for_class,
    get_plugin_manager,
    get_quantizer,
    reset_plugin_manager,
)

QUANTIZER_MODULE = '''
import numpy as np
from pydantic import BaseModel, ConfigDict
from qbench.hookspecs import hookimpl
from qbench.quant.contract import QuantizedTensor, Quantizer


class Q(Quantizer):
    name = {qname!r}
    version = "9.9"
    description = "test plugin"

    class Config(BaseModel):
        model_config = ConfigDict(extra="forbid")
        knob: int = 3

    def quantize(self, weight, stats):
        return QuantizedTensor(codes=np.zeros(weight.shape, np.int8), code_bits=2, scales=[[1.0]], signed=True)


@hookimpl
def qbench_register_quantizers():
    return [Q]
'''

DISCOVER = """
import json
from qbench.plugin_manager import discover_quantizers
entries, errors = discover_quantizers()
print(json.dumps({"entries": {k: v.model_dump(mode="json") for k, v in entries.items()},
                  "errors": [e.model_dump() for e in errors]}))
"""


def run_discovery(extra_path: Path | None = None) -> dict:
    env = dict(os.environ)
    if extra_path is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(extra_path), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    proc = subprocess.run([sys.executable, "-c", DISCOVER], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def fake_distribution(site: Path, dist: str, version: str, entry_points: dict[str, str], modules: dict[str, str]) -> None:
    """A minimal installed distribution: *.dist-info with METADATA and entry_points.txt."""
    info = site / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    eps = "\n".join(f"{name} = {target}" for name, target in entry_points.items())
    (info / "entry_points.txt").write_text(f"[qbench]\n{eps}\n")
    for mod, source in modules.items():
        (site / f"{mod}.py").write_text(textwrap.dedent(source))


@pytest.fixture
def fresh_plugins() -> Iterator[None]:
    reset_plugin_manager()
    yield
    reset_plugin_manager()


def test_broken_plugins_are_reported_by_name_and_others_still_load(tmp_path: Path) -> None:
    fake_distribution(tmp_path, "qbench-good", "1.2.3", {"good": "good_q"}, {"good_q": QUANTIZER_MODULE.format(qname="good")})
    fake_distribution(tmp_path, "qbench-bad", "0.1", {"bad": "bad_q"}, {"bad_q": "raise ImportError('needs torch')\n"})
    fake_distribution(
        tmp_path,
        "qbench-boom",
        "0.2",
        {"boom": "boom_q"},
        {"boom_q": "from qbench.hookspecs import hookimpl\n@hookimpl\ndef qbench_register_quantizers():\n    raise RuntimeError('kaboom')\n"},
    )
    fake_distribution(
        tmp_path,
        "qbench-notaclass",
        "0.3",
        {"notaclass": "notaclass_q"},
        {"notaclass_q": "from qbench.hookspecs import hookimpl\n@hookimpl\ndef qbench_register_quantizers():\n    return [object]\n"},
    )
    fake_distribution(
        tmp_path,
        "qbench-typo",
        "0.4",
        {"typo": "typo_q"},
        {"typo_q": "from qbench.hookspecs import hookimpl\n@hookimpl\ndef qbench_register_quantiser():\n    return []\n"},
    )
    result = run_discovery(tmp_path)

    good = result["entries"]["good"]
    assert good["distribution"] == "qbench-good" and good["distribution_version"] == "1.2.3"
    assert good["version"] == "9.9" and good["plugin"] == "good"
    assert good["config_schema"]["properties"]["knob"]["default"] == 3
    assert "cls" not in good

    errors = {e["name"]: e for e in result["errors"]}
    assert errors["bad"]["distribution"] == "qbench-bad"
    assert "import failed: ImportError: needs torch" in errors["bad"]["error"]
    assert "qbench_register_quantizers raised RuntimeError: kaboom" in errors["boom"]["error"]
    assert "not a subclass" in errors["notaclass"]["error"]
    assert "qbench_register_quantiser" in errors["typo"]["error"]


def test_duplicate_quantizer_names_name_both_distributions(tmp_path: Path) -> None:
    fake_distribution(tmp_path, "qbench-one", "1.0", {"one": "one_q"}, {"one_q": QUANTIZER_MODULE.format(qname="same")})
    fake_distribution(tmp_path, "qbench-two", "2.0", {"two": "two_q"}, {"two_q": QUANTIZER_MODULE.format(qname="same")})
    result = run_discovery(tmp_path)
    assert "same" not in result["entries"]
    (err,) = [e for e in result["errors"] if "'same'" in e["error"]]
    assert "qbench-one 1.0" in err["error"] and "qbench-two 2.0" in err["error"]


def test_builtin_hook_modules_use_the_same_hooks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fresh_plugins: None) -> None:
    (tmp_path / "qbench_test_builtin.py").write_text(QUANTIZER_MODULE.format(qname="builtin-test"))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(plugins, "BUILTIN_HOOK_MODULES", ("qbench_test_builtin", "qbench_no_such_module"))
    monkeypatch.setattr(plugins, "_entry_points", lambda: iter(()))
    reset_plugin_manager()

    assert get_plugin_manager() is get_plugin_manager()
    entries, errors = discover_quantizers()
    assert list(entries) == ["builtin-test"]
    entry = entries["builtin-test"]
    assert isinstance(entry, QuantizerEntry) and entry.distribution == "qbench"
    assert [e.name for e in errors] == ["qbench_no_such_module"]
    cls = get_quantizer("builtin-test")
    assert entry_for_class(cls) is not None and cls().config.knob == 3

    with pytest.raises(UnknownQuantizerError) as info:
        get_quantizer("nope")
    assert str(info.value).startswith("unknown quantizer 'nope'; available: builtin-test")
    assert "1 plugin problem(s)" in str(info.value)


@pytest.mark.skipif(importlib.util.find_spec("pip") is None, reason="needs pip")
def test_pip_installed_plugin_is_discovered(tmp_path: Path) -> None:
    dist = "qbench-throwaway-plugin"
    proj = tmp_path / "proj"
    (proj / "qbench_throwaway").mkdir(parents=True)
    (proj / "qbench_throwaway" / "__init__.py").write_text(QUANTIZER_MODULE.format(qname="throwaway"))
    (proj / "pyproject.toml").write_text(
        textwrap.dedent(
            f"""
            [build-system]
            requires = ["hatchling>=1.21"]
            build-backend = "hatchling.build"

            [project]
            name = "{dist}"
            version = "0.4.2"
            dependencies = ["qbench"]

            [project.entry-points.qbench]
            throwaway = "qbench_throwaway"

            [tool.hatch.build.targets.wheel]
            packages = ["qbench_throwaway"]
            """
        )
    )
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--quiet", "--disable-pip-version-check"]
    # Without hatchling at hand, pip fetches it into an isolated build environment.
    if importlib.util.find_spec("hatchling") is not None:
        cmd.append("--no-build-isolation")
    install = subprocess.run([*cmd, str(proj)], capture_output=True, text=True, timeout=300)
    assert install.returncode == 0, install.stderr
    try:
        result = run_discovery()
        entry = result["entries"]["throwaway"]
        assert entry["distribution"] == dist
        assert entry["distribution_version"] == "0.4.2"
        assert entry["plugin"] == "throwaway"
    finally:
        subprocess.run(
            [sys.executable, "-m", "pip", "uninstall", "-y", "--quiet", dist], capture_output=True, text=True, timeout=120
        )
    assert "throwaway" not in run_discovery()["entries"]


SHORT_QUANTIZER_MODULE = '''
import numpy as np
from qbench import QuantizedTensor, Quantizer, hookimpl


class Sign(Quantizer):
    name = "sign"

    def quantize(self, weight, stats):
        return QuantizedTensor(codes=np.sign(weight).astype(np.int8), code_bits=2, scales=[[1.0]], signed=True)


@hookimpl
def qbench_register_quantizers():
    return [Sign]
'''

LOOSE_CONFIG_MODULE = '''
from pydantic import BaseModel, ConfigDict
from qbench import QuantizerConfig, hookimpl
from qbench.quant.contract import Quantizer


class Loose(Quantizer):
    name = "loose"
    version = "1.0"

    class Config(BaseModel):  # forgot extra="forbid": a typo in --set would run the defaults
        bits: int = 4

    def quantize(self, weight, stats):
        raise NotImplementedError


class Relaxed(Loose):
    name = "relaxed"

    class Config(QuantizerConfig):
        model_config = ConfigDict(extra="ignore")


@hookimpl
def qbench_register_quantizers():
    return [Loose, Relaxed]
'''


def test_the_short_form_takes_its_version_from_the_distribution_and_has_no_knobs(tmp_path: Path) -> None:
    fake_distribution(tmp_path, "qbench-sign", "2.5.1", {"sign": "sign_q"}, {"sign_q": SHORT_QUANTIZER_MODULE})
    fake_distribution(tmp_path, "qbench-loose", "0.1", {"loose": "loose_q"}, {"loose_q": LOOSE_CONFIG_MODULE})
    result = run_discovery(tmp_path)
    sign = result["entries"]["sign"]
    assert sign["version"] == "2.5.1" == sign["distribution_version"]
    assert sign["needs_calibration"] is False and sign["description"] == ""
    assert sign["config_schema"]["properties"] == {} and sign["config_schema"]["additionalProperties"] is False
    assert "loose" not in result["entries"] and "relaxed" not in result["entries"]
    loose = [e["error"] for e in result["errors"] if e["name"] == "loose"]
    assert loose == ["Loose.Config must forbid unknown keys: derive it from qbench.QuantizerConfig",
                     "Relaxed.Config must forbid unknown keys: derive it from qbench.QuantizerConfig"]


def test_a_class_without_version_needs_a_distribution(fresh_plugins: None) -> None:
    from qbench import Quantizer, hookimpl

    class NoVersion(Quantizer):
        name = "no-version"

        def quantize(self, weight, stats):
            raise NotImplementedError

    class Registers:
        @hookimpl
        def qbench_register_quantizers(self):
            return [NoVersion]

    get_plugin_manager().register(Registers(), name="direct")
    entries, errors = discover_quantizers()
    assert "no-version" not in entries
    (err,) = [e for e in errors if e.name == "direct"]
    assert "NoVersion sets no version and no distribution ships it" in err.error


def test_the_quantizer_report_records_the_distribution_version_as_the_version() -> None:
    """qbench-rtn no longer sets `version`: results still record 0.1.0, its distribution's."""
    import numpy as np

    qbench_rtn = pytest.importorskip("qbench_rtn")
    from qbench.models.weight_store import WeightInfo, WeightStore
    from qbench.quant.apply import quantize_model

    class OneLayer:
        name = "one-layer"
        store = WeightStore({"l.weight": np.ones((4, 8), np.float32)}, [WeightInfo("l", (4, 8), "linear")])

        def quantizable_weights(self):
            return list(self.store.weight_infos())

        def with_store(self, store):
            return self

    assert "version" not in vars(qbench_rtn.RTNQuantizer)
    entry = discover_quantizers()[0]["rtn"]
    _, report = quantize_model(OneLayer(), qbench_rtn.RTNQuantizer())
    assert report.quantizer_version == entry.version == entry.distribution_version == report.distribution_version


BROKEN_BOARDS_MODULE = '''
from qbench import hookimpl


@hookimpl
def qbench_register_device_profiles():
    raise OSError("boards.json not found")
'''

DEVICE_COMMANDS = """
import json
from qbench.embedded.devices import discover_device_profiles, get_device_profile, get_device_profiles
from qbench.plugin_manager import discover_quantizers
profiles, errors = discover_device_profiles()
print(json.dumps({"profiles": list(get_device_profiles()), "esp32": get_device_profile("esp32-s3").part,
                  "errors": [e.model_dump() for e in errors], "quantizers": list(discover_quantizers()[0])}))
"""


def test_a_broken_third_party_device_plugin_breaks_no_command(tmp_path: Path) -> None:
    fake_distribution(tmp_path, "qbench-boards", "0.3", {"boards": "boards_dev"}, {"boards_dev": BROKEN_BOARDS_MODULE})
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    proc = subprocess.run([sys.executable, "-c", DEVICE_COMMANDS], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "esp32-s3" in result["profiles"] and "pi-zero-2w" in result["profiles"]
    assert result["esp32"].startswith("Espressif")
    assert result["errors"] == [{"name": "boards", "distribution": "qbench-boards",
                                 "error": "qbench_register_device_profiles raised OSError: boards.json not found"}]
    if importlib.util.find_spec("qbench_rtn") is not None:
        assert "rtn" in result["quantizers"]

    listing = subprocess.run([sys.executable, "-m", "qbench.cli", "plugins"], capture_output=True, text=True, env=env, timeout=120)
    assert listing.returncode == 0, listing.stderr
    assert "plugin 'boards' (qbench-boards): qbench_register_device_profiles raised OSError" in " ".join(listing.stderr.split())
