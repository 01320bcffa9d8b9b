"""What a sweep is: settings every point shares, a grid of axes, and points given one by one.

A sweep file is TOML (or the same document as JSON):

    name = "rtn-gptq"
    shards = 4                      # utterance shards per point (default: one per worker)

    [base]                          # RunSpec fields every point shares
    subset = "test-clean"
    limit = 200
    device = "none"

    [grid]                          # every combination of these values is a point
    plugin = ["rtn", "gptq"]
    bits = [2, 3, 4]                # not a RunSpec field: a quantizer setting (config)
    group_size = [64, 128]

    [[points]]                      # and points given whole (base fields apply to them too)
    plugin = "none"                 # the float baseline

`--grid plugin=rtn,gptq bits=2,3,4 group_size=64,128` on the command line is the same grid.
A key is a `RunSpec` field (plugin, model, subset, device, batch_size, encoder_seconds, ...;
`policy.quantize_embeddings` or `activations.name` reach into one), else a setting of the
quantizer. `plugin = "none"` is the float baseline, which takes no settings: its combinations
with quantizer settings collapse into one point. Each point is exactly a `RunSpec`: a point's
result is what `qbench run` of that spec writes.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from qbench.errors import QBenchError, one_line
from qbench.leaderboard.entry import SAFE_NAME_PATTERN
from qbench.quant.plan import read_plan
from qbench.quant.settings import parse_value, read_toml_or_json, split_settings
from qbench.run import RunSpec, spec_error

#: plugin values that mean "no quantizer": the float baseline
FLOAT_PLUGIN = ("none", "fp", "float")
#: RunSpec fields a sweep sets itself: where each point's result goes
SWEEP_OWNED = frozenset({"output"})


class SweepSpecError(QBenchError, ValueError):
    """A sweep file or grid that cannot be expanded into runs; the message names the key or point."""


class SweepSpec(BaseModel):
    """A sweep as written in its file (the `[base]`, `[grid]` and `[[points]]` tables)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=SAFE_NAME_PATTERN, description="the sweep's name: its folder under results/sweeps/")
    base: dict[str, Any] = Field(default_factory=dict, description="RunSpec fields (or quantizer settings) every point shares")
    grid: dict[str, list[Any]] = Field(default_factory=dict, description="axes: every combination is a point")
    points: list[dict[str, Any]] = Field(default_factory=list, description="points given whole, on top of base")
    shards: int | None = Field(None, ge=1, description="utterance shards per point (None: one per worker)")

    def settings(self) -> list[dict[str, Any]]:
        """Every point's flat settings (base, then its grid combination or its own keys), in order."""
        for key, values in self.grid.items():
            if not values:
                raise SweepSpecError(f"sweep {self.name}: grid axis '{key}' has no values")
        axes = list(self.grid)
        combos = [dict(zip(axes, values)) for values in itertools.product(*self.grid.values())] if axes else []
        if not combos and not self.points:
            combos = [{}]  # a sweep of its base alone: one point
        return [{**self.base, **combo} for combo in combos] + [{**self.base, **point} for point in self.points]

    def run_specs(self, points_dir: Path) -> list[RunSpec]:
        """The points as `RunSpec`s writing their results into `points_dir`, duplicates (the
        same identity) once, in order. File names are a run's default names
        (`<model>__<subset>__<label>.json`), with the identity's start where two would clash."""
        specs: list[RunSpec] = []
        seen: set[str] = set()
        for n, flat in enumerate(self.settings(), 1):
            spec = point_spec(flat, f"sweep {self.name}: point {n} ({describe_settings(flat)})")
            if spec.identity() not in seen:
                seen.add(spec.identity())
                specs.append(spec)
        stems = [f"{s.model_label}__{s.subset}__{s.label}" for s in specs]
        clashing = {stem for stem in stems if stems.count(stem) > 1}
        named = [f"{stem}__{spec.identity()[:10]}" if stem in clashing else stem for spec, stem in zip(specs, stems)]
        return [spec.model_copy(update={"output": str(points_dir / f"{name}.json")}) for spec, name in zip(specs, named)]


