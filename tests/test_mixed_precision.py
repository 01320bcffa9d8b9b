"""Mixed precision: sensitivity per layer, the exact bit allocation, and the plan it writes.

The allocator is checked against brute force on constructed cases; sensitivity and the whole
`qbench sensitivity` -> `qbench optimize` -> `qbench run --plan` path run on a seeded
wav2vec2 (no real checkpoint can be downloaded here) and, for the teacher-forced
distributions, on the real whisper-tiny.en.
"""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

from qbench.cli import main
from qbench.quant.allocation import AllocationError, allocate, plan_of, solve_allocation
from qbench.quant.plan import read_plan
from qbench.quant.sensitivity import (
    Candidate,
    CandidateSensitivity,
    LayerDamage,
    SensitivityTable,
    kl_divergence,
    measurement_split,
    parse_candidate,
    read_table,
)


def brute_force(damage: np.ndarray, sizes: np.ndarray, capacity: float) -> float:
    best = np.inf
    for pick in itertools.product(range(damage.shape[1]), repeat=damage.shape[0]):
        if sum(sizes[i, j] for i, j in enumerate(pick)) <= capacity:
            best = min(best, sum(damage[i, j] for i, j in enumerate(pick)))
    return best


@pytest.mark.parametrize("seed", range(6))
def test_the_allocation_is_the_exact_optimum_and_honours_the_budget(seed):
    rng = np.random.default_rng(seed)
    damage = rng.uniform(0, 1, (6, 3))
    sizes = rng.integers(1, 20, (6, 3)).astype(float)
    capacity = float(sizes.min(axis=1).sum() + rng.integers(0, 30))
    pick = solve_allocation(damage, sizes, capacity)
    used = sum(sizes[i, j] for i, j in enumerate(pick))
    assert used <= capacity
    assert sum(damage[i, j] for i, j in enumerate(pick)) == pytest.approx(brute_force(damage, sizes, capacity))


def test_a_greedy_choice_is_not_the_optimum_here_but_the_solver_finds_it():
    # three layers, options (damage, bytes): greedy by damage-per-byte picks layer 0's cheap
    # option first and then cannot afford the right ones; the optimum is known by hand
    damage = np.array([[0.0, 0.5], [0.0, 0.6], [0.0, 3.0]])
    sizes = np.array([[10, 1], [10, 1], [10, 1]], dtype=float)
    assert list(solve_allocation(damage, sizes, capacity=12)) == [1, 1, 0]  # damage 1.1 in 12 bytes
    with pytest.raises(AllocationError):
        solve_allocation(damage, sizes, capacity=2)


def _table() -> SensitivityTable:
    layers = {"a": (0.1, 0.4), "b": (0.01, 0.2), "emb": (0.5, 2.0)}  # KL at 8 and 4 bits
    cands = []
    for j, (bits, size) in enumerate(((8, 100), (4, 50))):
        cands.append(CandidateSensitivity(
            candidate=Candidate(plugin="rtn", config={"bits": bits}),
            identity={"name": "rtn", "version": "1", "config": {"bits": bits}, "needs_calibration": False},
            layers={n: LayerDamage(kl=kl[j], bytes=size) for n, kl in layers.items()},
            groups={}, uniform_kl=sum(kl[j] for kl in layers.values()), uniform_wer=0.05 + 0.1 * j))
    return SensitivityTable(model="m", model_sha256="0" * 64, subset="dev-clean", utterance_ids=["x"], calibration_ids=["y"],
                            positions=10, float_wer=0.05, float_bytes={n: 200 for n in layers}, fixed_bytes=30,
                            candidates=cands)


def test_allocate_writes_a_plan_naming_every_layer_once():
    table = _table()
    alloc = allocate(table, budget_bytes=30 + 100 + 50 + 50)
    assert alloc.model_bytes <= 230
    # the embedding is the most sensitive: it gets the 8-bit candidate, the others 4 bits
    assert alloc.choice == {"a": "rtn-bits4", "b": "rtn-bits4", "emb": "rtn-bits8"}
    plan = plan_of(alloc, table, "t")
    assigned = {n: r.config.get("bits") for r in plan.rules for n in r.match}
    assert assigned == {"a": 4, "b": 4, "emb": 8}
    with_float = allocate(table, budget_bytes=30 + 200 + 100 + 100)
    assert with_float.choice["emb"] == "float"


def test_kept_float_layers_stay_float_and_the_rest_share_what_is_left():
    table = _table()
    # without --no-float the budget would buy the embedding float; kept float it must be,
    # and every other layer must then be quantized (allow_float=False), in what is left
    alloc = allocate(table, budget_bytes=30 + 200 + 100 + 50, allow_float=False, keep_float=["em*"])
    assert alloc.choice == {"a": "rtn-bits8", "b": "rtn-bits4", "emb": "float"}
    assert alloc.model_bytes == 30 + 200 + 100 + 50
    with pytest.raises(AllocationError, match="no choice of candidates fits"):
        allocate(table, budget_bytes=30 + 200 + 99, allow_float=False, keep_float=["emb"])
    with pytest.raises(AllocationError, match=r"--keep-float 'decoder\.\*' matches no layer of m"):
        allocate(table, budget_bytes=10_000, keep_float=["decoder.*"])


