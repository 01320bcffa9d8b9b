"""Leaderboard entries: what a submission claims, in a form anyone can check and reproduce.

An entry is derived from a run's result file, never typed by hand: `entry_from_result` copies
the run's identity (qbench version, model sha256, exact utterance ids' digest, quantizer
distribution/version/config, policy, calibration set), its recomputable figures (WER, CER,
model bytes, bits per weight, quantized fraction, the devices it fits, the device budget,
compute counts) and, per utterance, the normalized hypothesis with its word and character
error counts. The per-utterance part makes an entry checkable without rerunning: `qbench
validate` recomputes WER/CER from it and the hypotheses digest from the hypotheses, so an
edited figure no longer agrees with its own evidence; `qbench verify` reruns the entry and
compares every recomputable figure.

What only the submitter's machine can say (wall time, RTF/RTFx, peak RSS, the measured device
peak, and the machine itself) sits apart in `submitted_measurements`: shown on the page with
the machine it came from, never ranked on and never compared by `verify`.

Every object of an entry is a strict model: unknown keys at any depth, non-finite numbers and
values of the wrong JSON type are refused, and every name that reaches a file path or the page
(model, subset, quantizer, distribution, devices, config keys, utterance ids) is a `SafeName`:
letters, digits and `._+-`, starting with a letter or digit, so no path separator, no `..`
component and no markup can get through.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    JsonValue,
    StringConstraints,
    ValidationError,
    WithJsonSchema,
    model_serializer,
    model_validator,
)
from pydantic_core import PydanticCustomError

from qbench.errors import QBenchError, one_line
from qbench.results import RunResult

ENTRY_SCHEMA_VERSION = 2
#: Versions `read_entry` can read. A version-1 entry is upgraded in memory (so `--utterance-ids`
#: and `RunSpec.from_entry` still take the committed entries' ids), but `qbench validate` accepts
#: only the current version: a v1 entry's devices_fitted depended on the submitter's thread count.
READABLE_SCHEMA_VERSIONS = (1, 2)

#: An entry on 1000 utterances is about 1 MB (id, normalized hypothesis and four counts per
#: utterance, ~250 bytes each, plus a calibration id list); the largest official test subset
#: (test-other, 2939 utterances) about 1 MB more. 8 MB leaves room for entries on several
#: subsets while keeping what a pull request can make CI read and parse small. Checked before
#: the file is parsed.
MAX_ENTRY_BYTES = 8 * 2**20

SAFE_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,63}$"
_SAFE_NAME = re.compile(SAFE_NAME_PATTERN)
SAFE_NAME_RULE = "a letter or digit, then up to 63 of letters, digits and . _ + - (no path separators, no markup)"

#: ComputeReport fields that are timings on the submitter's machine, not counts: they go to
#: `submitted_measurements` (as compute_wall_seconds / macs_per_second), never into `compute`.
COMPUTE_TIMING_FIELDS = ("wall_seconds", "macs_per_second")


class EntryError(QBenchError, ValueError):
    """A run that cannot become a leaderboard entry, or an entry file that is not one."""


class OutsideRootError(EntryError):
    """A path derived from an entry that would leave the leaderboard folder."""


def _short(value: object, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _safe_name(value: str) -> str:
    if not _SAFE_NAME.fullmatch(value):
        raise PydanticCustomError("unsafe_name", "{value} is not a safe name: " + SAFE_NAME_RULE, {"value": _short(value)})
    return value


def _finite_json(value: JsonValue) -> JsonValue:
    """Refuse NaN and infinities anywhere inside a JSON value (a quantizer config)."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, float) and not math.isfinite(item):
            raise PydanticCustomError("finite_number", "non-finite number {value} in a config value", {"value": repr(item)})
        if isinstance(item, dict):
            stack += item.values()
        elif isinstance(item, list):
            stack += item
    return value


