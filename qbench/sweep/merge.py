"""A point's shard results joined into the one result a single `qbench run` of the point writes.

Everything a result says about the transcripts comes out the same as a single run's, bit for
bit: the shards hold whole batches of the run, in its order, so every utterance was decoded in
the batch it would have been in (`qbench.sweep.state.cut_shards`); the utterances are joined in
that order, so the sums behind WER, CER and the audio seconds add in the same order, and the
hypotheses digest is the digest of the same lines. The header (model, dataset, quantization,
calibration, activations, warnings, identity) is the point's prepared header, the one the
single run builds.

What is a measurement of the processes that did the work is combined as such: wall seconds add
up (and RTF and RTFx follow from them), the peak RSS is the largest shard's. On a device, the
batches and the operation counts add up (the same batches, so the same counts; the one float,
the arithmetic energy, is priced again from the summed counts as a run prices its own), the
measured peak is the largest shard's, and the measured batches are the shards' own (tracemalloc
measures a shard's first batch and its growing estimates, as it does for a run).
"""

from __future__ import annotations

from typing import Any

from qbench.embedded.compute import ComputeReport, operation_energy_pj
from qbench.errors import QBenchError
from qbench.evaluate import summarize
from qbench.results import RunResult, hypotheses_digest
from qbench.sweep.state import PointPlan


class MergeError(QBenchError, ValueError):
    """Shard results that do not make up their point (a bug, or files edited by hand)."""


def merge_shards(plan: PointPlan, shards: dict[int, RunResult]) -> RunResult:
    """The point's result from its shards' (by shard index). A shard that ended as the device's
    does-not-fit verdict makes the point's result that verdict, with the utterances of the
    shards before it that finished (as a single run's verdict holds those it transcribed)."""
    name = plan.spec.output_path.stem
    verdicts = [i for i, s in sorted(shards.items())
                if s.status == "failed" and s.device is not None and not s.device.get("fits")]
    verdict = shards[verdicts[0]] if verdicts else None
    if verdict is None and sorted(shards) != list(range(len(plan.shards))):
        raise MergeError(f"{name}: shard results {sorted(shards)} for {len(plan.shards)} shards")
    kept = [s for i, s in sorted(shards.items()) if verdict is None or i <= verdicts[0]]
    for index, shard in sorted(shards.items()):
        got = [u.id for u in shard.utterances]
        if shard is not verdict and shard in kept and (shard.status != "complete" or got != plan.shards[index]):
            raise MergeError(f"{name}: shard {index} is {shard.status} with {len(got)} of its "
                             f"{len(plan.shards[index])} utterances")
    result = plan.header.model_copy(deep=True)
    result.utterances = [u for s in kept for u in s.utterances]
    result.resumed_utterances = sum(s.resumed_utterances for s in kept)
    # a shard's own warnings (journaled audio that changed on disk) beside the header's
    result.warnings = list(plan.header.warnings) + [w for s in kept for w in s.warnings if w not in plan.header.warnings]
    result.hypotheses_sha256 = hypotheses_digest((u.id, u.hypothesis_normalized) for u in result.utterances)
    measured = [s.metrics for s in kept if s.metrics is not None]
    if measured:
        metrics = summarize(result.utterances, sum(m.wall_seconds for m in measured), measured[0].model_bytes)
        metrics.peak_rss_bytes = max(m.peak_rss_bytes for m in measured)
        result.metrics = metrics
    if plan.device is not None:
        result.device = merged_device([s.device for s in kept], plan.header.device)
    if verdict is not None:
        result.status, result.error = "failed", verdict.error
    else:
        result.status, result.error = "complete", None
        result.devices_fitted = plan.devices_fitted
    return result


def merged_device(records: list[dict[str, Any]], prepared: dict[str, Any]) -> dict[str, Any]:
    """One device record from the shards' (see the module's docstring for what is summed)."""
    last = records[-1]  # the verdict, when there is one, is the last shard's
    merged = dict(last)
    merged["batch_size_chosen"] = prepared["batch_size_chosen"]  # a shard is given the batch size the point chose
    merged["batches"] = sum(r["batches"] for r in records)
    offsets = [sum(r["batches"] for r in records[:i]) for i in range(len(records))]
    merged["measured_batches"] = [offset + b for r, offset in zip(records, offsets) for b in r["measured_batches"]]
    peaks = [r["measured_peak_bytes"] for r in records if r.get("measured_peak_bytes") is not None]
    merged["measured_peak_bytes"] = max(peaks) if peaks else None
    merged["compute"] = merged_compute([ComputeReport.model_validate(r["compute"]) for r in records]).model_dump(mode="json")
    return merged


def merged_compute(reports: list[ComputeReport]) -> ComputeReport:
    """The shards' arithmetic as one run's: counts summed, the energy priced from the sums."""

    def add(values: list[Any]) -> Any:
        if isinstance(values[0], dict):
            keys = sorted({k for v in values for k in v})
            return {k: add([v[k] for v in values if k in v]) for k in keys}
        return sum(values)

    first = reports[0]
    dumped = [r.model_dump() for r in reports]
    fields = {name: add([d[name] for d in dumped]) for name in dumped[0]
              if name not in ("activation_bits", "attention_bits", "arithmetic_energy_pj", "macs_per_second")}
    operations = fields["operations"]
    wall = fields["wall_seconds"]
    return ComputeReport(
        **fields, activation_bits=first.activation_bits, attention_bits=first.attention_bits,
        arithmetic_energy_pj=float(sum(n * operation_energy_pj(op) for op, n in operations.items())),
        macs_per_second=fields["total_macs"] / wall if wall else 0.0,
    )
