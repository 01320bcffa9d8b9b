"""A sweep's folder: where each point's result, artifact, plan and shards live, and what they say.

    <out>/sweep.json                      SweepManifest: the points and how each ended (a summary)
    <out>/points/<point>.json             the point's result: what `qbench run -o` of it writes
    <out>/points/<point>.safetensors      its quantized model (beside the result, as a run puts it)
    <out>/work/<point>/plan.json          PointPlan: the prepared point (header, batch size, shards)
    <out>/work/<point>/shard-000.json     a shard's result (a RunResult), with its .journal while it runs
    <out>/pareto__<model>__<subset>.svg   the chart of the finished points

The files, not the manifest, decide what a resumed sweep does: a point whose result is complete
(for this spec's identity and these weights) is done; a plan whose identity, weights and
artifact digest still hold is not prepared again; a complete shard is not evaluated again, and
an unfinished one resumes from its journal (`qbench.journal`). Every file is written whole
(temporary file and rename), so a kill at any moment leaves the old file or the new one.
"""

from __future__ import annotations

import hashlib
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, ValidationError

from qbench import __version__
from qbench.embedded.profile import DeviceProfile
from qbench.quant.artifact import ArtifactError, read_artifact
from qbench.results import RunResult, write_atomically
from qbench.run import RunSpec

MANIFEST = "sweep.json"


class PointPlan(BaseModel):
    """A prepared point: everything its shards need besides the audio and the weights."""

    kind: Literal["qbench-sweep-point-plan"] = "qbench-sweep-point-plan"
    plan_version: int = 1
    identity: str = Field(description="the point's RunSpec.identity()")
    spec: RunSpec
    header: RunResult = Field(description="the result as a single run has it before its first utterance; when the "
                                          "point does not fit its device, the run's does-not-fit verdict")
    fits: bool = Field(description="the model fits the device (always true without one)")
    batch_size: int = Field(description="the batch size a single run transcribes in (on a device, the one it chose)")
    shards: list[list[str]] = Field(description="utterance ids per shard: runs of whole batches, in the run's order")
    device: DeviceProfile | None = None
    devices_fitted: list[str] | None = Field(None, description="what a single run computes at its end, computed once here")
    artifact: str | None = Field(None, description="the quantized model the shards evaluate (None: float weights)")
    artifact_sha256: str | None = None


class PointRecord(BaseModel):
    name: str = Field(description="the point's file stem under points/")
    identity: str
    label: str
    plugin: str | None
    output: str
    status: Literal["pending", "complete", "failed", "does-not-fit"] = "pending"
    reason: str | None = Field(None, description="why the point failed or does not fit: one line")
    wer: float | None = None
    model_bytes: int | None = None


class SweepManifest(BaseModel):
    kind: Literal["qbench-sweep"] = "qbench-sweep"
    manifest_version: int = 1
    name: str
    qbench_version: str = __version__
    updated_at: str = Field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))
    executor: str
    workers: int
    shards: int
    points: list[PointRecord]


class SweepLayout:
    """The paths of one sweep folder."""

    def __init__(self, out: Path):
        self.out = Path(out)

    @property
    def manifest(self) -> Path:
        return self.out / MANIFEST

    @property
    def points(self) -> Path:
        return self.out / "points"

    def work(self, spec: RunSpec) -> Path:
        return self.out / "work" / spec.output_path.stem

    def plan(self, spec: RunSpec) -> Path:
        return self.work(spec) / "plan.json"

    def shard(self, spec: RunSpec, index: int) -> Path:
        return self.work(spec) / f"shard-{index:03d}.json"

    def chart(self, model: str, subset: str) -> Path:
        return self.out / f"pareto__{model}__{subset}.svg"


def write_model(path: Path, model: BaseModel) -> Path:
    return write_atomically(path, model.model_dump_json(indent=2) + "\n")


def shard_identity(point_identity: str, index: int, ids: list[str]) -> str:
    """A shard's own identity (its result file's `identity`): the point's, the shard's place and
    its utterances. A shard file from another cut of the same point is never taken for this one."""
    text = "\n".join([point_identity, f"shard {index}", *ids])
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def cut_shards(ids: list[str], batch_size: int, shards: int) -> list[list[str]]:
    """`ids` (in the run's order) as at most `shards` contiguous runs of whole batches of
    `batch_size`, as even as whole batches allow: a shard's batches are exactly batches of the
    single run (batched decoding is not batch-invariant: a row alone in its batch is a GEMV,
    which OpenBLAS rounds differently from the GEMM of a batch)."""
    batches = [ids[i : i + batch_size] for i in range(0, len(ids), batch_size)]
    count = max(1, min(shards, len(batches)))
    per, extra = divmod(len(batches), count)
    cut, start = [], 0
    for k in range(count):
        n = per + (1 if k < extra else 0)
        cut.append([uid for batch in batches[start : start + n] for uid in batch])
        start += n
    return cut


def complete_result(path: Path, identity: str, model_sha256: str) -> RunResult | None:
    """The complete result of `identity` on these weights at `path`, else None (absent,
    unfinished, unreadable or another run's: the caller decides what that means)."""
    try:
        result = RunResult.read(path)
    except (OSError, ValueError):
        return None
    if result.status != "complete" or result.identity != identity or result.model.sha256 != model_sha256:
        return None
    return result


def valid_plan(path: Path, spec: RunSpec, model_sha256: str) -> PointPlan | None:
    """The plan at `path` when it still holds for `spec` on these weights, with its artifact
    present and matching its digest (read in full: a damaged artifact is prepared again rather
    than failing every shard); None otherwise."""
    try:
        plan = PointPlan.model_validate_json(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, ValidationError):
        return None
    if plan.identity != spec.identity() or plan.header.model.sha256 != model_sha256:
        return None
    if plan.artifact is not None:
        try:
            manifest, _ = read_artifact(Path(plan.artifact))
        except ArtifactError:
            return None
        if manifest.digest != plan.artifact_sha256:
            return None
    return plan