SafeName = Annotated[str, AfterValidator(_safe_name), WithJsonSchema({"type": "string", "pattern": SAFE_NAME_PATTERN})]
Sha256 = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
#: free text that may be shown on the page (escaped): one line, bounded
Text = Annotated[str, StringConstraints(max_length=200, pattern=r"^[^\x00-\x1f\x7f]*$")]
Timestamp = Annotated[str, StringConstraints(pattern=r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:\d{2})$")]
Count = Annotated[int, Field(ge=0)]
Positive = Annotated[int, Field(ge=1)]
NonNegative = Annotated[float, Field(ge=0)]
ConfigValue = Annotated[JsonValue, AfterValidator(_finite_json)]


class _Strict(BaseModel):
    # strict: a number is a JSON number (not "123"), a flag is true/false; no NaN, no inf
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class EntryModel(_Strict):
    name: SafeName
    architecture: SafeName
    format: SafeName
    sha256: Sha256 = Field(description="sha256 of the main weights file the run loaded")
    parameters: Positive


class EntryDataset(_Strict):
    name: Literal["librispeech"] = "librispeech"
    subset: SafeName
    limit: Positive | None
    utterance_count: Count
    utterance_ids_sha256: Sha256
    partial_subset: bool


class EntryLowRank(_Strict):
    """Mirrors `qbench.quant.lowrank.LowRankCorrection`."""

    rank: Annotated[int, Field(ge=1, le=4096)]
    dtype: Literal["float16", "int8"] = "float16"


class EntryPolicy(_Strict):
    """Mirrors `qbench.quant.apply.QuantizationPolicy` (field for field, same defaults)."""

    include_kinds: list[Literal["linear", "conv"]] = Field(default_factory=lambda: ["linear", "conv"])
    quantize_embeddings: bool = False
    exclude: list[Text] = Field(default_factory=list)
    lowrank: EntryLowRank | None = None

    @model_serializer(mode="wrap")
    def _without_unset_lowrank(self, handler: Any) -> dict[str, Any]:
        data = handler(self)
        if data.get("lowrank") is None:
            data.pop("lowrank", None)
        return data


def _strict_policy(value: dict[str, Any]) -> dict[str, Any]:
    # kept a plain dict (what RunSpec.from_entry and QuantizationPolicy take), checked as EntryPolicy
    try:
        return EntryPolicy.model_validate(value).model_dump(mode="json")
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err.get("loc", ())) or "policy"
        raise PydanticCustomError("policy", "{where}: {msg}", {"where": where, "msg": err["msg"]}) from None


