"""Carrying out a sweep: its points' tasks scheduled on an executor, its folder kept up to date.

The runner is the only writer of a sweep's plans, point results and manifest (workers write
artifacts and shard journals and results, which the runner reads). It keeps at most as many
tasks in flight as the executor runs at once, and chooses late which goes next: a prepared
point's shards before the next point's preparation, so points finish one after another rather
than all at the end, and a failure shows early.

A point fails alone, with a one-line reason: its plugin crashed, hung past its timeout or is
not installed, its model or data cannot be found, a shard met a bad audio file, a worker died
on it every time it was tried. Its shards not yet started are dropped; every other point goes
on. A point that does not fit its device is a verdict (its result file says so, as a single
run's does), not a failure.
"""

from __future__ import annotations

import functools
import time
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol

from qbench.checkpoints.loader import weights_sha256
from qbench.data.librispeech import find_data_dir, list_utterances
from qbench.errors import QBenchError, describe, one_line
from qbench.journal import JournalError, OutputInUseError, claim_output, journal_path
from qbench.results import RunResult
from qbench.run import RunSpec, select_utterances
from qbench.sweep.merge import merge_shards
from qbench.sweep.progress import SweepProgress
from qbench.sweep.state import (
    PointPlan,
    PointRecord,
    SweepLayout,
    SweepManifest,
    complete_result,
    shard_identity,
    valid_plan,
    write_model,
)
from qbench.sweep.tasks import PrepareTask, ShardTask

#: seconds between looks at the shards' journals (the progress line's utterance count)
POLL_SECONDS = 0.5


class Executor(Protocol):
    """Where tasks run: `local.LocalExecutor` or `ray_executor.RayExecutor`."""

    name: str
    workers: int

    @property
    def capacity(self) -> int:
        """Tasks it runs at once."""

    def submit_prepare(self, task: PrepareTask) -> Any:
        """Start `task`; returns a handle for `wait` (the task's value is a `PointPlan`)."""

    def submit_shard(self, task: ShardTask) -> Any:
        """Start `task`; returns a handle for `wait` (the task's value is the shard's `RunResult`)."""

    def wait(self, handles: list[Any], timeout: float) -> list[tuple[Any, Any]]:
        """The handles that finished within `timeout` s, each with its value or exception."""

    def close(self) -> None:
        """Stop every worker and free the executor's resources."""


@dataclass(eq=False)
class Point:
    spec: RunSpec
    record: PointRecord
    sha256: str | None = None
    plan: PointPlan | None = None
    shards: dict[int, RunResult] = field(default_factory=dict)
    result: RunResult | None = None
    estimate: int = 0  # utterances before the plan gives the exact count

    @property
    def finished(self) -> bool:
        return self.record.status != "pending"


@dataclass
class SweepOutcome:
    name: str
    points: list[Point]

    @property
    def failed(self) -> list[Point]:
        return [p for p in self.points if p.record.status == "failed"]


def point_name(spec: RunSpec) -> str:
    return spec.output_path.stem


def point_plugin(spec: RunSpec) -> str | None:
    return "plan" if spec.plan is not None else ("artifact" if spec.artifact is not None else spec.plugin)


def run_sweep(name: str, specs: list[RunSpec], out: Path, executor: Executor, shards: int, threads: int,
              progress: SweepProgress) -> SweepOutcome:
    """Run every point of `specs` (their outputs inside `out/points/`) on `executor`, in
    `shards` shards each, `threads` threads per task; resumes from what `out` holds."""
    return SweepRunner(name, specs, SweepLayout(out), executor, shards, threads, progress).run()