def test_kl_is_zero_for_equal_distributions_and_positive_otherwise():
    lp = np.log(np.array([[0.5, 0.5], [0.9, 0.1]]))
    assert kl_divergence(lp, lp) == 0.0
    assert kl_divergence(lp, np.log(np.array([[0.6, 0.4], [0.5, 0.5]]))) > 0


def test_measurement_utterances_are_spread_and_disjoint_from_calibration():
    ids = [f"{s}-1-{i}" for s in (1, 2, 3, 4) for i in range(5)]
    measured, calibrating = measurement_split(ids, 4)
    assert len({m.split("-")[0] for m in measured}) == 4 and not set(measured) & set(calibrating)
    assert parse_candidate("gptq bits=3 group_size=64") == Candidate(plugin="gptq", config={"bits": 3, "group_size": 64})


def test_whisper_teacher_forced_distributions_reuse_a_float_encoder_exactly(tiny_en, data_dir):
    from qbench.data.audio import load_audio
    from qbench.data.librispeech import list_utterances

    model = tiny_en.model
    audio = [load_audio(list_utterances(data_dir, "test-clean", 1)[0].path)]
    targets = model.teacher_forcing_targets(audio)
    cache: dict = {}
    first = model.output_log_probs(audio, targets, cache)
    assert "float_encoder_features" in cache
    np.testing.assert_array_equal(model.output_log_probs(audio, targets, cache), first)
    assert first.shape[0] == len(targets[0]) + 1  # every target token and the end of text
    np.testing.assert_allclose(np.exp(first).sum(axis=1), 1.0, rtol=1e-4)




def test_sensitivity_optimize_and_run_the_plan_on_wav2vec2(seeded_wav2vec2, data_dir, tmp_path):
    table_path = tmp_path / "sens.json"
    model = ["--model", "wav2vec2-base-960h", "--weights", str(seeded_wav2vec2)]
    assert main(["sensitivity", *model, "--candidate", "rtn bits=8", "--candidate", "rtn bits=2", "--count", "2",
                 "--data-dir", str(data_dir), "-o", str(table_path), "--heatmap", str(tmp_path / "h.png"), "-q"]) == 0
    table = read_table(table_path)
    assert table.labels() == ["rtn-bits8", "rtn-bits2"] and (tmp_path / "h.png").stat().st_size > 0
    eight, two = table.candidates
    assert set(eight.layers) == set(table.float_bytes)
    # fewer bits cost more damage and fewer bytes, layer by layer
    assert sum(v.kl for v in two.layers.values()) > sum(v.kl for v in eight.layers.values())
    assert all(two.layers[n].bytes < eight.layers[n].bytes for n in table.float_bytes)
    assert not set(table.utterance_ids) & set(table.calibration_ids)
    # measuring again skips what is there
    before = table_path.read_text()
    assert main(["sensitivity", *model, "--candidate", "rtn bits=8", "--count", "2", "--data-dir", str(data_dir),
                 "-o", str(table_path), "-q"]) == 0
    assert table_path.read_text() == before

    budget = table.fixed_bytes + sum(two.layers[n].bytes for n in table.float_bytes) + 3000
    plan_path = tmp_path / "plan.json"
    assert main(["optimize", "--sensitivity", str(table_path), "--max-bytes", str(budget), "--no-float",
                 "--plan-output", str(plan_path), "--name", "w2v-test"]) == 0
    plan = read_plan(plan_path)
    out = tmp_path / "r.json"
    assert main(["run", *model, "--plan", str(plan_path), "--limit", "1", "--data-dir", str(data_dir),
                 "--device", "none", "-o", str(out), "-q"]) == 0
    result = json.loads(out.read_text())
    # optimize --run writes the same plan and runs it the same way
    out2 = tmp_path / "r2.json"
    assert main(["optimize", "--sensitivity", str(table_path), "--max-bytes", str(budget), "--no-float",
                 "--plan-output", str(tmp_path / "plan2.json"), "--name", "w2v-test", "--run", "--limit", "1", "--weights", str(seeded_wav2vec2),
                 "--run-device", "none", "--data-dir", str(data_dir), "-o", str(out2), "-q"]) == 0
    assert json.loads(out2.read_text())["hypotheses_sha256"] == result["hypotheses_sha256"]
    assert result["quantization"]["config"]["name"] == plan.name
    assert result["metrics"]["model_bytes"] <= budget

    # --keep-float on the CLI: the CTC head stays float, every other layer is quantized
    head = next(n for n in table.float_bytes if "lm_head" in n)
    kept_budget = budget + table.float_bytes[head] - two.layers[head].bytes
    kept_path = tmp_path / "kept.json"
    assert main(["optimize", "--sensitivity", str(table_path), "--max-bytes", str(kept_budget), "--no-float",
                 "--keep-float", head, "--plan-output", str(kept_path), "--name", "w2v-kept"]) == 0
    kept = {n: r.plugin for r in read_plan(kept_path).rules for n in r.match}
    assert kept[head] is None and all(kept[n] == "rtn" for n in table.float_bytes if n != head)