def _inlined_schema(model: type[BaseModel]) -> dict[str, Any]:
    """`model`'s JSON schema with its `$defs` references replaced by the definitions, so it can
    be embedded in another model's schema (which has its own `$defs`)."""
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})

    def inline(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/$defs/"):
                return inline(defs[ref.rsplit("/", 1)[1]])
            return {k: inline(v) for k, v in node.items()}
        if isinstance(node, list):
            return [inline(v) for v in node]
        return node

    return inline(schema)


PolicyDict = Annotated[dict[str, Any], AfterValidator(_strict_policy), WithJsonSchema(_inlined_schema(EntryPolicy))]


class EntryPlanQuantizer(_Strict):
    """One quantizer a plan ran (`qbench.quant.apply.QuantizerIdentity`)."""

    name: SafeName
    version: SafeName
    distribution: SafeName | None = None
    distribution_version: SafeName | None = None
    config: dict[SafeName, ConfigValue]
    needs_calibration: bool


class EntryQuantizer(_Strict):
    name: SafeName
    version: SafeName
    distribution: SafeName | None
    distribution_version: SafeName | None
    config: dict[SafeName, ConfigValue]
    policy: PolicyDict
    mean_bits_per_weight: Annotated[float, Field(ge=0, le=64)] = Field(
        description="8 x packed bytes (codes, scales, zeros, codebook) / quantized weights")
    quantized_fraction: Annotated[float, Field(ge=0, le=1)] = Field(description="quantized weights / all parameters")
    scale_dtype: SafeName
    artifact_sha256: Sha256 | None = Field(None, description="digest of the quantized artifact, when the harness writes one")
    plan_quantizers: list[EntryPlanQuantizer] | None = Field(
        None, description="for a plan (name 'plan', config the whole plan): every quantizer it ran, in rule order")


class EntryActivationScheme(_Strict):
    """`qbench.quant.activation_scheme.ActivationScheme`, field for field."""

    bits: Annotated[int, Field(ge=2, le=8)]
    granularity: Literal["token", "tensor"]
    symmetric: bool
    rounding: Literal["half_even", "half_away"]
    dynamic: bool


class EntryStaticScale(_Strict):
    scale: Annotated[float, Field(gt=0)]
    zero: Annotated[int, Field(ge=0, le=255)]


class EntryActivations(_Strict):
    """The activation scheme a run quantized every linear input by
    (`qbench.quant.activation_scheme.ActivationRecord`)."""

    name: SafeName
    version: SafeName
    distribution: SafeName | None = None
    distribution_version: SafeName | None = None
    config: dict[SafeName, ConfigValue]
    scheme: EntryActivationScheme
    kv_cache: bool
    attention: bool = False
    static_scales: dict[SafeName, EntryStaticScale] | None = Field(
        None, description="a static scheme's scale and zero point per layer input, from calibration")

    @model_validator(mode="after")
    def _scales_match_the_scheme(self) -> EntryActivations:
        if self.scheme.dynamic and self.static_scales is not None:
            raise ValueError("a dynamic scheme has no static scales")
        if not self.scheme.dynamic and not self.static_scales:
            raise ValueError("a static scheme needs a scale for every layer input")
        if self.scheme.granularity == "token" and not self.scheme.dynamic:
            raise ValueError("a static scale cannot be per token")
        limit = 2**self.scheme.bits - 1
        for layer, scale in (self.static_scales or {}).items():
            if scale.zero > limit or (self.scheme.symmetric and scale.zero != 0):
                raise ValueError(f"static scale of {layer}: zero point {scale.zero} outside the scheme's codes")
        return self

    @property
    def label(self) -> str:
        """The file-name part: `a-absmax-bits8-roundinghalf_even`, plus `-kv` with a quantized KV cache."""
        parts = ["a", self.name] + [f"{key}{_slug(value)}" for key, value in sorted(self.config.items())]
        return ("-".join(re.sub(r"[^A-Za-z0-9_.]+", "", p) for p in parts) + ("-kv" if self.kv_cache else "")
                + ("-att" if self.attention else ""))


class EntryCalibration(_Strict):
    subset: SafeName
    utterance_count: Count
    utterance_ids_sha256: Sha256
    utterance_ids: list[SafeName]
    #: the calibration pass counted padded rows (Whisper's decoder past end of text) as data,
    #: the default, and what every entry made before the field existed did;
    #: `RunSpec.calibration_counts_padding`
    counts_padding: bool = True
    #: a speed-perturbed copy of every utterance was added at each of these speeds;
    #: `RunSpec.calibration_speeds`
    speeds: list[Annotated[float, Field(ge=0.5, le=2.0)]] = []

    @model_serializer(mode="wrap")
    def _without_default_choices(self, handler: Any) -> dict[str, Any]:
        # an entry calibrated the default way serializes as entries did before the fields
        data = handler(self)
        if data.get("counts_padding") is True:
            data.pop("counts_padding")
        if data.get("speeds") == []:
            data.pop("speeds")
        return data


class SubsetScore(_Strict):
    wer: NonNegative
    cer: NonNegative
    utterances: Count
    words: Count
    word_errors: Count
    chars: Count
    char_errors: Count


class EntryUtterance(_Strict):
    id: SafeName
    hypothesis: Annotated[str, StringConstraints(max_length=10_000)] = Field(description="normalized hypothesis")
    word_errors: Count
    words: Count
    char_errors: Count
    chars: Count


class EntryDevice(_Strict):
    name: SafeName
    fits: bool
    batch_size: Positive
    total_ram_bytes: Count | None = Field(None, description="RAM the accountant budgets (weights in RAM + working peak)")


class EntryKindCount(_Strict):
    macs: Count
    bit_ops: Count


class EntryCompute(_Strict):
    """The counts of `qbench.embedded.compute.ComputeReport`, field for field, without its
    timings (`COMPUTE_TIMING_FIELDS`). A field added there must be added here: until it is,
    `entry_from_result` refuses the run naming the field (and a test compares the two lists)."""

    linear: dict[SafeName, EntryKindCount] = Field(description="weight matmuls by layer kind")
    attention_macs: dict[SafeName, Count] = Field(description="q.k and scores.v products")
    total_macs: Count
    total_bit_ops: Count
    activation_bits: Positive
    attention_bits: Positive = 32
    ternary_macs: Count
    ternary_additions: Count
    input_scale_muls: Count = 0
    transform_additions: Count = 0
    lowrank_macs: Count = 0
    operations: dict[SafeName, Count] = Field(default_factory=dict, description="the work by operand widths "
                                              "(fp32_mac, int8xint4_mac, int8xternary_add, ...)")
    arithmetic_energy_pj: NonNegative = Field(0.0, description="operations priced by Horowitz, ISSCC 2014 (45 nm)")
    encoder_windows: Count
    decode_steps: Count
    decoded_token_rows: Count


class EntryMachine(_Strict):
    """Mirrors `qbench.results.MachineInfo`, field for field."""

    platform: Text
    processor: Text
    cpu_count: Positive
    memory_bytes: Count
    python: Text
    numpy: Text
    blas: Text | None = None
    threads: Annotated[int, Field(ge=1, le=1024)] | None = None


class SubmittedMeasurements(_Strict):
    """Measured on the submitter's machine: shown with that machine, never ranked on, never
    compared by `qbench verify` (another machine takes another time)."""

    wall_seconds: NonNegative
    rtf: NonNegative = Field(description="wall seconds per audio second")
    rtfx: NonNegative = Field(description="audio seconds per wall second")
    peak_rss_bytes: Count = Field(description="the process's RSS high-water mark")
    device_measured_peak_bytes: Count | None = Field(None, description="largest tracemalloc working peak on the device")
    compute_wall_seconds: NonNegative | None = Field(None, description="wall seconds inside the counted model calls")
    macs_per_second: NonNegative | None = None
    machine: EntryMachine


class LeaderboardEntry(_Strict):
    schema_version: Literal[2] = ENTRY_SCHEMA_VERSION
    qbench_version: SafeName
    created_at: Timestamp
    model: EntryModel
    dataset: EntryDataset
    quantizer: EntryQuantizer | None = Field(description="None for the float baseline")
    calibration: EntryCalibration | None
    activations: EntryActivations | None = Field(None, description="the activation scheme; None: float32 activations")
    encoder_seconds: Annotated[float, Field(gt=0, le=3600)] | None = Field(
        None, description="audio per encoder pass (Whisper windows below 30 s, wav2vec2 chunks); None: the model's default")
    wer: NonNegative
    cer: NonNegative
    subsets: dict[SafeName, SubsetScore]
    model_bytes: Positive = Field(description="bytes of the weights as held in memory (real buffers)")
    audio_seconds: NonNegative
    device: EntryDevice | None = Field(description="the device profile the run was budgeted for")
    devices_fitted: list[SafeName] = Field(description="device profiles the model fits, by the accountant at one thread")
    compute: EntryCompute | None = Field(default=None, description="MACs / bit operations per layer kind")
    hypotheses_sha256: Sha256
    submitted_measurements: SubmittedMeasurements
    utterances: list[EntryUtterance]

    @property
    def label(self) -> str:
        base = entry_label(self.quantizer)
        if self.activations is not None:
            base = f"{base}-{self.activations.label}"
        c = self.calibration
        # entries calibrated another way than the default sit beside the default's, not over it
        if c is not None and not c.counts_padding:
            base = f"{base}-cal-fed"
        if c is not None and c.speeds:
            base = f"{base}-cal-speed{'_'.join(f'{f:g}' for f in c.speeds)}"
        return base if self.encoder_seconds is None else f"{base}-enc{self.encoder_seconds:g}s"

    @model_serializer(mode="wrap")
    def _without_float_activations(self, handler: Any) -> dict[str, Any]:
        # an entry with float activations is written as before activation schemes existed
        data = handler(self)
        for key in ("activations", "encoder_seconds"):
            if data.get(key) is None:
                data.pop(key, None)
        return data

    @property
    def bits_class(self) -> str:
        """Bit-width class the leaderboard ranks within."""
        return bits_class_of(None if self.quantizer is None else self.quantizer.mean_bits_per_weight)


def bits_class_of(mean_bits_per_weight: float | None) -> str:
    """The bit-width class of a quantizer's mean bits per weight (None: float weights)."""
    if mean_bits_per_weight is None:
        return "float"
    for limit, name in ((2.5, "<=2 bits"), (3.5, "3 bits"), (5.0, "4 bits"), (9.0, "8 bits")):
        if mean_bits_per_weight < limit:
            return name
    return "float"


def _slug(value: Any) -> str:
    text = str(value).lower() if not isinstance(value, bool) else ("true" if value else "false")
    return re.sub(r"[^a-z0-9.]+", "", text)


def entry_label(quantizer: EntryQuantizer | None) -> str:
    """A stable file stem: `fp`, or the quantizer name and its full config, sorted by key."""
    if quantizer is None:
        return "fp"
    if quantizer.name == "plan" and quantizer.plan_quantizers is not None:
        return "plan-" + re.sub(r"[^A-Za-z0-9_.+-]+", "", str(quantizer.config.get("name", "unnamed")))
    parts = [quantizer.name] + [f"{key}{_slug(value)}" for key, value in sorted(quantizer.config.items())]
    lowrank = quantizer.policy.get("lowrank")
    if lowrank:
        parts.append(f"lr{lowrank['rank']}" + ("i8" if lowrank.get("dtype") == "int8" else ""))
    if quantizer.policy.get("quantize_embeddings"):
        parts.append("emb")
    return "-".join(re.sub(r"[^A-Za-z0-9_.]+", "", p) for p in parts)


def contained_path(root: Path, path: Path) -> Path:
    """`path` if it resolves inside `root` (symbolic links followed), else `OutsideRootError`.

    The name rules already keep entry-derived paths inside; this is the second wall."""
    resolved_root = root.resolve()
    if not path.resolve().is_relative_to(resolved_root):
        raise OutsideRootError(f"{path} is outside the leaderboard folder {root}; refusing to use it")
    return path


def entry_path(root: Path, entry: LeaderboardEntry) -> Path:
    """Where an entry lives: `leaderboards/<model>/<subset>/<label>.json`."""
    return contained_path(root, root / entry.model.name / entry.dataset.subset / f"{entry.label}.json")


def entry_compute(report: dict[str, Any]) -> tuple[EntryCompute, dict[str, float]]:
    """A result's compute report split into its counts (the entry's `compute`) and its timings."""
    counts = {k: v for k, v in report.items() if k not in COMPUTE_TIMING_FIELDS}
    timings = {k: report[k] for k in COMPUTE_TIMING_FIELDS if k in report}
    try:
        return EntryCompute.model_validate(counts), timings
    except ValidationError as exc:
        unknown = [str(e["loc"][0]) for e in exc.errors() if e["type"] == "extra_forbidden"]
        if unknown:
            raise EntryError(f"the run's compute report has field(s) the entry schema does not know: {', '.join(unknown)} "
                             "(add them to qbench.leaderboard.entry.EntryCompute)") from None
        raise EntryError(f"the run's compute report is not an entry's: {one_line(exc.errors()[0]['msg'])}") from None


def entry_from_result(result: RunResult, devices_fitted: list[str]) -> LeaderboardEntry:
    """The leaderboard entry of a complete run (refuses partial or failed runs, and runs whose
    names or figures no entry may hold, naming the field)."""
    if result.status != "complete" or result.metrics is None:
        raise EntryError(f"only a complete run can become an entry (this one is {result.status}: {result.error})")
    try:
        return _entry_of(result, devices_fitted)
    except ValidationError as exc:
        raise EntryError(f"this run cannot become an entry: {exc.title}: {schema_problems(exc, 1)[0]}") from None


def _entry_of(result: RunResult, devices_fitted: list[str]) -> LeaderboardEntry:
    m = result.metrics
    assert m is not None
    quantizer = calibration = None
    if result.quantization:
        q = result.quantization
        quantizer = EntryQuantizer(
            name=q["quantizer"], version=q["quantizer_version"], distribution=q.get("distribution"),
            distribution_version=q.get("distribution_version"), config=q["config"], policy=q["policy"],
            mean_bits_per_weight=q["mean_bits_per_weight"], quantized_fraction=q["quantized_fraction"],
            scale_dtype=q["scale_dtype"], artifact_sha256=q.get("artifact_sha256"),
            plan_quantizers=q.get("plan_quantizers"),
        )
    if result.calibration:
        c = result.calibration
        calibration = EntryCalibration(subset=c["subset"], utterance_count=c["utterance_count"],
                                       utterance_ids_sha256=c["utterance_ids_sha256"], utterance_ids=c["utterance_ids"],
                                       counts_padding=c.get("counts_padding", True), speeds=c.get("speeds", []))
    device = compute = None
    timings: dict[str, float] = {}
    d = result.device or {}
    if d:
        device = EntryDevice(name=d["profile"]["name"], fits=bool(d["fits"]), batch_size=d.get("batch_size") or 1,
                             total_ram_bytes=(d.get("breakdown") or {}).get("total_ram_bytes"))
    if d.get("compute") is not None:
        compute, timings = entry_compute(d["compute"])
    utterances = [EntryUtterance(id=u.id, hypothesis=u.hypothesis_normalized, word_errors=u.word_errors, words=u.words,
                                 char_errors=u.char_errors, chars=u.chars) for u in sorted(result.utterances, key=lambda u: u.id)]
    score = subset_score(utterances)
    measurements = SubmittedMeasurements(
        wall_seconds=m.wall_seconds, rtf=m.rtf, rtfx=m.rtfx, peak_rss_bytes=m.peak_rss_bytes,
        device_measured_peak_bytes=d.get("measured_peak_bytes"), compute_wall_seconds=timings.get("wall_seconds"),
        macs_per_second=timings.get("macs_per_second"), machine=EntryMachine.model_validate(result.machine.model_dump()),
    )
    return LeaderboardEntry(
        qbench_version=result.qbench_version, created_at=result.created_at,
        model=EntryModel(name=result.model.name, architecture=result.model.architecture, format=result.model.format,
                         sha256=result.model.sha256, parameters=result.model.parameters),
        dataset=EntryDataset(subset=result.dataset.subset, limit=result.dataset.limit, utterance_count=result.dataset.utterance_count,
                             utterance_ids_sha256=result.dataset.utterance_ids_sha256, partial_subset=result.dataset.partial_subset),
        quantizer=quantizer, calibration=calibration,
        activations=EntryActivations.model_validate(result.activations) if result.activations else None,
        encoder_seconds=result.encoder_seconds, wer=score.wer, cer=score.cer, subsets={result.dataset.subset: score},
        model_bytes=m.model_bytes, audio_seconds=m.audio_seconds, device=device, devices_fitted=sorted(devices_fitted),
        compute=compute, hypotheses_sha256=result.hypotheses_sha256 or "", submitted_measurements=measurements,
        utterances=utterances,
    )


def subset_score(utterances: list[EntryUtterance]) -> SubsetScore:
    words = sum(u.words for u in utterances)
    chars = sum(u.chars for u in utterances)
    werr = sum(u.word_errors for u in utterances)
    cerr = sum(u.char_errors for u in utterances)
    return SubsetScore(wer=werr / words if words else 0.0, cer=cerr / chars if chars else 0.0, utterances=len(utterances),
                       words=words, word_errors=werr, chars=chars, char_errors=cerr)


def write_entry(root: Path, entry: LeaderboardEntry) -> Path:
    path = entry_path(root, entry)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(entry.model_dump_json(indent=1) + "\n")
    return path


# -- reading ----------------------------------------------------------------------------------


def read_entry_json(path: Path) -> Any:
    """The JSON of an entry file, refusing what no entry is before parsing it: a symbolic link
    or other non-regular file, more than `MAX_ENTRY_BYTES`, not UTF-8, duplicate keys in an
    object (two readers could see two different values), NaN or an infinity at any depth."""
    if path.is_symlink() or not path.is_file():
        raise EntryError(f"{path}: not a regular file (entries are plain JSON files, not links)")
    with path.open("rb") as f:
        raw = f.read(MAX_ENTRY_BYTES + 1)  # bounded: a file that grows while read is still refused
    if len(raw) > MAX_ENTRY_BYTES:
        raise EntryError(f"{path}: larger than the {MAX_ENTRY_BYTES // 2**20} MiB an entry may be; not read")
    try:
        data = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicate_keys)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise EntryError(f"{path}: not JSON: {one_line(exc)}") from None
    where = non_finite_number(data)
    if where is not None:
        raise EntryError(f"{path}: {where}: non-finite number (NaN or infinity); an entry's figures are finite")
    return data


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj: dict[str, Any] = {}
    for key, value in pairs:
        if key in obj:
            raise ValueError(f"duplicate key {_short(key)}")
        obj[key] = value
    return obj


