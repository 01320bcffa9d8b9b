"""Quantization plans: a quantizer (or float) per layer, validated, run, recorded and rerun.

The runs use the real whisper-tiny.en weights on two test-clean utterances with RTN, which
needs no calibration and quantizes in a second, so each plan run costs a few seconds.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qbench.cli import main
from qbench.leaderboard.entry import entry_from_result, entry_label
from qbench.models.weight_store import WeightInfo
from qbench.quant.plan import (
    PlanError,
    PlanRule,
    QuantizationPlan,
    read_plan,
    write_plan,
)
from qbench.results import RunResult
from qbench.run import RunSpec

LAYERS = [WeightInfo(name=n, shape=(4, 4), kind="linear") for n in
          ("encoder.blocks.0.attn.qkv", "encoder.blocks.0.mlp.fc1", "decoder.blocks.0.attn.qkv")] + [
          WeightInfo(name="decoder.token_embedding", shape=(10, 4), kind="embedding")]


def plan(*rules: tuple) -> QuantizationPlan:
    return QuantizationPlan(name="p", rules=[PlanRule(match=m, plugin=p, config=c) for m, p, c in rules])


def test_every_layer_gets_exactly_one_rule():
    p = plan((["encoder.*"], "rtn", {"bits": 8}), (["decoder.blocks.*"], "rtn", {"bits": 4}), (["decoder.token_embedding"], None, {}))
    assigned = p.assign(LAYERS)
    assert assigned["encoder.blocks.0.mlp.fc1"].config == {"bits": 8}
    assert assigned["decoder.token_embedding"].plugin is None
    assert p.quantizers() == [("rtn", {"bits": 8}), ("rtn", {"bits": 4})]


@pytest.mark.parametrize("rules, message", [
    ([(["encoder.*"], "rtn", {})], r"no rule matches layer\(s\) decoder.blocks.0.attn.qkv, decoder.token_embedding"),
    ([(["*"], "rtn", {}), (["decoder.token_embedding"], None, {})], "decoder.token_embedding is matched by rules 1 and 2"),
    ([(["*"], "rtn", {}), (["nothing.*"], None, {})], r"rule\(s\) 2 match no layer"),
])
def test_a_plan_that_is_not_a_partition_is_refused_in_one_line(rules, message):
    with pytest.raises(PlanError, match=message) as info:
        plan(*rules).assign(LAYERS)
    assert "\n" not in str(info.value)


def test_plan_files_round_trip_and_bad_ones_name_the_file(tmp_path):
    p = plan((["*"], "rtn", {"bits": 3}))
    assert read_plan(write_plan(p, tmp_path / "p.json")) == p
    toml = tmp_path / "p.toml"
    toml.write_text('name = "t"\n[[rules]]\nmatch = ["*"]\nplugin = "rtn"\nconfig = { bits = 3 }\n')
    assert read_plan(toml).rules[0].config == {"bits": 3}
    toml.write_text('name = "t"\n[[rules]]\nmatch = []\n')
    with pytest.raises(PlanError, match=r"p.toml: rules.0.match"):
        read_plan(toml)
    toml.write_text("name = ")
    with pytest.raises(PlanError, match="not valid toml"):
        read_plan(toml)
    with pytest.raises(PlanError, match="cannot read"):
        read_plan(tmp_path / "missing.toml")


def test_a_plan_is_neither_a_plugin_nor_an_embedding_policy():
    with pytest.raises(ValueError, match="instead of a plugin"):
        RunSpec(plugin="rtn", plan=plan((["*"], "rtn", {})))


def _run(tmp_path: Path, name: str, data_dir: Path, *extra: str) -> dict:
    out = tmp_path / f"{name}.json"
    argv = ["run", "--limit", "2", "--data-dir", str(data_dir), "--device", "none", "--threads", "1", "-o", str(out), "-q"]
    assert main(argv + list(extra)) == 0
    return json.loads(out.read_text())


def test_a_plan_equal_to_a_uniform_run_gives_its_hypotheses_and_a_mixed_plan_records_each_layer(tiny_en, data_dir, tmp_path):
    uniform = _run(tmp_path, "uniform", data_dir, "--plugin", "rtn", "--set", "bits=4")
    same = plan((["encoder.*", "decoder.blocks.*"], "rtn", {"bits": 4}), (["decoder.token_embedding"], None, {}))
    planned = _run(tmp_path, "same", data_dir, "--plan", str(write_plan(same, tmp_path / "plans" / "same.json")))
    assert planned["hypotheses_sha256"] == uniform["hypotheses_sha256"]
    assert planned["metrics"]["model_bytes"] == uniform["metrics"]["model_bytes"]
    q = planned["quantization"]
    assert q["quantizer"] == "plan" and q["config"] == same.model_dump(mode="json")
    assert [p["name"] for p in q["plan_quantizers"]] == ["rtn"] and q["plan_quantizers"][0]["config"]["bits"] == 4

    mixed = plan((["encoder.*"], "rtn", {"bits": 8}), (["decoder.blocks.*"], "rtn", {"bits": 3}),
                 (["decoder.token_embedding"], None, {}))
    result = _run(tmp_path, "mixed", data_dir, "--plan", str(write_plan(mixed, tmp_path / "plans" / "mixed.json")))
    layers = {layer["name"]: layer for layer in result["quantization"]["layers"]}
    assert layers["encoder.blocks.0.mlp.fc1"]["code_bits"] == 8 and layers["decoder.blocks.0.mlp.fc1"]["code_bits"] == 3
    assert "decoder.token_embedding" in result["quantization"]["skipped"]

    # the entry records the plan whole, and the spec it reruns is the plan again
    entry = entry_from_result(RunResult.model_validate(result), [])
    assert entry_label(entry.quantizer) == "plan-p"
    assert RunSpec.from_entry(entry).plan == mixed

    # and the plan's artifact runs with no plugin at all, to the same transcripts
    again = _run(tmp_path, "again", data_dir, "--artifact", result["quantization"]["artifact_path"])
    assert again["hypotheses_sha256"] == result["hypotheses_sha256"]


def test_a_plan_naming_an_unknown_plugin_stops_before_quantizing(tiny_en, data_dir, tmp_path, capsys):
    bad = write_plan(plan((["*"], "no-such-quantizer", {})), tmp_path / "bad.json")
    code = main(["run", "--limit", "1", "--data-dir", str(data_dir), "--device", "none", "--plan", str(bad), "-q",
                 "-o", str(tmp_path / "r.json")])
    err = capsys.readouterr().err
    assert code != 0 and "no-such-quantizer" in err and len(err.strip().splitlines()) <= 2
