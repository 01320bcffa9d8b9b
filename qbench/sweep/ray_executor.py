"""`--executor ray`: the same tasks on a Ray cluster (an optional extra: `pip install 'qbench[ray]'`).

What goes through Ray's object store, once, rather than with every task:

* the float model of each model the sweep uses (its numpy weights: 76 MB for tiny.en), put by
  this process after loading it once; every shard task on a node maps the same shared-memory
  copy (numpy arrays come out of the store zero-copy, read-only);
* each point's packed layers (the artifact's manifest and buffers), put once per point after
  this process has the artifact file in the sweep's folder (written by the prepare task where
  the folder is shared, else from the bytes the task returns) and has checked its digest.

The audio is read by the workers from their own LibriSpeech (a shared path or QBENCH_DATA_DIR
on every node; every utterance is pinned by its audio digest). A shard task whose worker dies
(killed, out of memory, a node lost) is retried by Ray (`max_retries`) and resumes from its
journal where the sweep's folder is a shared path; a task that raises is not retried (a
plugin's failure fails its point). This process writes the plans, shard results and point
results into the sweep's folder from what the tasks return.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Any

from qbench.errors import QBenchError, one_line
from qbench.quant.artifact import ArtifactError, read_artifact
from qbench.results import RunResult, write_atomically
from qbench.sweep.local import WorkerDiedError
from qbench.sweep.state import PointPlan, complete_result
from qbench.sweep.tasks import PrepareTask, ShardTask, evaluate_shard, prepare_point

#: points whose packed layers stay in the object store at once (older ones are put again if needed)
ARTIFACTS_HELD = 8


class RayUnavailableError(QBenchError, RuntimeError):
    """Ray is not installed, or the cluster cannot be reached."""


def _ray():
    try:
        import ray
    except ImportError:
        raise RayUnavailableError("--executor ray needs Ray: pip install 'qbench[ray]'") from None
    return ray


# -- in the worker ---------------------------------------------------------------------------------


def ray_prepare(task: PrepareTask) -> tuple[PointPlan, bytes | None]:
    """The prepare task, and the bytes of the artifact it wrote, for a driver that does not
    share the sweep's folder with this worker."""
    plan = prepare_point(task)
    wrote = plan.artifact is not None and task.spec.artifact is None  # not an artifact the spec names
    return plan, Path(plan.artifact).read_bytes() if wrote else None


def ray_shard(task: ShardTask, model: Any, model_sha256: str, artifact: Any) -> RunResult:
    """The shard task on the float model and packed layers from the object store."""
    return evaluate_shard(task, model, model_sha256, artifact)


# -- in the sweep process --------------------------------------------------------------------------