def non_finite_number(data: Any, where: str = "") -> str | None:
    """The dotted path of the first NaN or infinity in parsed JSON, or None."""
    stack: list[tuple[str, Any]] = [(where, data)]
    while stack:
        at, item = stack.pop()
        if isinstance(item, float) and not math.isfinite(item):
            return at or "the file"
        if isinstance(item, dict):
            stack += [(f"{at}.{k}" if at else str(k), v) for k, v in reversed(item.items())]
        elif isinstance(item, list):
            stack += [(f"{at}[{i}]", v) for i, v in reversed(list(enumerate(item)))]
    return None


def schema_problems(exc: ValidationError, limit: int = 10) -> list[str]:
    """A pydantic failure as one line per problem: `field.path: message`."""
    lines = []
    for err in exc.errors()[:limit]:
        where = ".".join(str(p) for p in err.get("loc", ())) or "entry"
        hint = " (unknown key)" if err["type"] == "extra_forbidden" else ""
        lines.append(f"{where}: {one_line(err['msg'])}{hint}")
    if exc.error_count() > limit:
        lines.append(f"... and {exc.error_count() - limit} more schema problem(s)")
    return lines


def upgrade_v1(data: dict[str, Any]) -> dict[str, Any]:
    """A version-1 entry's JSON in the version-2 layout: its timings, peak RSS, measured device
    peak and machine move into `submitted_measurements`; nothing is recomputed."""
    data = dict(data)
    compute = dict(data["compute"]) if isinstance(data.get("compute"), dict) else data.get("compute")
    timings = {k: compute.pop(k, None) for k in COMPUTE_TIMING_FIELDS} if isinstance(compute, dict) else {}
    device = dict(data["device"]) if isinstance(data.get("device"), dict) else data.get("device")
    measured = device.pop("measured_peak_bytes", None) if isinstance(device, dict) else None
    data.update(schema_version=2, compute=compute, device=device)
    data["submitted_measurements"] = {
        "wall_seconds": data.pop("wall_seconds", None), "rtf": data.pop("rtf", None), "rtfx": data.pop("rtfx", None),
        "peak_rss_bytes": data.pop("peak_rss_bytes", None), "device_measured_peak_bytes": measured,
        "compute_wall_seconds": timings.get("wall_seconds"), "macs_per_second": timings.get("macs_per_second"),
        "machine": data.pop("machine", None),
    }
    return data


