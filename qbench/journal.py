"""A run's journal, and what a rerun does with the files an earlier run left at its output.

The journal (`<result>.journal`, JSON lines) is how a run never loses work: its first line is
a `JournalHeader` naming the run (the spec's identity and the weights' sha256), then one
`JournalRecord` per transcribed utterance, appended, flushed and fsynced after every batch. A
run killed at any moment (`kill -9`, a power cut) leaves at worst a last line cut short, which
reading drops; the next run of the same spec rescores the journaled hypotheses and transcribes
only the rest.

`claim_output` decides, before anything expensive runs, what the files already at the output
path mean for this run:

* nothing there: start fresh;
* this run's complete result: return it, nothing is recomputed;
* this run's unfinished result and/or journal: resume from them;
* another run's result (other settings or weights, or no identity at all): refuse with one
  line naming the file, or with `force` keep both files aside as `<name>.<UTC time>.json`
  (+ `.journal`) and start fresh. A result file is never overwritten by a different run.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ValidationError

from qbench import __version__
from qbench.errors import QBenchError, one_line
from qbench.results import RunResult

JOURNAL_SUFFIX = ".journal"


class JournalError(QBenchError, ValueError):
    """A journal whose lines are not what qbench writes (damaged by something other than a kill)."""


class OutputInUseError(QBenchError, FileExistsError):
    """The output path holds another run's result; the message names the file and `--force`."""


class JournalHeader(BaseModel):
    """The journal's first line: which run its utterances belong to."""

    kind: Literal["qbench-run-journal"] = "qbench-run-journal"
    journal_version: int = 1
    identity: str
    model_sha256: str
    qbench_version: str = __version__
    created_at: str
    spec: dict[str, Any]  # RunSpec.identity_fields(), for a reader: the identity is their digest


class JournalRecord(BaseModel):
    """One transcribed utterance: enough to rescore it and to check its audio is the same."""

    id: str
    audio_sha256: str
    duration: float
    hypothesis: str
    wall_seconds: float  # its share of its batch's model time, so a resumed run's wall time adds up


def journal_path(output: Path) -> Path:
    return output.with_name(output.name + JOURNAL_SUFFIX)


def read_journal(path: Path) -> tuple[JournalHeader, dict[str, JournalRecord]]:
    """The header and the records by id. A last line without its newline is one a kill cut
    short: dropped. Any other unreadable line is an error naming it."""
    lines = path.read_bytes().split(b"\n")
    finished = lines[:-1]  # lines[-1] follows the last newline: empty, or the cut-short line
    if not finished:
        raise JournalError(f"{path}: empty journal (no header line)")
    try:
        header = JournalHeader.model_validate_json(finished[0])
    except ValidationError:
        raise JournalError(f"{path}:1: not a qbench run journal header") from None
    records: dict[str, JournalRecord] = {}
    for lineno, raw in enumerate(finished[1:], 2):
        try:
            record = JournalRecord.model_validate_json(raw)
        except ValidationError as exc:
            raise JournalError(f"{path}:{lineno}: corrupt journal line ({one_line(exc.errors()[0]['msg'])})") from None
        records[record.id] = record  # a batch transcribed again (its audio changed) supersedes earlier lines
    return header, records


class RunJournal:
    """The journal of the run in progress, open for appending."""

    def __init__(self, path: Path, header: JournalHeader, records: dict[str, JournalRecord]):
        self.path, self.header, self.records = path, header, records
        self._file = path.open("a", encoding="utf-8")

    @classmethod
    def start(cls, path: Path, header: JournalHeader, records: Iterable[JournalRecord] = ()) -> RunJournal:
        """Write the header and the records carried over from an earlier attempt, atomically
        (temp file + rename: a kill leaves the old journal or the new one, never half of one)."""
        records = {r.id: r for r in records}
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        with tmp.open("w", encoding="utf-8") as f:
            f.write(header.model_dump_json() + "\n")
            f.writelines(r.model_dump_json() + "\n" for r in records.values())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
        return cls(path, header, records)

    def append(self, records: list[JournalRecord]) -> None:
        """Make `records` durable before the result file claims them."""
        self._file.write("".join(r.model_dump_json() + "\n" for r in records))
        self._file.flush()
        os.fsync(self._file.fileno())
        self.records.update((r.id, r) for r in records)

    def close(self) -> None:
        self._file.close()

    def discard(self) -> None:
        """The run is complete and its result file holds everything: the journal has done its job."""
        self.close()
        self.path.unlink(missing_ok=True)


