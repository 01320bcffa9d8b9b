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