def schema_version_problem(data: Any, readable: tuple[int, ...] = (ENTRY_SCHEMA_VERSION,)) -> str | None:
    """Why `data` is not an entry of a version in `readable`, or None."""
    if not isinstance(data, dict):
        return "not a JSON object"
    version = data.get("schema_version")
    if version in readable and type(version) is int:
        return None
    if type(version) is int and 1 <= version < ENTRY_SCHEMA_VERSION:
        return (f"schema_version: {version} is an older entry schema (this qbench writes {ENTRY_SCHEMA_VERSION}); "
                "regenerate the entry with `qbench run --submit`")
    return f"schema_version: {_short(version)} is not an entry schema version this qbench knows ({ENTRY_SCHEMA_VERSION})"


def read_entry(path: Path) -> LeaderboardEntry:
    """The entry at `path` (version 1 upgraded in memory); a file that is not one is an
    `EntryError` naming it and the first field at fault."""
    data = read_entry_json(path)
    problem = schema_version_problem(data, READABLE_SCHEMA_VERSIONS)
    if problem is not None:
        raise EntryError(f"{path}: {problem}")
    if data["schema_version"] == 1:
        data = upgrade_v1(data)
    try:
        return LeaderboardEntry.model_validate(data)
    except ValidationError as exc:
        raise EntryError(f"{path}: not a leaderboard entry ({exc.error_count()} problem(s); {schema_problems(exc, 1)[0]})") from None