def _fsync_dir(directory: Path) -> None:
    # a rename is durable once the directory entry is; not every platform can open a directory
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# -- what the files already at the output mean ----------------------------------------------------


@dataclass
class PriorRun:
    """What an earlier run of this spec left: its complete result, or utterances to resume from."""

    complete: RunResult | None = None
    records: dict[str, JournalRecord] = field(default_factory=dict)


def claim_output(
    output: Path, identity: str, weights_sha256: Callable[[], str], force: bool = False,
    note: Callable[[str], None] = lambda _message: None,
) -> PriorRun:
    """Decide what the result file and journal at `output` mean for the run `identity` on the
    weights `weights_sha256()` (called only when a file there claims this identity: hashing
    weights takes a moment). Raises `OutputInUseError` for another run's files unless `force`."""
    journal = journal_path(output)
    if not output.exists() and not journal.exists():
        return PriorRun()
    if force:
        for old, new in set_aside(output, journal):
            note(f"--force: kept {old} aside as {new}")
        return PriorRun()
    weights = functools.cache(weights_sha256)

    result: RunResult | None = None
    if output.exists():
        doc = _read_json(output)
        why = _not_this_run(doc, identity, weights)
        if why is not None:
            raise OutputInUseError(f"{output} {why}; pass --force to keep it aside and start fresh, or choose another output")
        try:
            result = RunResult.model_validate(doc)
        except ValidationError as exc:
            raise OutputInUseError(f"{output} is not a readable qbench result ({one_line(exc.errors()[0]['msg'])}); "
                                   "pass --force to keep it aside and start fresh") from None
        if result.status == "complete":
            # a kill between writing the complete result and discarding the journal leaves the
            # journal behind; the result holds every utterance, so the journal is spent
            journal.unlink(missing_ok=True)
            return PriorRun(complete=result)

    if journal.exists():
        try:
            header, records = read_journal(journal)
        except JournalError as exc:
            raise JournalError(f"{exc}; pass --force to keep it aside and start fresh") from None
        why = _not_this_run({"identity": header.identity, "model": {"sha256": header.model_sha256}}, identity, weights)
        if why is not None:
            raise OutputInUseError(f"{journal} {why}; pass --force to keep it aside and start fresh, or choose another output")
        return PriorRun(records=records)
    # the journal is gone but the result file has this run's utterances: resume from those
    return PriorRun(records={r.id: r for r in _records_of(result)} if result is not None else {})


def _read_json(path: Path) -> dict[str, Any]:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise OutputInUseError(f"{path} is not a qbench result ({one_line(exc)}); "
                               "pass --force to keep it aside and start fresh, or choose another output") from None
    if not isinstance(doc, dict):
        raise OutputInUseError(f"{path} is not a qbench result (JSON {type(doc).__name__}); pass --force to keep it aside")
    return doc


def _not_this_run(doc: dict[str, Any], identity: str, weights: Callable[[], str]) -> str | None:
    """Why the file `doc` was read from belongs to another run, or None when it is this run's."""
    theirs = doc.get("identity")
    if not isinstance(theirs, str):
        return "holds a result without a run identity (an older qbench's, or not a qbench result)"
    if theirs != identity:
        return f"holds a different run's result (identity {theirs[:12]}…, this run's is {identity[:12]}…)"
    recorded = (doc.get("model") or {}).get("sha256")
    if recorded != weights():
        return f"holds this run's result on other weights (sha256 {str(recorded)[:12]}…, the weights here are {weights()[:12]}…)"
    return None


def _records_of(result: RunResult) -> list[JournalRecord]:
    """Journal records rebuilt from a result file's utterances (those with an audio digest)."""
    utterances = [u for u in result.utterances if u.audio_sha256 is not None]
    wall = result.metrics.wall_seconds / len(result.utterances) if result.metrics and result.utterances else 0.0
    return [JournalRecord(id=u.id, audio_sha256=u.audio_sha256, duration=u.duration, hypothesis=u.hypothesis,
                          wall_seconds=wall) for u in utterances]


def set_aside(output: Path, journal: Path) -> list[tuple[Path, Path]]:
    """Rename the result file and journal to `<stem>.<UTC time>.json(.journal)`; returns (old, new) pairs."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    for n in range(1, 1000):
        kept = output.with_name(f"{output.stem}.{stamp}{'' if n == 1 else f'-{n}'}{output.suffix}")
        if not kept.exists() and not journal_path(kept).exists():
            break
    moved = []
    for old, new in ((output, kept), (journal, journal_path(kept))):
        if old.exists():
            os.replace(old, new)
            moved.append((old, new))
    return moved
