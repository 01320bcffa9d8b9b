"""The default executor: a pool of worker processes on this machine, sized to its cores and memory.

Each worker is a fresh interpreter (the `spawn` start method: no state forked from a driver
that has threads running), keeps the float weights it loaded and the last artifact it read
between tasks (a point's shards mostly land on the workers that already hold it), and reads
artifacts from the sweep's folder (a shared path, written once by the prepare task). A worker
ends when the sweep process does, killed or not (`PR_SET_PDEATHSIG`, and a watchdog thread where
that is not available), so a resumed sweep never races an orphan over a shard's journal.

A worker that dies (killed, out of memory) breaks a `ProcessPoolExecutor` as a whole: the
tasks that were running then are started again on a fresh pool, up to `max_retries` times
each; a shard resumes from its journal, so little is redone.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from typing import Any

import psutil

from qbench.errors import QBenchError
from qbench.results import RunResult
from qbench.run import RunSpec
from qbench.sweep.state import PointPlan
from qbench.sweep.tasks import (
    Artifact,
    PrepareTask,
    ShardTask,
    evaluate_shard,
    prepare_point,
)

#: Resident memory of one worker besides its model: the interpreter, numpy, qbench, the audio
#: of a batch and the decoder's buffers (a tiny.en run at batch 8 peaks at 426 MiB in all).
WORKER_BASE_BYTES = 256 * 2**20
#: Bytes per model parameter a worker holds at its peak: the float16 weights as loaded (2), the
#: float32 matrices the store makes of them (4), and the packed model or the plugin process's
#: copy while quantizing (up to 6): 12, a margin over tiny.en's measured 4.6.
WORKER_BYTES_PER_PARAMETER = 12
_PR_SET_PDEATHSIG = 1


class WorkerDiedError(QBenchError, RuntimeError):
    """A task's worker process died every time it was tried."""


def worker_memory_estimate(spec: RunSpec) -> int:
    """Bytes one worker needs at its peak for `spec`'s model (see the constants above)."""
    from qbench.checkpoints.registry import get_card

    try:
        parameters = get_card(spec.model).parameters if spec.model is not None else None
    except QBenchError:
        parameters = None
    if parameters is None and spec.weights is not None:
        # weights no card names: their file size, at the float16 most checkpoints are stored in
        from qbench.checkpoints.loader import weights_location

        path = weights_location(spec.model, spec.weights)[0]
        files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
        parameters = sum(p.stat().st_size for p in files) // 2
    return WORKER_BASE_BYTES + WORKER_BYTES_PER_PARAMETER * (parameters or 0)


