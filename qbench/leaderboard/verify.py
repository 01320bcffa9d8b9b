"""`qbench verify ENTRY`: rerun an entry exactly as it was produced and compare every figure.

The rerun is `run_benchmark(RunSpec.from_entry(entry))`: the entry's own model, exact
utterances, quantizer with its full config and policy, calibration set, device and batch size,
on the thread count the entry records (the device session budgets one attention score buffer
per thread, so its RAM total depends on it; transcripts do not).

It reproduces when the weights and the utterance set are the same (sha256s), the hypotheses
digest is the same (on the same qbench version: another version may legitimately change
transcripts), and every figure the page shows or ranks by comes out equal: WER, CER, audio
seconds, model bytes, bits per weight, quantized fraction, the quantized artifact's digest
(when both have one), the devices fitted, the device verdict and RAM total, and every compute
count. The submitter's measurements (timings, peak RSS, the machine) are not compared.
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from qbench import __version__
from qbench.evaluate import RunFailed
from qbench.leaderboard.entry import EntryError, LeaderboardEntry, entry_compute, read_entry
from qbench.results import RunResult
from qbench.run import RunProgress, RunSpec, run_benchmark

_TOLERANCE = 1e-9


class VerifyReport(BaseModel):
    entry: str
    reproduced: bool
    problems: list[str]
    wer_entry: float
    wer_rerun: float | None
    hypotheses_match: bool | None


def _flat(value: Any, prefix: str) -> dict[str, Any]:
    """Nested dicts as `a.b.c` -> leaf, so two reports can be compared leaf by leaf."""
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(_flat(item, f"{prefix}.{key}"))
        return out
    return {prefix: value}


def _differences(field: str, rerun: Any, claimed: Any) -> list[str]:
    rerun_leaves, claimed_leaves = _flat(rerun, field), _flat(claimed, field)
    problems = []
    for key in sorted(set(rerun_leaves) | set(claimed_leaves)):
        here, there = rerun_leaves.get(key), claimed_leaves.get(key)
        same = (here == there if not (isinstance(here, float) or isinstance(there, float))
                else here is not None and there is not None and math.isclose(here, there, rel_tol=_TOLERANCE, abs_tol=_TOLERANCE))
        if not same:
            problems.append(f"{key}: {here!r} on rerun, the entry says {there!r}")
    return problems


def compare_rerun(entry: LeaderboardEntry, result: RunResult) -> list[str]:
    """Every way the rerun `result` differs from what `entry` claims (empty: reproduced)."""
    problems: list[str] = []
    if result.status != "complete" or result.metrics is None:
        return [f"rerun did not complete: {result.error}"]
    if result.model.sha256 != entry.model.sha256:
        problems.append(f"weights differ: sha256 {result.model.sha256[:12]}… here, {entry.model.sha256[:12]}… in the entry")
    if result.dataset.utterance_ids_sha256 != entry.dataset.utterance_ids_sha256:
        problems.append("the utterances present here differ from the entry's (ids digest)")
    if entry.qbench_version == __version__ and result.hypotheses_sha256 != entry.hypotheses_sha256:
        problems.append("hypotheses differ from the entry's on the same qbench version")
    m = result.metrics
    if not abs(m.wer - entry.wer) <= _TOLERANCE:
        problems.append(f"WER {100 * m.wer:.3f} % on rerun, entry says {100 * entry.wer:.3f} %")
    problems += _differences("cer", m.cer, entry.cer)
    problems += _differences("audio_seconds", m.audio_seconds, entry.audio_seconds)
    problems += _differences("model_bytes", m.model_bytes, entry.model_bytes)
    problems += _quantizer_differences(entry, result)
    if result.calibration is not None or entry.calibration is not None:
        problems += _differences("calibration.utterance_ids_sha256", (result.calibration or {}).get("utterance_ids_sha256"),
                                 entry.calibration.utterance_ids_sha256 if entry.calibration else None)
    problems += _differences("devices_fitted", ", ".join(sorted(result.devices_fitted or [])), ", ".join(entry.devices_fitted))
    problems += _device_differences(entry, result)
    return problems


def _quantizer_differences(entry: LeaderboardEntry, result: RunResult) -> list[str]:
    q, here = entry.quantizer, result.quantization
    if q is None or here is None:
        return [] if q is None and here is None else ["quantizer: the rerun and the entry disagree on whether the model is quantized"]
    problems = []
    if here.get("distribution_version") != q.distribution_version:
        problems.append(f"{q.distribution} {here.get('distribution_version')} installed, the entry used {q.distribution_version}")
    problems += _differences("quantizer.version", here.get("quantizer_version"), q.version)
    problems += _differences("quantizer.config", here.get("config"), q.config)
    problems += _differences("quantizer.mean_bits_per_weight", here.get("mean_bits_per_weight"), q.mean_bits_per_weight)
    problems += _differences("quantizer.quantized_fraction", here.get("quantized_fraction"), q.quantized_fraction)
    problems += _differences("quantizer.scale_dtype", here.get("scale_dtype"), q.scale_dtype)
    artifact = here.get("artifact_sha256")
    if q.artifact_sha256 is not None and artifact is not None and artifact != q.artifact_sha256:
        problems.append(f"quantizer.artifact_sha256: {artifact[:12]}… on rerun, the entry says {q.artifact_sha256[:12]}…")
    return problems


def _device_differences(entry: LeaderboardEntry, result: RunResult) -> list[str]:
    d, here = entry.device, result.device
    if d is None or here is None:
        return [] if d is None and here is None else ["device: the rerun and the entry disagree on whether a device budget applied"]
    problems = _differences("device.name", here["profile"]["name"], d.name)
    problems += _differences("device.fits", bool(here["fits"]), d.fits)
    problems += _differences("device.batch_size", here.get("batch_size"), d.batch_size)
    problems += _differences("device.total_ram_bytes", (here.get("breakdown") or {}).get("total_ram_bytes"), d.total_ram_bytes)
    if here.get("compute") is not None or entry.compute is not None:
        try:
            rerun_counts = entry_compute(here["compute"])[0].model_dump() if here.get("compute") is not None else None
        except EntryError as exc:
            return problems + [f"compute: {exc}"]
        recorded = entry.compute.model_dump() if entry.compute else None
        if recorded is not None and rerun_counts is not None:
            # an entry made before a count existed is checked on the counts it holds
            held = entry.compute.model_fields_set
            rerun_counts = {k: v for k, v in rerun_counts.items() if k in held}
            recorded = {k: v for k, v in recorded.items() if k in held}
        problems += _differences("compute", rerun_counts, recorded)
    return problems


def verify_entry(path: Path, data_dir: str | None, progress: RunProgress | None = None) -> VerifyReport:
    """Rerun the entry at `path` and compare with what it claims."""
    entry = read_entry(path)
    # the rerun's result file is scratch: the entry is the record
    with tempfile.TemporaryDirectory() as tmp:
        spec = RunSpec.from_entry(entry, data_dir=data_dir, output=str(Path(tmp) / "rerun.json"))
        spec = spec.model_copy(update={"threads": entry.submitted_measurements.machine.threads})
        try:
            result = run_benchmark(spec, progress)
        except RunFailed as exc:
            return VerifyReport(entry=str(path), reproduced=False, problems=[f"rerun failed: {exc}"],
                                wer_entry=entry.wer, wer_rerun=None, hypotheses_match=None)
    problems = compare_rerun(entry, result)
    return VerifyReport(entry=str(path), reproduced=not problems, problems=problems, wer_entry=entry.wer,
                        wer_rerun=result.metrics.wer if result.metrics else None,
                        hypotheses_match=result.hypotheses_sha256 == entry.hypotheses_sha256)