class RayExecutor:
    """Tasks on a Ray cluster: the one at `address` (`auto`: the one `ray start` runs here),
    the one this process already joined, else a local one of `workers` CPUs."""

    name = "ray"

    def __init__(self, address: str | None = None, workers: int | None = None, cpus_per_task: int = 1,
                 max_retries: int = 3):
        ray = self._ray = _ray()
        self._owns_cluster = not ray.is_initialized()
        if self._owns_cluster:
            try:
                ray.init(address=address, num_cpus=None if address else workers, include_dashboard=False,
                         log_to_driver=False)
            except Exception as exc:  # noqa: BLE001 - Ray raises ConnectionError, RuntimeError, ...
                raise RayUnavailableError(f"cannot start or reach the Ray cluster{f' at {address}' if address else ''}: "
                                          f"{one_line(exc)}") from None
        cpus = int(ray.cluster_resources().get("CPU", 1))
        self.workers = max(1, cpus // cpus_per_task)
        # options go with each call (`.options` on a function already given options cannot take more)
        self._options = {"num_cpus": cpus_per_task, "max_retries": max_retries}
        self._prepare = ray.remote(ray_prepare)
        self._shard = ray.remote(ray_shard)
        self._models: dict[tuple[str | None, str | None], tuple[Any, str]] = {}
        self._artifacts: OrderedDict[str, Any] = OrderedDict()
        self._tasks: dict[Any, tuple[PrepareTask | ShardTask, Any]] = {}

    @property
    def capacity(self) -> int:
        return self.workers

    def submit_prepare(self, task: PrepareTask) -> Any:
        plan_ref, bytes_ref = self._prepare.options(name=task.name, num_returns=2, **self._options).remote(task)
        self._tasks[plan_ref] = (task, bytes_ref)
        return plan_ref

    def submit_shard(self, task: ShardTask) -> Any:
        model, sha256 = self._float_model(task.plan)
        ref = self._shard.options(name=task.name, **self._options).remote(task, model, sha256, self._artifact(task.plan))
        self._tasks[ref] = (task, None)
        return ref

    def _float_model(self, plan: PointPlan) -> tuple[Any, str]:
        """The float model in the object store, loaded and put once per model."""
        from qbench.checkpoints.loader import load_model

        spec = plan.spec
        key = (spec.model, spec.weights)
        if key not in self._models:
            loaded = load_model(spec.model, spec.weights)
            self._models[key] = (self._ray.put(loaded.model), loaded.sha256)
        return self._models[key]

    def _artifact(self, plan: PointPlan) -> Any:
        """The point's packed layers in the object store (None: float weights), read from the
        sweep folder's artifact and checked against its digest by `read_artifact`."""
        if plan.artifact is None:
            return None
        if plan.identity not in self._artifacts:
            self._artifacts[plan.identity] = self._ray.put(read_artifact(Path(plan.artifact)))
            while len(self._artifacts) > ARTIFACTS_HELD:
                self._artifacts.popitem(last=False)
        self._artifacts.move_to_end(plan.identity)
        return self._artifacts[plan.identity]

    def wait(self, handles: list[Any], timeout: float) -> list[tuple[Any, Any]]:
        ray = self._ray
        ready, rest = ray.wait(handles, num_returns=1, timeout=timeout)
        if ready and rest:
            more, _ = ray.wait(rest, num_returns=len(rest), timeout=0)
            ready += more
        finished = []
        for ref in ready:
            task, extra = self._tasks.pop(ref)
            try:
                value = ray.get(ref)
                if isinstance(task, PrepareTask):
                    self._keep_artifact(value, extra)
                else:
                    self._keep_shard(task, value)
            except ray.exceptions.RayTaskError as exc:
                # the task raised: its own exception (a plugin's failure, bad audio) is the reason
                cause = getattr(exc, "cause", None)
                value = cause if isinstance(cause, BaseException) else RuntimeError(one_line(exc).splitlines()[0])
            except ray.exceptions.RayError as exc:  # its worker died on every try, or the node was lost
                value = WorkerDiedError(f"its Ray worker died on every try ({type(exc).__name__}: "
                                        f"{one_line(exc)[:200]})")
            except QBenchError as exc:
                value = exc
            finished.append((ref, value))
        return finished

    def _keep_artifact(self, plan: PointPlan, bytes_ref: Any) -> None:
        """The artifact in this process's sweep folder: there already where the folder is
        shared with the worker, else written from the bytes the task returned."""
        if plan.artifact is None:
            return
        path = Path(plan.artifact)
        try:
            if read_artifact(path)[0].digest == plan.artifact_sha256:
                return
        except ArtifactError:
            pass
        data = self._ray.get(bytes_ref)
        if data is None:
            raise ArtifactError(f"{path}: the artifact the point names is not readable here")
        write_atomically(path, data)

    def _keep_shard(self, task: ShardTask, result: RunResult) -> None:
        """The shard's result in this process's sweep folder (the worker wrote it where the
        folder is shared; a worker elsewhere wrote its own copy)."""
        if complete_result(Path(task.output), task.identity, result.model.sha256) is None:
            result.write(task.output)

    def close(self) -> None:
        for ref in list(self._tasks):
            try:
                self._ray.cancel(ref, force=True)
            except Exception:  # noqa: BLE001 - a task that already finished cannot be cancelled
                pass
        self._tasks.clear()
        self._models.clear()
        self._artifacts.clear()
        if self._owns_cluster:
            self._ray.shutdown()