def pool_size(specs: list[RunSpec], cores: int | None = None, available: int | None = None) -> tuple[int, str]:
    """Workers for `specs` on this machine: one per core, fewer when the available memory does
    not hold that many of the largest model's workers; and the one line that says why."""
    if cores is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    available = available if available is not None else psutil.virtual_memory().available
    per_worker = max(worker_memory_estimate(s) for s in specs)
    by_memory = max(1, available // per_worker)
    workers = max(1, min(cores, by_memory))
    why = (f"{workers} local workers: {cores} cores, {available / 2**30:.1f} GiB available at "
           f"~{per_worker / 2**20:.0f} MiB per worker")
    return workers, why


# -- in the worker ---------------------------------------------------------------------------------

_FLOAT_MODELS: dict[tuple[str | None, str | None], Any] = {}
_ARTIFACTS: dict[tuple[str, str | None], Artifact] = {}


def _start_worker(parent: int) -> None:
    """Pool initializer: die with the sweep process."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:  # the parent died before the signal was armed
        os._exit(1)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="qbench-parent-watch").start()


def _float_model(spec: RunSpec) -> tuple[Any, str]:
    """The float model and its sha256, loaded once per worker (the last one kept)."""
    from qbench.checkpoints.loader import load_model

    key = (spec.model, spec.weights)
    if key not in _FLOAT_MODELS:
        _FLOAT_MODELS.clear()
        loaded = load_model(spec.model, spec.weights)
        _FLOAT_MODELS[key] = (loaded.model, loaded.sha256)
    return _FLOAT_MODELS[key]


def _artifact(plan: PointPlan) -> Artifact | None:
    """The point's packed layers, read from the sweep folder once per worker (the last one kept)."""
    from pathlib import Path

    from qbench.quant.artifact import read_artifact

    if plan.artifact is None:
        return None
    key = (plan.artifact, plan.artifact_sha256)
    if key not in _ARTIFACTS:
        _ARTIFACTS.clear()
        _ARTIFACTS[key] = read_artifact(Path(plan.artifact))
    return _ARTIFACTS[key]


def run_prepare(task: PrepareTask) -> PointPlan:
    return prepare_point(task)


def run_shard(task: ShardTask) -> RunResult:
    model, sha256 = _float_model(task.plan.spec)
    return evaluate_shard(task, model, sha256, _artifact(task.plan))


# -- in the sweep process --------------------------------------------------------------------------


@dataclass(eq=False)
class LocalJob:
    function: Callable[[Any], Any]
    task: Any
    future: Future | None = None
    attempts: int = field(default=0)


class LocalExecutor:
    """Tasks on `workers` local processes (see the module's docstring)."""

    name = "local"

    def __init__(self, workers: int, max_retries: int = 2):
        self.workers = workers
        self.max_retries = max_retries
        self._context = multiprocessing.get_context("spawn")
        self._pool = self._new_pool()
        self._jobs: set[LocalJob] = set()

    @property
    def capacity(self) -> int:
        return self.workers

    def _new_pool(self) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(self.workers, mp_context=self._context, initializer=_start_worker,
                                   initargs=(os.getpid(),))

    def _start(self, job: LocalJob) -> LocalJob:
        job.attempts += 1
        job.future = self._pool.submit(job.function, job.task)
        self._jobs.add(job)
        return job

    def submit_prepare(self, task: PrepareTask) -> LocalJob:
        return self._start(LocalJob(run_prepare, task))

    def submit_shard(self, task: ShardTask) -> LocalJob:
        return self._start(LocalJob(run_shard, task))

    def wait(self, jobs: list[LocalJob], timeout: float) -> list[tuple[LocalJob, Any]]:
        """The jobs of `jobs` that finished within `timeout` seconds, each with its value or the
        exception it raised."""
        done, _ = wait([j.future for j in jobs], timeout=timeout, return_when=FIRST_COMPLETED)
        finished, broken = [], False
        for job in jobs:
            if job.future not in done:
                continue
            exc = job.future.exception()
            if isinstance(exc, BrokenProcessPool):
                broken = True
                continue
            self._jobs.discard(job)
            finished.append((job, exc if exc is not None else job.future.result()))
        if broken:
            finished += self._restart()
        return finished

    def _restart(self) -> list[tuple[LocalJob, Any]]:
        """A worker died and took the pool with it: every job still running starts again on a
        fresh pool, or fails once it has died `max_retries` + 1 times."""
        self._terminate()
        self._pool = self._new_pool()
        failed = []
        for job in list(self._jobs):
            if job.future.done() and not isinstance(job.future.exception(), BrokenProcessPool):
                continue  # it finished before the pool broke: its value is collected by wait()
            if job.attempts > self.max_retries:
                self._jobs.discard(job)
                times = f"{job.attempts} time{'s' if job.attempts > 1 else ''}"
                failed.append((job, WorkerDiedError(f"its worker process died {times} (killed, or out of memory)")))
            else:
                self._start(job)
        return failed

    def _terminate(self) -> None:
        # the pool has no public way to stop the task a worker is running; its processes are
        # `_processes` (pid -> Process), as in every CPython since 3.2
        processes = list(getattr(self._pool, "_processes", {}).values())
        self._pool.shutdown(wait=False, cancel_futures=True)
        for process in processes:
            if process.is_alive():
                process.terminate()
        for process in processes:
            process.join(timeout=5)

    def close(self) -> None:
        """Stop every worker (a shard stopped mid-way keeps its journal for the next run)."""
        self._terminate()
        self._jobs.clear()
