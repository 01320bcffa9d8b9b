"""The result file of a `qbench run`: a pydantic model written as JSON, per-utterance included.

A run writes its file after every batch (atomically), so a crash, a bad audio file or a
failing plugin never loses what was already computed: the file then says `status: failed` (or
`interrupted`, after SIGINT/SIGTERM) and why, and holds every utterance finished before. The
run's journal (`qbench.journal`) holds the same utterances line by line, so the next run of
the same spec resumes; `identity` says which spec a file belongs to.
"""

from __future__ import annotations

import hashlib
import os
import platform
import tempfile
from collections.abc import Iterable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import numpy as np
import psutil
from pydantic import BaseModel, Field

from qbench import __version__


class MachineInfo(BaseModel):
    platform: str
    processor: str
    cpu_count: int
    memory_bytes: int
    python: str
    numpy: str
    blas: str | None = None
    threads: int | None = Field(None, description="threads qbench ran on (QBENCH_THREADS / --threads)")

    @classmethod
    def current(cls) -> MachineInfo:
        from threadpoolctl import threadpool_info

        from qbench.models.parallel import compute_threads

        blas = next((f"{pool.get('internal_api')} {pool.get('version')} ({pool.get('architecture')})"
                     for pool in threadpool_info() if pool.get("user_api") == "blas"), None)
        threads = compute_threads()
        return cls(
            platform=platform.platform(),
            processor=platform.processor() or platform.machine(),
            cpu_count=os.cpu_count() or 1,
            memory_bytes=psutil.virtual_memory().total,
            python=platform.python_version(),
            numpy=np.__version__,
            blas=blas,
            threads=threads,
        )


class ModelRef(BaseModel):
    name: str = Field(description="the card's name, or for weights no card names, their shape "
                                  "(qbench.checkpoints.card.checkpoint_name)")
    architecture: str
    format: str
    path: str
    sha256: str = Field(description="sha256 of the main weights file")
    parameters: int
    card: str | None = Field(None, description="the model card that names the weights; null: none does, the "
                                               "architecture and dimensions were read from the checkpoint itself")
    pinned: bool | None = Field(None, description="whether that card pins exactly these weights (their sha256); "
                                                  "null in results of a qbench that did not record it")


class DatasetRef(BaseModel):
    name: Literal["librispeech"] = "librispeech"
    subset: str
    data_dir: str
    limit: int | None
    utterance_count: int
    utterance_ids_sha256: str = Field(description="sha256 of the newline-joined sorted utterance ids")
    partial_subset: bool = Field(description="true when fewer utterances than the official subset were present")


class UtteranceResult(BaseModel):
    id: str
    audio_sha256: str | None = Field(None, description="sha256 of the decoded float32 samples (little-endian bytes)")
    duration: float
    reference: str
    hypothesis: str
    reference_normalized: str
    hypothesis_normalized: str
    word_errors: int
    words: int
    char_errors: int
    chars: int


class UnscoredUtterance(BaseModel):
    """An utterance left out of scoring, and why (its reference has no words to count errors against)."""

    id: str
    reference: str
    reason: str


class Metrics(BaseModel):
    wer: float
    cer: float
    utterances: int
    audio_seconds: float
    wall_seconds: float
    rtf: float = Field(description="wall seconds per audio second")
    rtfx: float = Field(description="audio seconds per wall second")
    model_bytes: int = Field(description="bytes of the weights as held in memory (real buffers)")
    peak_rss_bytes: int = Field(description="the process's RSS high-water mark (kernel ru_maxrss)")


class RunResult(BaseModel):
    schema_version: int = 1
    qbench_version: str = __version__
    created_at: str = Field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))
    status: Literal["running", "complete", "failed", "interrupted"] = "running"
    error: str | None = None
    identity: str | None = Field(None, description="RunSpec.identity(): digest of the settings that decide the result")
    model: ModelRef
    dataset: DatasetRef
    quantization: dict[str, Any] | None = None
    calibration: dict[str, Any] | None = None
    activations: dict[str, Any] | None = Field(None, description="activation quantization (qbench.quant.activation_scheme."
                                                                 "ActivationRecord); None: float32 activations")
    encoder_seconds: float | None = Field(None, description="audio per encoder pass (None: the model's default)")
    device: dict[str, Any] | None = None
    metrics: Metrics | None = None
    hypotheses_sha256: str | None = None
    devices_fitted: list[str] | None = Field(None, description="device profiles the model fits, by the accountant (complete runs)")
    machine: MachineInfo
    warnings: list[str] = Field([], description="what the run noticed about its input (skipped files, unscored "
                                                "utterances, journaled audio that changed), one line each")
    unscored: list[UnscoredUtterance] = []
    resumed_utterances: int = Field(0, description="utterances taken from the journal of an earlier, unfinished run")
    utterances: list[UtteranceResult] = []

    @classmethod
    def read(cls, path: str | Path) -> RunResult:
        return cls.model_validate_json(Path(path).read_text(encoding="utf-8"))

    def write(self, path: str | Path) -> Path:
        """Write atomically (temp file + rename) so a reader never sees half a file."""
        return write_atomically(path, self.model_dump_json(indent=2) + "\n")


def write_atomically(path: str | Path, data: str | bytes) -> Path:
    """Write `data` to `path` through a temporary file and a rename: a reader (or a run killed
    mid-write) sees the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "wb" if isinstance(data, bytes) else "w") as f:
        f.write(data)
    os.replace(tmp, path)
    return path


def audio_digest(audio: np.ndarray) -> str:
    """sha256 of decoded samples as little-endian float32 bytes: "the same utterance" means the
    same audio, whatever file format or path it came from."""
    return hashlib.sha256(np.ascontiguousarray(audio, dtype="<f4").tobytes()).hexdigest()


def hypotheses_digest(pairs: Iterable[tuple[str, str]]) -> str:
    """sha256 over `id<TAB>normalized hypothesis` lines in id order: what reproduces a run."""
    lines = sorted(f"{uid}\t{hypothesis}" for uid, hypothesis in pairs)
    return hashlib.sha256("\n".join(lines).encode("utf-8")).hexdigest()
