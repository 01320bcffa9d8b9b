"""A run is a value: `RunSpec` holds everything that decides a result, `run_benchmark` carries it out.

The flow is one way, as the folders are laid out:

    data (which utterances)  ->  model (weights)  ->  quantize (plugin, policy, calibration)
        ->  evaluate (under the device's budget)  ->  RunResult (the result file)

The command line only builds a `RunSpec` from its arguments, `qbench verify` builds one from a
leaderboard entry (`RunSpec.from_entry`), and benchmarks and tests call `run_benchmark`
directly. Nothing here reads argv or changes process-wide state: the thread count is scoped to
the run (`qbench.models.parallel.using_threads`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from qbench import __version__ as qbench_version
from qbench.checkpoints.card import safe_name
from qbench.checkpoints.loader import DEFAULT_MODEL, load_model
from qbench.data.audio import AudioError, audio_duration
from qbench.data.calibration import CalibrationSpeed, load_calibration
from qbench.data.librispeech import (
    OFFICIAL_COUNTS,
    Utterance,
    find_data_dir,
    list_utterances,
    utterance_digest,
)
from qbench.embedded.devices import (
    DEFAULT_DEVICE,
    NO_DEVICE,
    UnknownDeviceError,
)
from qbench.embedded.profile import DeviceProfile
from qbench.embedded.session import DeviceSession, fit_model
from qbench.errors import QBenchError
from qbench.evaluate import RunFailed, evaluate, split_unscorable, unscored_warning
from qbench.journal import (
    JournalHeader,
    JournalRecord,
    RunJournal,
    claim_output,
    journal_path,
)
from qbench.leaderboard.entry import SAFE_NAME_PATTERN, LeaderboardEntry
from qbench.models.parallel import compute_threads, using_threads
from qbench.models.speech_model import SpeechModel
from qbench.quant.activation_calibration import static_scales
from qbench.quant.activation_scheme import ActivationChoice, ActivationRecord
from qbench.quant.activation_store import ActivationQuantizingStore
from qbench.quant.apply import (
    QuantizationPolicy,
    QuantizerIdentity,
    packed_model_report,
    quantize_layers,
    quantize_model,
    quantizer_identity,
)
from qbench.quant.artifact import (
    ArtifactManifest,
    build_manifest,
    read_artifact,
    write_artifact,
)
from qbench.quant.packing import PackedTensor
from qbench.quant.plan import PLAN_QUANTIZER, QuantizationPlan
from qbench.quant.plugin_process import (
    ActivationSchemeProcess,
    PluginProcess,
    device_profiles_from_plugins,
)
from qbench.results import DatasetRef, MachineInfo, ModelRef, RunResult

#: Utterances per batch without a device (a workstation run); on a device the default is the
#: largest of 1, 2, 4, 8 that fits its RAM (`qbench.embedded.session.DeviceSession`).
WORKSTATION_BATCH_SIZE = 8


class RunSpecError(QBenchError, ValueError):
    """A `RunSpec` that cannot be run as given (ids not in the data, a setting out of range)."""


class RunSpec(BaseModel):
    """Everything that decides a run's result, and where the result file goes."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str | None = Field("whisper-tiny.en", pattern=SAFE_NAME_PATTERN,
                              description="registered model name (qbench models); None with weights: run whatever "
                                          "checkpoint they are (dimensions from its own files, no card)")
    weights: str | None = Field(None, description="weights path instead of the registry's sources")
    subset: str = "test-clean"
    data_dir: str | None = Field(None, description="folder holding LibriSpeech/ (None: the usual places)")
    limit: int | None = Field(None, ge=1, description="first N utterances in sorted id order")
    utterance_ids: tuple[str, ...] | None = Field(None, description="exactly these utterances (overrides limit)")
    device: str = Field(DEFAULT_DEVICE, description="emulated target, or 'none' for no budget")
    plugin: str | None = Field(None, description="quantizer name; None: the float baseline")
    config: dict[str, Any] = Field(default_factory=dict, description="the quantizer's settings (JSON values)")
    plan: QuantizationPlan | None = Field(None, description="a quantizer (or float) per layer, instead of plugin + config")
    policy: QuantizationPolicy = Field(default_factory=QuantizationPolicy)
    activations: ActivationChoice | None = Field(None, description="an activation scheme every linear input (and, "
                                                                   "optionally, the KV cache) is quantized by; None: float32")
    encoder_seconds: float | None = Field(None, gt=0, description="audio per encoder pass: Whisper windows shorter than "
                                                                  "30 s (whisper.cpp's audio_ctx), wav2vec2 chunks; None: "
                                                                  "the model's default")
    calibration_subset: str = "dev-clean"
    calibration_limit: int | None = Field(None, ge=1)
    calibration_ids: tuple[str, ...] | None = None
    calibration_data_dir: str | None = Field(None, description="folder holding LibriSpeech/ with the calibration subset "
                                                               "(None: data_dir's place, found for that subset)")
    calibration_counts_padding: bool = Field(True, description="the calibration pass's padded rows (Whisper's decoder "
                                                               "past end of text) count as calibration data; False: only "
                                                               "the rows inference feeds (recorded in the entry)")
    calibration_speeds: tuple[CalibrationSpeed, ...] = Field(
        (), description="each adds a speed-perturbed copy of every calibration utterance (e.g. 0.9, 1.1)")
    artifact: str | None = Field(None, description="evaluate this quantized-model artifact (from qbench quantize)")
    plugin_timeout: float | None = Field(None, gt=0, description="seconds the plugin may take per layer")
    threads: int | None = Field(None, ge=1, description="None: QBENCH_THREADS, else every CPU")
    batch_size: int | None = Field(None, ge=1, description=f"None: {WORKSTATION_BATCH_SIZE} without a device; on one, the "
                                                                 "largest of 1, 2, 4, 8 that fits it")
    output: str | None = Field(None, description="result file; None: results/<model>__<subset>__<label>.json")

    @property
    def label(self) -> str:
        """`fp`, or the plugin and its settings, for the default result file name."""
        if self.artifact is not None:
            return Path(self.artifact).stem
        if self.plan is not None:
            return f"plan-{self.plan.name}" + self.activation_label + self.encoder_label
        if self.plugin is None:
            return "fp" + self.activation_label + self.encoder_label
        settings = "".join(f"_{k}{v if isinstance(v, str) else json.dumps(v)}" for k, v in sorted(self.config.items()))
        lowrank = self.policy.lowrank
        suffix = "" if lowrank is None else f"_lr{lowrank.rank}" + ("i8" if lowrank.dtype == "int8" else "")
        return (self.plugin + settings + suffix + ("_emb" if self.policy.quantize_embeddings else "") + self.activation_label
                + self.encoder_label)

    @property
    def activation_label(self) -> str:
        """`_a-absmax-bits8` (and `-kv`) for a run with quantized activations, else empty."""
        act = self.activations
        if act is None:
            return ""
        settings = "".join(f"-{k}{v if isinstance(v, str) else json.dumps(v)}" for k, v in sorted(act.config.items()))
        return f"_a-{act.name}{settings}" + ("-kv" if act.kv_cache else "") + ("-att" if act.attention else "")

    @property
    def encoder_label(self) -> str:
        return "" if self.encoder_seconds is None else f"_enc{self.encoder_seconds:g}s"

    @property
    def model_label(self) -> str:
        """The model part of default file names: its registered name, or for weights alone the
        weights' file or folder name made a safe name (`faster-whisper-base`)."""
        return self.model if self.model is not None else safe_name(Path(self.weights).name)

    @property
    def output_path(self) -> Path:
        if self.output is not None:
            return Path(self.output)
        return Path("results") / f"{self.model_label}__{self.subset}__{self.label}.json"

    @property
    def artifact_path(self) -> Path:
        """Where a run that quantizes writes its quantized model: beside the result file."""
        return self.output_path.with_suffix(".safetensors")

    @model_validator(mode="before")
    @classmethod
    def _default_model(cls, data: Any) -> Any:
        # no model and no weights: the default model (weights alone name their own model)
        if isinstance(data, dict) and data.get("model", "") is None and not data.get("weights"):
            data = {**data, "model": DEFAULT_MODEL}
        return data

    @model_validator(mode="after")
    def _one_source_of_quantization(self) -> RunSpec:
        if self.plugin is not None and self.artifact is not None:
            raise ValueError("give a plugin to quantize with or an artifact to evaluate, not both")
        if self.config and self.plugin is None:
            raise ValueError("config configures a plugin: give plugin too")
        if self.plan is not None and (self.plugin is not None or self.artifact is not None):
            raise ValueError("a plan says which quantizer each layer gets: give it instead of a plugin or an artifact")
        if self.plan is not None and self.policy.quantize_embeddings:
            raise ValueError("a plan says what happens to the embedding: quantize_embeddings does not apply")
        return self

    @property
    def effective_batch_size(self) -> int | None:
        """The batch size given, else the workstation's; None on a device: the device session
        chooses it (the largest of 1, 2, 4, 8 that fits; recorded in the result's device), and
        no batch size changes a transcript."""
        if self.batch_size is not None:
            return self.batch_size
        return WORKSTATION_BATCH_SIZE if self.device == NO_DEVICE else None

    #: Fields that do not decide the result: where it is written, how many threads compute it
    #: (results are the same on any count), where the audio and weights are read from (the
    #: audio is pinned per utterance by its digest, the weights by their sha256; the calibration
    #: audio by its ids, which count). Every other field, including one added later, counts
    #: toward `identity()` until it is listed here.
    NOT_IDENTITY: ClassVar[frozenset[str]] = frozenset({"output", "threads", "data_dir", "calibration_data_dir", "weights",
                                                        "plugin_timeout"})

    def identity_fields(self) -> dict[str, Any]:
        """The settings that decide the result, as JSON values, each in one canonical form: the
        effective batch size, id sets sorted (a limit is ignored when ids are given, as
        `select_utterances` and `load_calibration` do), no calibration settings for the float baseline."""
        fields = self.model_dump(mode="json", exclude=set(self.NOT_IDENTITY))
        fields["batch_size"] = self.effective_batch_size
        if self.utterance_ids is not None:
            fields["utterance_ids"], fields["limit"] = sorted(set(self.utterance_ids)), None
        if self.calibration_ids is not None:
            fields["calibration_ids"], fields["calibration_limit"] = sorted(set(self.calibration_ids)), None
        if fields["plan"] is None:
            fields.pop("plan")  # specs from before plans existed keep their identity
        for key in ("activations", "encoder_seconds"):
            if fields[key] is None:
                fields.pop(key)  # and so do those from before activation schemes and encoder windows
        if fields["calibration_counts_padding"]:
            fields.pop("calibration_counts_padding")  # and those from before the choice existed
        if not fields["calibration_speeds"]:
            fields.pop("calibration_speeds")  # and from before speed perturbation
        if self.plugin is None and self.plan is None and self.activations is None:
            for key in ("calibration_subset", "calibration_limit", "calibration_ids", "calibration_counts_padding",
                        "calibration_speeds"):
                fields.pop(key, None)
        return fields

    def identity(self) -> str:
        """sha256 of `identity_fields()`: two specs with the same identity give the same result
        on the same weights and audio, so a rerun may resume or reuse the other's work."""
        canonical = json.dumps(self.identity_fields(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()

    @classmethod
    def from_entry(cls, entry: LeaderboardEntry, data_dir: str | None = None, output: str | None = None) -> RunSpec:
        """The spec that produces `entry` again: its model, exact utterances, device, batch size,
        quantizer with its full config and policy, and calibration utterances."""
        q, c = entry.quantizer, entry.calibration
        plan = QuantizationPlan.model_validate(q.config) if q is not None and q.name == PLAN_QUANTIZER else None
        return cls(
            model=entry.model.name, subset=entry.dataset.subset, data_dir=data_dir,
            utterance_ids=tuple(u.id for u in entry.utterances),
            device=entry.device.name if entry.device is not None else NO_DEVICE,
            batch_size=entry.device.batch_size if entry.device is not None else None,
            plugin=q.name if q and plan is None else None, config=dict(q.config) if q and plan is None else {},
            plan=plan,
            policy=QuantizationPolicy.model_validate(q.policy) if q else QuantizationPolicy(),
            calibration_subset=c.subset if c else "dev-clean", calibration_ids=tuple(c.utterance_ids) if c else None,
            calibration_counts_padding=c.counts_padding if c else True,
            calibration_speeds=tuple(c.speeds) if c else (),
            activations=ActivationRecord.model_validate(entry.activations.model_dump()).choice() if entry.activations else None,
            encoder_seconds=entry.encoder_seconds,
            output=output,
        )


def spec_error(exc: ValidationError, what: str = "run") -> RunSpecError:
    """A pydantic validation failure of a spec as one line naming the field."""
    err = exc.errors()[0]
    field = ".".join(str(p) for p in err.get("loc", ())) or what
    return RunSpecError(f"{what}: {field}: {err['msg']} (got {err.get('input')!r})")


class RunProgress(Protocol):
    """What a run reports while it works; the CLI draws it, a benchmark or a test may ignore it."""

    def note(self, message: str) -> None:
        """A one-line statement of what the run is doing or using."""

    def quantizing(self, layer: str, done: int, total: int) -> None:
        """`done` of `total` layers are quantized; `layer` was the last."""

    def transcribing(self, description: str, total: int) -> None:
        """Transcription of `total` utterances starts."""

    def transcribed(self, n: int) -> None:
        """`n` more utterances are transcribed and scored."""


class SilentProgress:
    def note(self, message: str) -> None:
        pass

    def quantizing(self, layer: str, done: int, total: int) -> None:
        pass

    def transcribing(self, description: str, total: int) -> None:
        pass

    def transcribed(self, n: int) -> None:
        pass


def select_utterances(present: Sequence[Utterance], limit: int | None, ids: Sequence[str] | None) -> list[Utterance]:
    """The first `limit` sorted utterances, or exactly `ids` (how `qbench verify` reruns an entry
    on a full official download as on the shared sample)."""
    if ids is None:
        return list(present[:limit] if limit is not None else present)
    by_id = {u.id: u for u in present}
    missing = [i for i in ids if i not in by_id]
    if missing:
        raise RunSpecError(f"{len(missing)} of {len(ids)} requested utterances are not in the data (e.g. {missing[0]})")
    return sorted((by_id[i] for i in set(ids)), key=lambda u: u.id)


def quantize_for_run(
    model: SpeechModel, model_sha256: str, spec: RunSpec, data_dir: Path, eval_ids: set[str], progress: RunProgress,
    artifact_path: Path | None = None,
) -> tuple[SpeechModel, dict[str, Any], dict[str, Any] | None, ActivationRecord | None]:
    """The model quantized by `spec.plugin` in the plugin's own process, written as an artifact
    beside the result file; returns the packed model, the quantization record (with the
    artifact's digest and path), for calibrated plugins the calibration record, and the
    activation scheme's record when the spec asks for one (stored in the artifact too).
    Calibration audio is disjoint from `eval_ids`, and read from `spec.calibration_data_dir`
    when given (else from `data_dir`)."""
    calibration_dir = data_dir
    float_params = model.store.params
    with ExitStack() as stack:
        if spec.plan is not None:
            assigned = spec.plan.assign(model.quantizable_weights())
            processes = {key: stack.enter_context(PluginProcess(plugin, config, spec.plugin_timeout))
                         for plugin, config in spec.plan.quantizers()
                         for key in [(plugin, json.dumps(config, sort_keys=True))]}
            assignment = {layer: processes[rule.key] for layer, rule in assigned.items() if rule.key is not None}
            what = f"plan {spec.plan.name}"
        else:
            quantizer = stack.enter_context(PluginProcess(spec.plugin, spec.config, spec.plugin_timeout))
            processes = {None: quantizer}
            assignment = None
            what = spec.plugin
        audios = calibration = None
        if any(q.needs_calibration for q in processes.values()):
            audios, calibration, calibration_dir = calibration_audio(spec, data_dir, eval_ids)
            progress.note(f"calibrating {what} on {calibration['utterance_count']} {calibration['subset']} utterances "
                          f"({calibration['audio_seconds']:.0f} s) from {calibration_dir / 'LibriSpeech' / calibration['subset']}")
        if assignment is None:
            model, report = quantize_model(model, quantizer, spec.policy, audios, progress=progress.quantizing,
                                           count_padding=spec.calibration_counts_padding)
        else:
            model, report = quantize_layers(model, assignment, spec.policy, audios, progress=progress.quantizing,
                                            count_padding=spec.calibration_counts_padding)
            plan_identity = QuantizerIdentity(name=PLAN_QUANTIZER, version=qbench_version, config=spec.plan.model_dump(mode="json"),
                                              needs_calibration=audios is not None)
            report.quantizer, report.quantizer_version, report.config = plan_identity.name, plan_identity.version, plan_identity.config
            report.needs_calibration = plan_identity.needs_calibration
            report.plan_quantizers = [quantizer_identity(q) for q in processes.values()]
    identity = QuantizerIdentity(name=report.quantizer, version=report.quantizer_version, distribution=report.distribution,
                                 distribution_version=report.distribution_version, config=report.config,
                                 needs_calibration=report.needs_calibration)
    activations = None
    if spec.activations is not None:
        activations, act_calibration = activations_for_run(model, float_params, spec, data_dir, eval_ids, progress,
                                                           audios)
        if act_calibration is not None:
            calibration = {k: v for k, v in act_calibration.items() if k != "data_dir"}
            calibration_dir = Path(act_calibration["data_dir"])
    packed = model.store.packed
    manifest = build_manifest(model.name, model_sha256, identity, spec.policy, report.scale_dtype, packed, calibration,
                              plan_quantizers=report.plan_quantizers, activations=activations)
    path = write_artifact(artifact_path or spec.artifact_path, manifest, packed)
    progress.note(f"quantized model written to {path} (digest {manifest.digest[:12]})")
    record = report.model_dump(mode="json") | {"artifact_sha256": manifest.digest, "artifact_path": str(path)}
    if calibration is not None:
        # where the audio was read from is recorded in the result, not in the artifact: the
        # artifact's digest must not depend on a path (the ids pin the audio)
        calibration = calibration | {"data_dir": str(calibration_dir)}
    return model, record, calibration, activations


def calibration_audio(spec: RunSpec, data_dir: Path, eval_ids: set[str]) -> tuple[list, dict[str, Any], Path]:
    """The spec's calibration audio (disjoint from `eval_ids`), its record (with whether the pass
    counts padded rows), and the folder it was read from: `spec.calibration_data_dir` when
    given, else `data_dir`."""
    if spec.calibration_data_dir is not None:
        data_dir = find_data_dir(spec.calibration_data_dir, spec.calibration_subset)
    ids = list(spec.calibration_ids) if spec.calibration_ids is not None else None
    audios, record = load_calibration(data_dir, spec.calibration_subset, spec.calibration_limit, eval_ids, ids,
                                      spec.calibration_speeds)
    # recorded only when not the default: records of default runs read as they did before the choice
    extra = {} if spec.calibration_counts_padding else {"counts_padding": False}
    if spec.calibration_speeds:
        extra["speeds"] = list(spec.calibration_speeds)
    return audios, record.model_dump() | extra, data_dir


def activations_for_run(
    model: SpeechModel, float_params: dict[str, Any], spec: RunSpec, data_dir: Path, eval_ids: set[str],
    progress: RunProgress, audios: list | None = None,
) -> tuple[ActivationRecord, dict[str, Any] | None]:
    """The run's activation scheme as its plugin declares it (in the plugin's process) and, for a
    static one, every layer input's scale, calibrated on `model` (weights as quantized) over the
    calibration audio (`audios` when the weights' calibration loaded it); returns the record and
    the calibration record (with the folder it was read from) when this step loaded the audio."""
    choice = spec.activations
    loaded = None
    with ActivationSchemeProcess(choice.name, choice.config, spec.plugin_timeout) as scheme:
        scales = None
        if scheme.needs_calibration:
            if audios is None:
                audios, loaded, read_from = calibration_audio(spec, data_dir, eval_ids)
                loaded = loaded | {"data_dir": str(read_from)}
            progress.note(f"calibrating activation scheme {scheme.name} on {len(audios)} utterances")
            scales = static_scales(model, audios, float_params, scheme.calibrate, spec.calibration_counts_padding)
        record = scheme.record(choice.kv_cache, scales, choice.attention)
    progress.note(f"activations: {record.label} ({record.scheme.granularity}, "
                  f"{'symmetric' if record.scheme.symmetric else 'asymmetric'}, "
                  f"{'dynamic' if record.scheme.dynamic else 'static'})")
    return record, loaded


def model_from_artifact(
    model: SpeechModel, model_sha256: str, spec: RunSpec, eval_ids: set[str]
) -> tuple[SpeechModel, dict[str, Any], dict[str, Any] | None, ActivationRecord | None]:
    """The float `model` with the packed layers of `spec.artifact` swapped in (no plugin code
    runs), and the same records `quantize_for_run` gives (the activations the artifact holds)."""
    manifest, packed = read_artifact(Path(spec.artifact))
    return model_with_packed(model, model_sha256, manifest, packed, spec.artifact, eval_ids)


def model_with_packed(
    model: SpeechModel, model_sha256: str, manifest: ArtifactManifest, packed: dict[str, PackedTensor], source: str,
    eval_ids: set[str],
) -> tuple[SpeechModel, dict[str, Any], dict[str, Any] | None, ActivationRecord | None]:
    """`model_from_artifact` of an artifact already read (`read_artifact`) from `source`."""
    if manifest.model != model.name or manifest.model_sha256 != model_sha256:
        raise RunSpecError(f"{source}: quantizes {manifest.model} (weights sha256 {manifest.model_sha256[:12]}…), "
                           f"not the {model.name} loaded here (sha256 {model_sha256[:12]}…)")
    calibration = None
    if manifest.calibration is not None:
        overlap = sorted(eval_ids.intersection(manifest.calibration.utterance_ids))
        if overlap:
            raise RunSpecError(f"{source}: calibrated on {len(overlap)} of the utterances to score (e.g. {overlap[0]})")
        calibration = manifest.calibration.model_dump()
    store, report = packed_model_report(model, manifest.quantizer, manifest.policy, packed, scale_dtype=manifest.scale_dtype)
    report.plan_quantizers = manifest.plan_quantizers
    record = report.model_dump(mode="json") | {"artifact_sha256": manifest.digest, "artifact_path": str(source)}
    return model.with_store(store), record, calibration, manifest.activations


def quantize_to_artifact(spec: RunSpec, artifact_path: Path | None = None,
                         progress: RunProgress | None = None) -> tuple[Path, dict[str, Any]]:
    """`qbench quantize`: the quantize half of `run_benchmark` alone. Returns the artifact's path
    and the quantization record. The evaluation utterances are not known yet: a run of the
    artifact checks that its calibration set is disjoint from them."""
    progress = progress or SilentProgress()
    if spec.plugin is None and spec.plan is None:
        raise RunSpecError("qbench quantize needs a plugin or a plan")
    with using_threads(spec.threads):
        loaded = load_model(spec.model, spec.weights)
        # only calibration audio is read here: its own folder when given
        data_dir = find_data_dir(spec.calibration_data_dir or spec.data_dir, spec.calibration_subset)
        _, record, _, _ = quantize_for_run(loaded.model, loaded.sha256, spec, data_dir, set(), progress, artifact_path)
    return Path(record["artifact_path"]), record


def longest_readable(utterances: Sequence[Utterance]) -> float | None:
    """Seconds of the longest utterance, from the headers; a file that cannot be read is left to
    fail in its own batch, with what came before it saved."""
    seconds = []
    for u in utterances:
        try:
            seconds.append(audio_duration(u.path))
        except AudioError:
            continue
    return max(seconds, default=None)


def devices_fitted(model: SpeechModel, profiles: dict[str, DeviceProfile],
                   activations: ActivationRecord | None = None) -> list[str]:
    """Device profiles the model fits, by the same accounting `qbench fit` uses, on one thread
    (a count the accountant's per-thread buffers would otherwise take from this machine)."""
    with using_threads(1):
        return sorted(name for name, device in profiles.items() if fit_model(model, device, activations=activations).fits)


def device_profile(profiles: dict[str, DeviceProfile], name: str) -> DeviceProfile:
    if name not in profiles:
        raise UnknownDeviceError(f"unknown device '{name}'; registered: {', '.join(profiles) or 'none'}")
    return profiles[name]


def weights_sha256(spec: RunSpec) -> str:
    """The sha256 `load_model` will record for the spec's weights, without loading them."""
    from qbench.checkpoints.loader import weights_sha256 as sha256_of_weights

    return sha256_of_weights(spec.model, spec.weights)


def setup_note(data_dir: Path, subset: str, selected: int, present: int, weights: Path, sha256: str,
               device: DeviceProfile | None) -> str:
    """The one line a run starts with: what it reads and where it runs (called inside the run's
    `using_threads`, so the thread count is the run's)."""
    of = f"{selected} of {present}" if selected != present else f"{selected}"
    where = f"device {device.name} ({device.ram_bytes / 2**20:g} MiB RAM)" if device is not None else "no device budget"
    return (f"data {data_dir / 'LibriSpeech' / subset} ({of} utterances) · weights {weights} (sha256 {sha256[:12]}) · "
            f"{compute_threads()} threads · {where}")


def run_benchmark(spec: RunSpec, progress: RunProgress | None = None, force: bool = False) -> RunResult:
    """Carry out `spec`: load, quantize, transcribe and score, writing the result file and its
    journal as it goes.

    Returns the result, also when the model does not fit the device (`status: failed`,
    `device.fits: false`); raises `RunFailed` (holding every utterance finished, which is also
    on disk) when transcription stops on bad input. Files already at the output decide the
    start (`qbench.journal.claim_output`): this spec's complete result is returned as it is,
    an unfinished one is resumed, another run's is refused unless `force` keeps it aside.
    """
    progress = progress or SilentProgress()
    prior = claim_output(spec.output_path, spec.identity(), lambda: weights_sha256(spec), force, progress.note)
    if prior.complete is not None:
        progress.note(f"{spec.output_path} already holds this run's complete result: not recomputed "
                      "(pass --force to run it again)")
        return prior.complete
    with using_threads(spec.threads):
        prepared = prepare_run(spec, progress)
        if prepared.session is not None and not prepared.session.fits:
            return does_not_fit(prepared.session, prepared.result, spec.output_path)
        return evaluate_prepared(prepared, spec.output_path, prior.records.values(), progress)


@dataclass
class PreparedRun:
    """A run up to its first utterance: what `run_benchmark` transcribes, with what, in which
    batches, and the result file's every field but the utterances. `qbench sweep` prepares a
    point once (`prepare_run`) and evaluates its utterance shards elsewhere, each a
    `PreparedRun` of its own built around the point's artifact."""

    spec: RunSpec
    model: SpeechModel  # as quantized, before a device or an activation scheme wraps it
    evaluated: SpeechModel  # what transcribes: the device's budgeted model, or the activation-quantizing store
    session: DeviceSession | None
    batch_size: int
    utterances: list[Utterance]  # the scored ones, in the order (and so the batches) a run transcribes them
    result: RunResult  # status running, no utterances yet
    activations: ActivationRecord | None
    #: the device profiles `devices_fitted` is computed over at the end; None: not computed (a
    #: sweep's shard: its point computes it once)
    profiles: dict[str, DeviceProfile] | None


def prepare_run(spec: RunSpec, progress: RunProgress) -> PreparedRun:
    """Everything `run_benchmark` does before transcribing (call it inside `using_threads`):
    read the utterances, load and quantize the model (writing its artifact), choose the
    device's batch size and build the result's header."""
    data_dir = find_data_dir(spec.data_dir, spec.subset)
    present = list_utterances(data_dir, spec.subset)
    utterances = select_utterances(present, spec.limit, spec.utterance_ids)
    loaded = load_model(spec.model, spec.weights)
    model = loaded.model
    if spec.encoder_seconds is not None:
        model = model.with_encoder_seconds(spec.encoder_seconds)
    if loaded.pin_note is not None:
        progress.note(loaded.pin_note)
    # third-party device profiles are plugin code: collected in a plugin process, as data;
    # before quantizing, so the note below can say the device (and an unknown one stops
    # the run before minutes of work)
    profiles, _ = device_profiles_from_plugins(spec.plugin_timeout)
    device = device_profile(profiles, spec.device) if spec.device != NO_DEVICE else None
    progress.note(setup_note(data_dir, spec.subset, len(utterances), len(present), loaded.path, loaded.sha256, device))
    quantization = calibration = activations = None
    eval_ids = {u.id for u in utterances}
    float_params = model.store.params
    if spec.plugin is not None or spec.plan is not None:
        model, quantization, calibration, activations = quantize_for_run(model, loaded.sha256, spec, data_dir,
                                                                         eval_ids, progress)
    elif spec.artifact is not None:
        model, quantization, calibration, activations = model_from_artifact(model, loaded.sha256, spec, eval_ids)
        if spec.activations is not None:
            activations = None  # the spec's scheme, not the one the artifact was made with
    if spec.activations is not None and activations is None:
        # float weights, or an artifact: the scheme on its own
        activations, act_calibration = activations_for_run(model, float_params, spec, data_dir, eval_ids, progress)
        if act_calibration is not None:
            calibration = act_calibration
    session, evaluated, batch_size = device_evaluation(model, device, spec.effective_batch_size, utterances, activations)
    warnings = [present.skipped.warning] if present.skipped.warning else []
    utterances, unscored = split_unscorable(utterances)
    if unscored:
        warnings.append(unscored_warning(unscored))
    if not utterances:
        raise RunSpecError(f"none of the selected utterances has a reference with words to score ({warnings[-1]})")
    for warning in warnings:
        progress.note(f"warning: {warning}")
    result = RunResult(
        model=ModelRef(name=loaded.name, architecture=loaded.architecture, format=loaded.format,
                       path=str(loaded.path), sha256=loaded.sha256, parameters=loaded.parameters,
                       card=loaded.card.name if loaded.card is not None else None, pinned=loaded.pinned),
        dataset=DatasetRef(subset=spec.subset, data_dir=str(data_dir), limit=spec.limit,
                           utterance_count=len(utterances), utterance_ids_sha256=utterance_digest(u.id for u in utterances),
                           partial_subset=len(present) < OFFICIAL_COUNTS.get(spec.subset, 0)),
        quantization=quantization, calibration=calibration,
        activations=activations.model_dump(mode="json") if activations is not None else None,
        encoder_seconds=spec.encoder_seconds, machine=MachineInfo.current(),
        device=session.record() if session else None, identity=spec.identity(), warnings=warnings, unscored=unscored,
    )
    return PreparedRun(spec=spec, model=model, evaluated=evaluated, session=session, batch_size=batch_size,
                       utterances=utterances, result=result, activations=activations, profiles=profiles)


def device_evaluation(model: SpeechModel, device: DeviceProfile | None, batch_size: int | None,
                      utterances: Sequence[Utterance], activations: ActivationRecord | None,
                      ) -> tuple[DeviceSession | None, SpeechModel, int]:
    """`(session, evaluated model, batch size)`: on a device, the session (which chooses the
    batch size when none is given, for the longest of `utterances`) and its budgeted model;
    without one, `model` (wrapped by the activation scheme when there is one)."""
    if device is not None:
        session = DeviceSession(model, device, batch_size, longest_seconds=longest_readable(utterances),
                                activations=activations)
        return session, session.model, session.batch_size
    if activations is not None:
        return None, model.with_store(ActivationQuantizingStore(model.store, activations)), batch_size
    return None, model, batch_size


def evaluate_prepared(prepared: PreparedRun, output: Path, records: Iterable[JournalRecord],
                      progress: RunProgress) -> RunResult:
    """Transcribe and score `prepared`, journaled beside `output` and resumed from `records`
    (an earlier attempt's, as `claim_output` found them); returns the complete result, or the
    does-not-fit verdict when a batch exceeds the device. Raises `RunFailed` on bad input."""
    result, session, spec = prepared.result, prepared.session, prepared.spec
    header = JournalHeader(identity=result.identity, model_sha256=result.model.sha256, created_at=result.created_at,
                           spec=spec.identity_fields())
    journal = RunJournal.start(journal_path(output), header, records)
    resumable = sum(u.id in journal.records for u in prepared.utterances)
    if resumable:
        progress.note(f"resuming from {journal.path}: {resumable} of {len(prepared.utterances)} utterances were "
                      "transcribed before")

    def finish(result: RunResult) -> None:
        # what is known only at the end goes in before the file says complete, so a rerun
        # that finds a complete result finds all of it
        if prepared.profiles is not None:
            result.devices_fitted = devices_fitted(prepared.model, prepared.profiles, prepared.activations)
        if session is not None:
            result.device = session.record()

    progress.transcribing(f"{result.model.name} {spec.label} {spec.subset}", len(prepared.utterances))
    try:
        evaluate(prepared.evaluated, prepared.utterances, result, output, batch_size=prepared.batch_size,
                 on_batch=lambda n, _wall: progress.transcribed(n), journal=journal, finish=finish)
    except RunFailed as exc:
        if session is not None and session.exceeded:
            return does_not_fit(session, exc.result, output)
        raise
    finally:
        journal.close()  # on failure or interruption it stays, for the next run to resume from
    journal.discard()  # the result file now holds every utterance
    return result


def does_not_fit(session: DeviceSession, result: RunResult, output: Path | None) -> RunResult:
    """Record the run as not fitting its device (a verdict, not a crash), in the result file at
    `output` when given."""
    result.status, result.error = "failed", session.report.reason
    result.device = session.record()
    if output is not None:
        result.write(output)
    return result