def describe_settings(flat: dict[str, Any]) -> str:
    return " ".join(f"{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in flat.items()) or "the base settings"


def point_spec(flat: dict[str, Any], what: str) -> RunSpec:
    """The `RunSpec` of one point's flat settings; `SweepSpecError` naming the point and key."""
    fields: dict[str, Any] = {}
    config: dict[str, Any] = {}
    for key, value in flat.items():
        top, _, rest = key.partition(".")
        if top in SWEEP_OWNED:
            raise SweepSpecError(f"{what}: '{key}' is set by the sweep (each point's result goes in its folder)")
        if top == "config" and rest:
            config[rest] = value
        elif top == "config":
            if not isinstance(value, dict):
                raise SweepSpecError(f"{what}: 'config' must be a table of quantizer settings (got {value!r})")
            config.update(value)
        elif top in RunSpec.model_fields and rest:
            # policy.quantize_embeddings = true: one field of a nested setting
            nested = fields.setdefault(top, {})
            if not isinstance(nested, dict):
                raise SweepSpecError(f"{what}: '{key}' sets part of '{top}', which is also given whole")
            nested[rest] = value
        elif top in RunSpec.model_fields:
            fields[key] = value
        else:
            config[key] = value
    plugin = fields.get("plugin")
    if isinstance(plugin, str) and plugin.lower() in FLOAT_PLUGIN:
        fields["plugin"] = plugin = None
    if plugin is None and "plan" not in fields:
        config = {}  # the float baseline has no quantizer to set
    if isinstance(fields.get("plan"), str):
        fields["plan"] = read_plan(Path(fields["plan"]))
    for key in ("utterance_ids", "calibration_ids"):
        if isinstance(fields.get(key), list):
            fields[key] = tuple(fields[key])
    try:
        return RunSpec(**fields, config=config)
    except ValidationError as exc:
        raise SweepSpecError(str(spec_error(exc, what))) from None
    except TypeError as exc:
        raise SweepSpecError(f"{what}: {one_line(exc)}") from None


def parse_grid(items: list[str]) -> dict[str, list[Any]]:
    """`["plugin=rtn,gptq", "bits=2,3,4"]` -> `{"plugin": ["rtn", "gptq"], "bits": [2, 3, 4]}`.
    Values are JSON where they parse as JSON (numbers, true, null, lists), else strings; commas
    inside brackets do not split (`group_size=[64,128]` is one list value)."""
    grid: dict[str, list[Any]] = {}
    for key, text in split_settings(items, "--grid", "key=value1,value2").items():
        values, depth, current = [], 0, ""
        for ch in text:
            depth += {"[": 1, "{": 1, "]": -1, "}": -1}.get(ch, 0)
            if ch == "," and depth == 0:
                values.append(current)
                current = ""
            else:
                current += ch
        values.append(current)
        if any(not v.strip() for v in values):
            raise SweepSpecError(f"--grid: '{key}' has an empty value in {text!r}")
        grid[key] = [parse_value(v.strip()) for v in values]
    return grid


def grid_name(base: dict[str, Any], grid: dict[str, list[Any]]) -> str:
    """A name for a sweep given on the command line: the same grid and base, the same name, so
    running the same command again resumes it."""
    canonical = json.dumps({"base": base, "grid": grid}, sort_keys=True, default=str)
    return "grid-" + hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:10]


def read_sweep(path: Path) -> SweepSpec:
    """A sweep from a `.toml` or `.json` file (its name defaults to the file's stem)."""
    path = Path(path)
    if path.suffix not in (".toml", ".json"):
        raise SweepSpecError(f"{path}: a sweep file is .toml or .json")
    data = read_toml_or_json(path, "sweep file", SweepSpecError)
    if not isinstance(data, dict):
        raise SweepSpecError(f"{path}: a sweep file is a table (got {type(data).__name__})")
    data.setdefault("name", path.stem)
    try:
        return SweepSpec.model_validate(data)
    except ValidationError as exc:
        raise SweepSpecError(str(spec_error(exc, str(path)))) from None
