"""Bit allocation: one candidate (or float) per layer, least predicted damage under a byte budget.

The damage of a choice is the sum over layers of the candidate's measured KL for that layer
(`qbench.quant.sensitivity`), the size the sum of its packed bytes plus everything that is
never quantized. Choosing one option per layer to minimise a sum under a sum constraint is a
multiple-choice knapsack: solved exactly as a 0/1 integer program (scipy's `milp`, HiGHS),

    min  sum_{l,c} kl[l,c] x[l,c]
    s.t. sum_c x[l,c] = 1               for every layer l
         sum_{l,c} bytes[l,c] x[l,c] <= budget - fixed bytes
         x in {0, 1}

so the plan is the optimum of the model it is given, not a heuristic's approximation of it.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence

import numpy as np
from pydantic import BaseModel

from qbench.errors import QBenchError
from qbench.models.parallel import refresh_blas_libraries
from qbench.quant.plan import PlanRule, QuantizationPlan
from qbench.quant.sensitivity import SensitivityTable

FLOAT = "float"


class AllocationError(QBenchError, ValueError):
    """No choice of candidates fits the budget."""


class Allocation(BaseModel):
    choice: dict[str, str]  # layer -> candidate label, or "float"
    predicted_kl: float
    model_bytes: int
    budget_bytes: int


def solve_allocation(damage: np.ndarray, sizes: np.ndarray, capacity: float) -> np.ndarray:
    """Index of the chosen option per row minimising `sum damage` with `sum sizes <= capacity`
    (`damage`, `sizes`: `[layers, options]`; an infinite damage marks an option unavailable)."""
    try:
        from scipy.optimize import Bounds, LinearConstraint, milp
    except ImportError:
        raise AllocationError("the bit allocation needs scipy's integer-program solver: pip install 'qbench[mixed]'") from None
    # scipy loads its own OpenBLAS: the thread caps of later model runs must see it as well
    refresh_blas_libraries()

    n, k = damage.shape
    usable = np.isfinite(damage)
    cost = np.where(usable, damage, 0.0).reshape(-1)
    one_each = np.zeros((n, n * k))
    for layer in range(n):
        one_each[layer, layer * k : (layer + 1) * k] = 1.0
    constraints = [LinearConstraint(one_each, 1, 1), LinearConstraint(sizes.reshape(1, -1).astype(float), -np.inf, capacity)]
    upper = usable.reshape(-1).astype(float)
    result = milp(cost, constraints=constraints, integrality=np.ones(n * k), bounds=Bounds(0, upper))
    if not result.success:
        raise AllocationError(f"no choice of candidates fits {capacity:.0f} bytes ({result.message})")
    return np.rint(result.x).reshape(n, k).argmax(axis=1)


def allocate(table: SensitivityTable, budget_bytes: int, candidates: list[str] | None = None,
             allow_float: bool = True, keep_float: Sequence[str] = ()) -> Allocation:
    """The least-damage choice for `table`'s model within `budget_bytes` of weights.

    Layers matching a `keep_float` glob stay float whatever `allow_float` says (a leaderboard
    row "embedding at fp16" is a budget for the other layers)."""
    labels = candidates or table.labels()
    names = list(table.float_bytes)
    kept: set[str] = set()
    for pattern in keep_float:
        matched = {n for n in names if fnmatch.fnmatchcase(n, pattern)}
        if not matched:
            raise AllocationError(f"--keep-float {pattern!r} matches no layer of {table.model}")
        kept |= matched
    options = labels + ([FLOAT] if allow_float or kept else [])
    damage = np.full((len(names), len(options)), np.inf)
    sizes = np.zeros((len(names), len(options)))
    for j, label in enumerate(options):
        for i, name in enumerate(names):
            if label == FLOAT:
                if allow_float or name in kept:
                    damage[i, j], sizes[i, j] = 0.0, table.float_bytes[name]
            elif name in kept:
                continue
            else:
                layer = table.candidate(label).layers.get(name)
                if layer is not None:
                    damage[i, j], sizes[i, j] = max(layer.kl, 0.0), layer.bytes
    capacity = budget_bytes - table.fixed_bytes
    picked = solve_allocation(damage, sizes, capacity)
    choice = {name: options[j] for name, j in zip(names, picked)}
    return Allocation(choice=choice, predicted_kl=float(sum(damage[i, j] for i, j in enumerate(picked))),
                      model_bytes=int(table.fixed_bytes + sum(sizes[i, j] for i, j in enumerate(picked))),
                      budget_bytes=budget_bytes)


def plan_of(allocation: Allocation, table: SensitivityTable, name: str) -> QuantizationPlan:
    """The plan that applies `allocation`: one rule per chosen option, naming its layers exactly."""
    rules = []
    for label in dict.fromkeys(allocation.choice.values()):
        layers = tuple(n for n, c in allocation.choice.items() if c == label)
        if label == FLOAT:
            rules.append(PlanRule(match=layers))
        else:
            cand = table.candidate(label).candidate
            rules.append(PlanRule(match=layers, plugin=cand.plugin, config=cand.config))
    return QuantizationPlan(name=name, rules=rules, description=(
        f"qbench optimize: least summed KL ({allocation.predicted_kl:.4f}) within {allocation.budget_bytes} bytes "
        f"({allocation.model_bytes} used), from sensitivity on {table.subset}"))


def predict_wer(table: SensitivityTable, summed_kl: float) -> float:
    """WER predicted for a model whose layers' KLs sum to `summed_kl`: the float WER plus a
    slope fitted (least squares through the origin) to the candidates' uniform runs, each
    at its own summed per-layer KL, all on the measured dev utterances."""
    xs = np.array([sum(layer.kl for layer in c.layers.values()) for c in table.candidates])
    ys = np.array([c.uniform_wer - table.float_wer for c in table.candidates])
    keep = np.isfinite(xs) & np.isfinite(ys) & (ys < 1.0)  # a collapsed model's WER says nothing linear
    if not keep.any() or not np.any(xs[keep] > 0):
        return table.float_wer
    slope = float(np.dot(xs[keep], ys[keep]) / np.dot(xs[keep], xs[keep]))
    return table.float_wer + slope * summed_kl
