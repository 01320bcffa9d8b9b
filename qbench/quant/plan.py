"""A quantization plan: which quantizer (and settings) each layer gets, or none.

A plan is an ordered list of rules, each mapping layer-name globs (fnmatch, on the names
`qbench fit` and results list: `encoder.blocks.0.mlp.fc1`, `decoder.token_embedding`) to a
plugin with its config, or to `keep float` (`plugin` omitted). Every quantizable layer of the
model must be matched by exactly one rule: a layer no rule names, or one two rules both name,
is an error, so a plan always says what happens to every layer and never depends on rule
order for its meaning (the order is kept for reading and recording).

A single `qbench run --plugin P` is the one-rule plan `{"*" -> P}` with the policy's layer
selection; a plan file is read from TOML or JSON:

    name = "enc8-dec4"
    [[rules]]
    match = ["encoder.*"]
    plugin = "rtn"
    config = { bits = 8 }
    [[rules]]
    match = ["decoder.blocks.*"]
    plugin = "gptq"
    config = { bits = 4 }
    [[rules]]
    match = ["decoder.token_embedding"]       # no plugin: kept float
"""

from __future__ import annotations

import fnmatch
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from qbench.errors import QBenchError
from qbench.models.weight_store import WeightInfo
from qbench.quant.settings import read_toml_or_json

#: the quantizer name results and entries record for a plan (its config is the whole plan)
PLAN_QUANTIZER = "plan"
SAFE_PLAN_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}$"


class PlanError(QBenchError, ValueError):
    """A plan that does not say exactly once what happens to every layer, or cannot be read."""


class PlanRule(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    match: tuple[str, ...] = Field(min_length=1, description="fnmatch globs on layer names")
    plugin: str | None = Field(None, description="quantizer name (qbench plugins); None: keep the layers float")
    config: dict[str, Any] = Field(default_factory=dict, description="the quantizer's settings")

    def matches(self, name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, pattern) for pattern in self.match)

    @property
    def key(self) -> tuple[str, str] | None:
        """What identifies the quantizer this rule runs (plugin + canonical config), or None."""
        if self.plugin is None:
            return None
        return self.plugin, json.dumps(self.config, sort_keys=True)


class QuantizationPlan(BaseModel):
    """The rules, in order, and a name for file names and the leaderboard."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=SAFE_PLAN_NAME)
    rules: tuple[PlanRule, ...] = Field(min_length=1)
    description: str = Field("", max_length=500)

    def assign(self, layers: Iterable[WeightInfo]) -> dict[str, PlanRule]:
        """Every layer's rule (keep-float rules included); `PlanError` naming the layers that
        no rule, or more than one rule, matches."""
        assigned: dict[str, PlanRule] = {}
        unmatched: list[str] = []
        for info in layers:
            hits = [i for i, rule in enumerate(self.rules) if rule.matches(info.name)]
            if not hits:
                unmatched.append(info.name)
            elif len(hits) > 1:
                raise PlanError(f"plan {self.name}: layer {info.name} is matched by rules {hits[0] + 1} and "
                                f"{hits[1] + 1} ({self._show(hits[0])}, {self._show(hits[1])}); each layer must match exactly one")
            else:
                assigned[info.name] = self.rules[hits[0]]
        if unmatched:
            shown = ", ".join(unmatched[:5]) + (f", ... ({len(unmatched)} in all)" if len(unmatched) > 5 else "")
            raise PlanError(f"plan {self.name}: no rule matches layer(s) {shown}; add a rule (one without a plugin keeps them float)")
        unused = [i + 1 for i, rule in enumerate(self.rules) if rule not in assigned.values()]
        if unused:
            raise PlanError(f"plan {self.name}: rule(s) {', '.join(map(str, unused))} match no layer of the model")
        return assigned

    def _show(self, i: int) -> str:
        rule = self.rules[i]
        return f"{'/'.join(rule.match)} -> {rule.plugin or 'float'}"

    def quantizers(self) -> list[tuple[str, dict[str, Any]]]:
        """The distinct (plugin, config) pairs the plan runs, in rule order."""
        seen: dict[tuple[str, str], tuple[str, dict[str, Any]]] = {}
        for rule in self.rules:
            if rule.key is not None and rule.key not in seen:
                seen[rule.key] = (rule.plugin, dict(rule.config))
        return list(seen.values())


def read_plan(path: Path) -> QuantizationPlan:
    """A plan from a `.toml` or `.json` file; `PlanError` naming the file and the field at fault."""
    path = Path(path)
    data = read_toml_or_json(path, "plan", PlanError)
    try:
        return QuantizationPlan.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err.get("loc", ())) or "plan"
        raise PlanError(f"{path}: {where}: {err['msg']}") from None


def write_plan(plan: QuantizationPlan, path: Path) -> Path:
    """The plan as JSON (what `qbench optimize` writes; `read_plan` reads it back equal)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(plan.model_dump(mode="json"), indent=2) + "\n", encoding="utf-8")
    return path
