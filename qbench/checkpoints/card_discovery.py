"""Finding every model card: qbench's own and those installed distributions register.

Cards reach qbench through the `qbench_register_models` hook (see `qbench.hookspecs`), built-in
ones included (`qbench.checkpoints.builtin_cards`), and are collected like quantizers and
device profiles by `qbench.plugin_manager.collect_hook_results`: a plugin whose hook raises or
returns something that is not a `ModelCard` is reported under its name and every other card
stays usable; a name two plugins offer is reported naming both (qbench's own card is kept).

Where the hook runs. A card is data, but the hook that returns it is a plugin's code, and the
process that scores a run never runs plugin code (`qbench.quant.plugin_process`). So
`discover_models` collects the cards in a child process (`python -m
qbench.checkpoints.card_discovery OUT`, with the plugin process's scrubbed environment and a
temporary working directory) and reads them back as JSON, validated here. If that child fails
(a plugin that hangs on import, a broken interpreter), the built-in cards are read directly and
the failure is reported: the registry never goes empty because of one install.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

from pydantic import BaseModel, ValidationError

from qbench.checkpoints.card import ModelCard
from qbench.errors import one_line

#: seconds the child may take to import every plugin and collect the cards
DISCOVERY_TIMEOUT = 120.0
BUILTIN_MODULE = "qbench.checkpoints.builtin_cards"


class RegisteredModel(BaseModel):
    """A card and the plugin that registered it, as `qbench models` lists it."""

    name: str
    card: ModelCard
    #: the entry-point name (or, for qbench's own cards, the built-in module) that registered it
    plugin: str
    distribution: str | None = None
    distribution_version: str | None = None
    builtin: bool = False

    @property
    def origin(self) -> str:
        """Where the card came from, in a few words: "qbench 0.3 (built-in)", "plugin 'x' (dist 1.0)"."""
        release = " ".join(p for p in (self.distribution, self.distribution_version) if p)
        if self.builtin:
            return f"{release or 'qbench'} (built-in)"
        return f"plugin '{self.plugin}'" + (f" ({release})" if release else "")


class DiscoveredModels(BaseModel):
    """What the discovery child writes: every usable card and every problem, one line each."""

    models: list[RegisteredModel]
    problems: list[str]


def collect_model_cards() -> DiscoveredModels:
    """Run every `qbench_register_models` implementation here, in this process (plugin code
    runs: the discovery child calls this, and so may a process that never scores)."""
    from qbench.plugin_manager import PluginContractError, collect_hook_results, plugin_load_errors

    def accept(item: object, origin) -> RegisteredModel:
        if not isinstance(item, ModelCard):
            raise PluginContractError(f"{item!r} is not a qbench ModelCard")
        try:
            # again from plain data: a card built with model_construct skipped the checks
            card = ModelCard.model_validate(item.model_dump())
        except ValidationError as exc:
            raise PluginContractError(f"model card {getattr(item, 'name', '?')!r}: {one_line(exc)}") from None
        return RegisteredModel(name=card.name, card=card, plugin=origin.plugin, distribution=origin.distribution,
                               distribution_version=origin.distribution_version, builtin=origin.builtin)

    found, errors = collect_hook_results("qbench_register_models", "model", accept)
    problems = [str(e) for e in plugin_load_errors() + errors]
    return DiscoveredModels(models=sorted(found.values(), key=lambda m: m.name), problems=problems)


def _builtin_only(problem: str) -> DiscoveredModels:
    from qbench.checkpoints.builtin_cards import builtin_model_cards

    models = [RegisteredModel(name=c.name, card=c, plugin=BUILTIN_MODULE, distribution="qbench", builtin=True)
              for c in builtin_model_cards()]
    return DiscoveredModels(models=models, problems=[problem])


_cache: dict[str | None, DiscoveredModels] = {}


def discover_models() -> DiscoveredModels:
    """Every registered card, collected in a child process (see the module docstring).

    Collected once per process and `PYTHONPATH` (what the child can import depends on it);
    `forget_discovered_models` starts over."""
    key = os.environ.get("PYTHONPATH")
    if key not in _cache:
        _cache[key] = _discover_in_child()
    return _cache[key]


def forget_discovered_models() -> None:
    """Collect the cards again on the next `discover_models` (tests, after installing a plugin)."""
    _cache.clear()


def _discover_in_child() -> DiscoveredModels:
    from qbench.quant.plugin_process import scrubbed_environment

    with tempfile.TemporaryDirectory(prefix="qbench-models-") as workdir:
        out = Path(workdir) / "models.json"
        env = scrubbed_environment(workdir)
        # the child imports this qbench, wherever it is (a checkout that is not installed too)
        source_root = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = os.pathsep.join(p for p in (source_root, env.get("PYTHONPATH")) if p)
        try:
            proc = subprocess.run([sys.executable, "-m", "qbench.checkpoints.card_discovery", str(out)],
                                  cwd=workdir, env=env, stdin=subprocess.DEVNULL, capture_output=True,
                                  timeout=DISCOVERY_TIMEOUT)
        except subprocess.TimeoutExpired:
            return _builtin_only(f"model-card discovery did not finish within {DISCOVERY_TIMEOUT:g} s "
                                 "(a plugin hanging on import?); only qbench's own cards are used")
        if proc.returncode != 0 or not out.is_file():
            last = (proc.stderr.decode("utf-8", "replace").strip().splitlines() or ["no output"])[-1]
            return _builtin_only(f"model-card discovery failed (exit {proc.returncode}: {last}); "
                                 "only qbench's own cards are used")
        try:
            return DiscoveredModels.model_validate_json(out.read_text(encoding="utf-8"))
        except ValidationError as exc:
            return _builtin_only(f"model-card discovery wrote an unreadable list ({one_line(exc)}); "
                                 "only qbench's own cards are used")


def main(argv: list[str]) -> int:
    """The discovery child: collect the cards and write them as JSON to `argv[0]` (a file, not
    stdout, which a plugin may print to)."""
    found = collect_model_cards()
    Path(argv[0]).write_text(found.model_dump_json(), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
