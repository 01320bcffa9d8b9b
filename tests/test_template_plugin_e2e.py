"""The template plugin, installed with pip from a temp directory like a stranger's PyPI package,
found through its `qbench` entry point and run by `qbench run --plugin` end to end."""

from __future__ import annotations

import ast
import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

TEMPLATE = Path(__file__).resolve().parents[1] / "plugins" / "template"


def test_template_is_a_complete_plugin_in_under_50_lines():
    files = [TEMPLATE / "pyproject.toml", *sorted((TEMPLATE / "qbench_example").glob("*.py"))]
    assert sum(len(f.read_text().splitlines()) for f in files) < 50


def test_template_uses_only_the_public_api():
    """A stranger copies the template: it must show `from qbench import ...`, not qbench's insides."""
    tree = ast.parse((TEMPLATE / "qbench_example" / "__init__.py").read_text())
    modules = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    modules |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    assert {m for m in modules if m.split(".")[0] == "qbench"} == {"qbench"}


@pytest.mark.skipif(importlib.util.find_spec("pip") is None, reason="needs pip")
def test_pip_installed_template_runs_through_qbench_run(tiny_en, data_dir, tmp_path):
    project = tmp_path / "qbench-example"
    shutil.copytree(TEMPLATE, project, ignore=shutil.ignore_patterns("*.egg-info", "__pycache__"))
    pip = [sys.executable, "-m", "pip", "install", "--no-deps", "--quiet", "--disable-pip-version-check"]
    if importlib.util.find_spec("hatchling") is not None:
        pip.append("--no-build-isolation")
    install = subprocess.run([*pip, str(project)], capture_output=True, text=True, timeout=300)
    assert install.returncode == 0, install.stderr
    out = tmp_path / "r.json"
    try:
        run = subprocess.run(
            [sys.executable, "-m", "qbench.cli", "run", "--plugin", "int8-tensor", "--set", "clip=0.9",
             "--limit", "2", "--data-dir", str(data_dir), "-o", str(out), "-q"],
            capture_output=True, text=True, timeout=600,
        )
        assert run.returncode == 0, run.stderr
    finally:
        subprocess.run([sys.executable, "-m", "pip", "uninstall", "-y", "--quiet", "qbench-example"], capture_output=True, timeout=120)
    result = json.loads(out.read_text())
    q = result["quantization"]
    assert (q["quantizer"], q["distribution"], q["distribution_version"]) == ("int8-tensor", "qbench-example", "0.1.0")
    assert q["quantizer_version"] == "0.1.0"  # the class sets none: its distribution's version
    assert q["config"] == {"clip": 0.9}
    assert result["status"] == "complete" and result["metrics"]["utterances"] == 2
    # int8 codes + one float16 scale per tensor
    assert 8.0 <= q["mean_bits_per_weight"] < 8.001
    assert result["metrics"]["model_bytes"] == q["model_bytes"] < q["float_model_bytes"] == tiny_en.model.store.stored_bytes()
