"""The two tasks a sweep point is made of, as plain functions any executor can run in a worker.

* `prepare_point`: the first half of a single run (`qbench.run.prepare_run`): load the model,
  quantize it once (the plugin in its own process, as always) into the artifact beside the
  point's result file, choose the device's batch size, build the result's header, and cut the
  utterances into shards of whole batches.
* `evaluate_shard`: the second half (`qbench.run.evaluate_prepared`) on one shard's utterances,
  with the float model and the point's packed layers handed in (no plugin code runs), journaled
  beside the shard's result file so a killed shard resumes where it stopped.

What changes nothing in a result is all that differs from a single run: which process, how
many threads (results are the same on any count), where the float weights came from (the same
bytes, checked by sha256).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from qbench.data.librispeech import find_data_dir, list_utterances
from qbench.errors import QBenchError
from qbench.journal import JournalError, OutputInUseError, claim_output
from qbench.models.parallel import using_threads
from qbench.models.speech_model import SpeechModel
from qbench.quant.activation_scheme import ActivationRecord
from qbench.quant.artifact import ArtifactManifest
from qbench.quant.packing import PackedTensor
from qbench.results import MachineInfo, RunResult
from qbench.run import (
    PreparedRun,
    RunSpec,
    SilentProgress,
    device_evaluation,
    devices_fitted,
    does_not_fit,
    evaluate_prepared,
    model_with_packed,
    prepare_run,
    select_utterances,
)
from qbench.sweep.state import PointPlan, cut_shards, shard_identity

Artifact = tuple[ArtifactManifest, dict[str, PackedTensor]]


class WeightsChangedError(QBenchError, RuntimeError):
    """The float weights a worker has are not the ones the point was prepared on."""


@dataclass(frozen=True)
class PrepareTask:
    spec: RunSpec
    shards: int  # how many shards to cut the utterances into (fewer when there are fewer batches)
    threads: int

    @property
    def name(self) -> str:
        return f"qbench-prepare:{self.spec.output_path.stem}"


@dataclass(frozen=True)
class ShardTask:
    plan: PointPlan
    index: int
    output: str  # the shard's result file (its journal goes beside it)
    threads: int

    @property
    def ids(self) -> list[str]:
        return self.plan.shards[self.index]

    @property
    def identity(self) -> str:
        return shard_identity(self.plan.identity, self.index, self.ids)

    @property
    def name(self) -> str:
        """What the task is called where a worker shows it (Ray's process title, logs)."""
        return f"qbench-shard:{self.plan.spec.output_path.stem}:{self.index}"


def prepare_point(task: PrepareTask) -> PointPlan:
    """Prepare `task.spec` as a single run would (writing its artifact), and cut its shards."""
    spec = task.spec
    with using_threads(task.threads):
        prepared = prepare_run(spec, SilentProgress())
        session = prepared.session
        fits = session is None or session.fits
        header = prepared.result if fits else does_not_fit(session, prepared.result, None)
        quantization = header.quantization or {}
        return PointPlan(
            identity=spec.identity(), spec=spec, header=header, fits=fits, batch_size=prepared.batch_size,
            shards=cut_shards([u.id for u in prepared.utterances], prepared.batch_size, task.shards) if fits else [],
            device=session.device if session is not None else None,
            # a pure function of the quantized model: computed once here, not in every shard
            devices_fitted=devices_fitted(prepared.model, prepared.profiles, prepared.activations) if fits else None,
            artifact=quantization.get("artifact_path"), artifact_sha256=quantization.get("artifact_sha256"),
        )


def evaluate_shard(task: ShardTask, float_model: SpeechModel, model_sha256: str, artifact: Artifact | None) -> RunResult:
    """Evaluate one shard of a prepared point on `float_model` (whose weights have
    `model_sha256`) with the point's packed layers (`artifact`, None for float weights).
    Returns the shard's result as written at `task.output`: complete, the device's does-not-fit
    verdict, or (from an earlier attempt) complete without recomputing."""
    plan, spec = task.plan, task.plan.spec
    if model_sha256 != plan.header.model.sha256:
        raise WeightsChangedError(f"{spec.output_path.stem}: the weights here have sha256 {model_sha256[:12]}…, the "
                                  f"point was prepared on {plan.header.model.sha256[:12]}…; run the sweep again to "
                                  "prepare it on these")
    output = Path(task.output)
    try:
        prior = claim_output(output, task.identity, lambda: model_sha256)
    except (OutputInUseError, JournalError):
        # a shard file is the sweep's own work, not a result of the user's: one that is not this
        # shard's (a damaged or edited file) is kept aside as <name>.<UTC time>.json, never lost
        prior = claim_output(output, task.identity, lambda: model_sha256, force=True)
    if prior.complete is not None:
        return prior.complete
    with using_threads(task.threads):
        data_dir = find_data_dir(spec.data_dir, spec.subset)
        utterances = select_utterances(list_utterances(data_dir, spec.subset), None, task.ids)
        model = float_model if spec.encoder_seconds is None else float_model.with_encoder_seconds(spec.encoder_seconds)
        if artifact is not None:
            model, _, _, _ = model_with_packed(model, model_sha256, *artifact, str(plan.artifact), set(task.ids))
        # the record the single run used (for an artifact evaluated with another scheme, that one)
        activations = ActivationRecord.model_validate(plan.header.activations) if plan.header.activations else None
        session, evaluated, batch_size = device_evaluation(model, plan.device, plan.batch_size, utterances, activations)
        header = plan.header.model_copy(deep=True, update={"identity": task.identity, "machine": MachineInfo.current()})
        prepared = PreparedRun(spec=spec, model=model, evaluated=evaluated, session=session, batch_size=batch_size,
                               utterances=utterances, result=header, activations=activations, profiles=None)
        return evaluate_prepared(prepared, output, prior.records.values(), SilentProgress())