class SweepRunner:
    def __init__(self, name: str, specs: list[RunSpec], layout: SweepLayout, executor: Executor, shards: int,
                 threads: int, progress: SweepProgress):
        self.name, self.layout, self.executor = name, layout, executor
        self.shards, self.threads, self.progress = shards, threads, progress
        self.points = [Point(spec, PointRecord(name=point_name(spec), identity=spec.identity(), label=spec.label,
                                               plugin=point_plugin(spec), output=str(spec.output_path)))
                       for spec in specs]
        self.to_prepare: deque[Point] = deque()
        self.to_evaluate: deque[tuple[Point, ShardTask]] = deque()
        self.running: dict[Any, tuple[Point, PrepareTask | ShardTask]] = {}
        # hashing the weights takes a moment: once per model, however many points use it
        self._weights = functools.cache(weights_sha256)

    # -- the sweep as a whole ------------------------------------------------------------------------

    def run(self) -> SweepOutcome:
        self.layout.out.mkdir(parents=True, exist_ok=True)
        try:
            for point in self.points:
                self._resume(point)
            done = sum(p.finished for p in self.points)
            shards_done = sum(len(p.shards) for p in self.points if not p.finished)
            if done or shards_done or any(p.plan for p in self.points if not p.finished):
                self.progress.note(f"resuming {self.layout.out}: {done} of {len(self.points)} points finished, "
                                   f"{sum(p.plan is not None for p in self.points if not p.finished)} more prepared, "
                                   f"{shards_done} of their shards done")
            self.progress.start(len(self.points), done)
            self._write_manifest()
            last_poll = 0.0
            while self.to_prepare or self.to_evaluate or self.running:
                self._fill()
                if not self.running:
                    continue
                for handle, outcome in self.executor.wait(list(self.running), timeout=POLL_SECONDS):
                    point, task = self.running.pop(handle)
                    if isinstance(task, PrepareTask):
                        self._prepared(point, outcome)
                    else:
                        self._evaluated(point, task, outcome)
                if time.monotonic() - last_poll >= POLL_SECONDS:
                    self._report_utterances()
                    last_poll = time.monotonic()
            self._report_utterances()
        finally:
            self._write_manifest()
        return SweepOutcome(self.name, self.points)

    def _fill(self) -> None:
        """Start tasks up to the executor's capacity: shards of prepared points first."""
        while len(self.running) < self.executor.capacity and (self.to_evaluate or self.to_prepare):
            if self.to_evaluate:
                point, task = self.to_evaluate.popleft()
                if point.finished:
                    continue  # its point failed: its other shards are not run
                self.running[self.executor.submit_shard(task)] = (point, task)
            else:
                point = self.to_prepare.popleft()
                task = PrepareTask(point.spec, self.shards, self.threads)
                self.running[self.executor.submit_prepare(task)] = (point, task)

    # -- one point ------------------------------------------------------------------------------------

    def _resume(self, point: Point) -> None:
        """What the folder holds for `point` decides where it starts."""
        spec = point.spec
        try:
            point.sha256 = self._weights(spec.model, spec.weights)
            # another run's result at the point's file is never overwritten (one line, as for qbench run)
            prior = claim_output(spec.output_path, spec.identity(), lambda: point.sha256)
        except (OutputInUseError, JournalError) as exc:
            # a result file is never overwritten by another run's; a sweep has no --force
            self._fail(point, one_line(exc).split("; pass --force")[0] + "; move it away, or sweep into another --out")
            return
        except QBenchError as exc:
            self._fail(point, one_line(exc))
            return
        if prior.complete is not None:
            point.result = prior.complete
            self._finish(point, "complete", report=False)
            return
        plan = valid_plan(self.layout.plan(spec), spec, point.sha256)
        if plan is not None:
            self._planned(point, plan)
        else:
            point.estimate = self._estimate(spec)
            self.to_prepare.append(point)

    def _prepared(self, point: Point, outcome: Any) -> None:
        if isinstance(outcome, BaseException):
            self._fail(point, failure_reason(outcome))
            return
        write_model(self.layout.plan(point.spec), outcome)
        self._planned(point, outcome)

    def _planned(self, point: Point, plan: PointPlan) -> None:
        point.plan = plan
        spec = point.spec
        if not plan.fits:
            point.result = plan.header.model_copy()
            point.result.write(spec.output_path)
            self._finish(point, "does-not-fit", plan.header.error)
            return
        for index, ids in enumerate(plan.shards):
            path = self.layout.shard(spec, index)
            done = complete_result(path, shard_identity(plan.identity, index, ids), point.sha256)
            if done is not None:
                point.shards[index] = done
            else:
                self.to_evaluate.append((point, ShardTask(plan, index, str(path), self.threads)))
        if len(point.shards) == len(plan.shards):
            self._merge(point)

    def _evaluated(self, point: Point, task: ShardTask, outcome: Any) -> None:
        if point.finished:
            return  # the point failed while this shard ran
        if isinstance(outcome, BaseException):
            self._fail(point, f"shard {task.index}: {failure_reason(outcome)}")
            return
        point.shards[task.index] = outcome
        if outcome.status != "complete":
            # the device's does-not-fit verdict: the shards after it would meet the same budget
            self._merge(point)
        elif len(point.shards) == len(point.plan.shards):
            self._merge(point)

    def _merge(self, point: Point) -> None:
        plan = point.plan
        try:
            result = merge_shards(plan, point.shards)
        except QBenchError as exc:
            self._fail(point, one_line(exc))
            return
        result.write(point.spec.output_path)
        point.result = result
        if result.status == "complete":
            self._finish(point, "complete")
        else:
            self._finish(point, "does-not-fit", result.error)

    def _fail(self, point: Point, reason: str) -> None:
        self._finish(point, "failed", reason)

    def _finish(self, point: Point, status: str, reason: str | None = None, report: bool = True) -> None:
        record = point.record
        record.status, record.reason = status, reason
        if point.result is not None and point.result.metrics is not None:
            record.wer, record.model_bytes = point.result.metrics.wer, point.result.metrics.model_bytes
        if report:
            self.progress.point_finished(record)
            self._write_manifest()

    # -- what the display and the manifest say --------------------------------------------------------

    def _estimate(self, spec: RunSpec) -> int:
        """Utterances a point will score, before its plan counts them exactly (0 when the data
        cannot be listed: the prepare task then fails with the reason)."""
        try:
            present = self._listed(spec.data_dir, spec.subset)
            return len(select_utterances(present, spec.limit, spec.utterance_ids))
        except QBenchError:
            return 0

    @functools.cache  # noqa: B019 - one listing per subset for the runner's lifetime (a sweep)
    def _listed(self, data_dir: str | None, subset: str) -> list:
        return list_utterances(find_data_dir(data_dir, subset), subset)

    def _report_utterances(self) -> None:
        done = total = 0
        in_flight = {(id(p), t.index) for p, t in self.running.values() if isinstance(t, ShardTask)}
        for point in self.points:
            if point.result is not None and point.record.status == "complete":
                done += len(point.result.utterances)
                total += len(point.result.utterances)
                continue
            if point.plan is None:
                total += 0 if point.finished else point.estimate
                continue
            finished = sum(len(s.utterances) for s in point.shards.values())
            for index in range(len(point.plan.shards)):
                if (id(point), index) in in_flight:
                    finished += journal_records(journal_path(self.layout.shard(point.spec, index)))
            done += finished
            total += finished if point.finished else sum(len(ids) for ids in point.plan.shards)
        self.progress.utterances(done, total)

    def _write_manifest(self) -> None:
        manifest = SweepManifest(name=self.name, executor=self.executor.name, workers=self.executor.workers,
                                 shards=self.shards, points=[p.record for p in self.points],
                                 updated_at=datetime.now(timezone.utc).isoformat(timespec="seconds"))
        write_model(self.layout.manifest, manifest)


def failure_reason(exc: BaseException) -> str:
    """A task's failure as its point's one-line reason: qbench's own messages as they are
    (they name the plugin, layer or file at fault), anything else with its type."""
    return one_line(exc) if isinstance(exc, QBenchError) else describe(exc)


def journal_records(path: Path) -> int:
    """Utterances a shard's journal holds so far (its lines after the header; 0 when absent)."""
    try:
        return max(path.read_bytes().count(b"\n") - 1, 0)
    except OSError:
        return 0
