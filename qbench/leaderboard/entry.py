"""Leaderboard entries: what a submission claims, in a form anyone can check and reproduce.

An entry is derived from a run's result file, never typed by hand: `entry_from_result` copies
the run's identity (qbench version, model sha256, exact utterance ids' digest, quantizer
distribution/version/config, policy, calibration set), its figures (WER, CER, bytes, memory,
compute, speed with the machine) and, per utterance, the normalized hypothesis with its word
and character error counts. The per-utterance part is what makes an entry checkable without
rerunning: `qbench validate` recomputes WER/CER from it and the hypotheses digest from the
hypotheses, so an edited figure no longer agrees with its own evidence.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from qbench.errors import QBenchError
from qbench.results import MachineInfo, RunResult

ENTRY_SCHEMA_VERSION = 1


class EntryError(QBenchError, ValueError):
    """A run that cannot become a leaderboard entry, or an entry file that is not one."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class EntryModel(_Strict):
    name: str
    architecture: str
    format: str
    sha256: str = Field(description="sha256 of the main weights file the run loaded")
    parameters: int


class EntryDataset(_Strict):
    name: str = "librispeech"
    subset: str
    limit: int | None
    utterance_count: int
    utterance_ids_sha256: str
    partial_subset: bool


class EntryQuantizer(_Strict):
    name: str
    version: str
    distribution: str | None
    distribution_version: str | None
    config: dict[str, Any]
    policy: dict[str, Any]
    mean_bits_per_weight: float
    quantized_fraction: float
    scale_dtype: str


class EntryCalibration(_Strict):
    subset: str
    utterance_count: int
    utterance_ids_sha256: str
    utterance_ids: list[str]


class SubsetScore(_Strict):
    wer: float
    cer: float
    utterances: int
    words: int
    word_errors: int
    chars: int
    char_errors: int


class EntryUtterance(_Strict):
    id: str
    hypothesis: str = Field(description="normalized hypothesis")
    word_errors: int
    words: int
    char_errors: int
    chars: int


class EntryDevice(_Strict):
    name: str
    fits: bool
    batch_size: int
    total_ram_bytes: int | None = None
    measured_peak_bytes: int | None = None


class LeaderboardEntry(_Strict):
    schema_version: int = ENTRY_SCHEMA_VERSION
    qbench_version: str
    created_at: str
    model: EntryModel
    dataset: EntryDataset
    quantizer: EntryQuantizer | None = Field(description="None for the float baseline")
    calibration: EntryCalibration | None
    wer: float
    cer: float
    subsets: dict[str, SubsetScore]
    model_bytes: int
    peak_rss_bytes: int
    device: EntryDevice | None = Field(description="the device profile the run was budgeted for")
    devices_fitted: list[str] = Field(description="device profiles the model fits, by the run's own accounting")
    compute: dict[str, Any] | None = Field(default=None, description="MACs / bit operations per layer kind")
    wall_seconds: float
    audio_seconds: float
    rtf: float
    rtfx: float
    machine: MachineInfo
    hypotheses_sha256: str
    utterances: list[EntryUtterance]

    @property
    def label(self) -> str:
        return entry_label(self.quantizer)

    @property
    def bits_class(self) -> str:
        """Bit-width class the leaderboard ranks within."""
        if self.quantizer is None:
            return "float"
        bits = self.quantizer.mean_bits_per_weight
        for limit, name in ((2.5, "<=2 bits"), (3.5, "3 bits"), (5.0, "4 bits"), (9.0, "8 bits")):
            if bits < limit:
                return name
        return "float"


def _slug(value: Any) -> str:
    text = str(value).lower() if not isinstance(value, bool) else ("true" if value else "false")
    return re.sub(r"[^a-z0-9.]+", "", text)


def entry_label(quantizer: EntryQuantizer | None) -> str:
    """A stable file stem: `fp`, or the quantizer name and its full config, sorted by key."""
    if quantizer is None:
        return "fp"
    parts = [quantizer.name] + [f"{key}{_slug(value)}" for key, value in sorted(quantizer.config.items())]
    if quantizer.policy.get("quantize_embeddings"):
        parts.append("emb")
    return "-".join(re.sub(r"[^A-Za-z0-9_.]+", "", p) for p in parts)


def entry_path(root: Path, entry: LeaderboardEntry) -> Path:
    """Where an entry lives: `leaderboards/<model>/<subset>/<label>.json`."""
    return root / entry.model.name / entry.dataset.subset / f"{entry.label}.json"


def entry_from_result(result: RunResult, devices_fitted: list[str]) -> LeaderboardEntry:
    """The leaderboard entry of a complete run (refuses partial or failed runs)."""
    if result.status != "complete" or result.metrics is None:
        raise EntryError(f"only a complete run can become an entry (this one is {result.status}: {result.error})")
    m = result.metrics
    quantizer = calibration = None
    if result.quantization:
        q = result.quantization
        quantizer = EntryQuantizer(
            name=q["quantizer"], version=q["quantizer_version"], distribution=q.get("distribution"),
            distribution_version=q.get("distribution_version"), config=q["config"], policy=q["policy"],
            mean_bits_per_weight=q["mean_bits_per_weight"], quantized_fraction=q["quantized_fraction"],
            scale_dtype=q["scale_dtype"],
        )
    if result.calibration:
        c = result.calibration
        calibration = EntryCalibration(subset=c["subset"], utterance_count=c["utterance_count"],
                                       utterance_ids_sha256=c["utterance_ids_sha256"], utterance_ids=c["utterance_ids"])
    device = None
    if result.device:
        d = result.device
        device = EntryDevice(name=d["profile"]["name"], fits=bool(d["fits"]), batch_size=d.get("batch_size") or 1,
                             total_ram_bytes=(d.get("breakdown") or {}).get("total_ram_bytes"),
                             measured_peak_bytes=d.get("measured_peak_bytes"))
    utterances = [EntryUtterance(id=u.id, hypothesis=u.hypothesis_normalized, word_errors=u.word_errors, words=u.words,
                                 char_errors=u.char_errors, chars=u.chars) for u in sorted(result.utterances, key=lambda u: u.id)]
    score = subset_score(utterances)
    return LeaderboardEntry(
        qbench_version=result.qbench_version, created_at=result.created_at,
        model=EntryModel(name=result.model.name, architecture=result.model.architecture, format=result.model.format,
                         sha256=result.model.sha256, parameters=result.model.parameters),
        dataset=EntryDataset(subset=result.dataset.subset, limit=result.dataset.limit, utterance_count=result.dataset.utterance_count,
                             utterance_ids_sha256=result.dataset.utterance_ids_sha256, partial_subset=result.dataset.partial_subset),
        quantizer=quantizer, calibration=calibration, wer=score.wer, cer=score.cer, subsets={result.dataset.subset: score},
        model_bytes=m.model_bytes, peak_rss_bytes=m.peak_rss_bytes, device=device, devices_fitted=sorted(devices_fitted),
        compute=(result.device or {}).get("compute"), wall_seconds=m.wall_seconds, audio_seconds=m.audio_seconds,
        rtf=m.rtf, rtfx=m.rtfx, machine=result.machine, hypotheses_sha256=result.hypotheses_sha256 or "",
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


def read_entry(path: Path) -> LeaderboardEntry:
    """The entry at `path`; a file that is not one is an `EntryError` naming it."""
    try:
        return LeaderboardEntry.model_validate_json(path.read_text())
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err.get("loc", ())) or "the file"
        raise EntryError(f"{path}: not a leaderboard entry ({exc.error_count()} problem(s); {where}: {err['msg']})") from None
