"""`qbench validate`: every committed entry is well formed and agrees with its own evidence.

Checks, per entry file: the JSON schema; a registered model and a standard subset; the stable
file name; the utterance count and ids digest; the hypotheses digest recomputed from the
hypotheses; WER/CER recomputed from the per-utterance error counts; and, where the LibriSpeech
references are on this machine, the per-utterance error counts recomputed from them. Across
entries: no two for the same model, subset, quantizer config and utterances.
"""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import ValidationError

from qbench.checkpoints.registry import list_models
from qbench.data.librispeech import STANDARD_SUBSETS, list_utterances, utterance_digest
from qbench.data.scoring import char_errors, normalize, word_errors
from qbench.leaderboard.entry import LeaderboardEntry, entry_path, subset_score
from qbench.results import hypotheses_digest

SCHEMA_FILE = "entry.schema.json"
_TOLERANCE = 1e-9


def entry_files(root: Path) -> list[Path]:
    """Entry files: `<root>/<model>/<subset>/*.json`."""
    return sorted(p for p in root.glob("*/*/*.json"))


def _schema_error(path: Path, exc: ValidationError) -> str:
    first = exc.errors()[0]
    where = ".".join(str(x) for x in first["loc"]) or "entry"
    return f"{path}: schema: {where}: {first['msg']}"


def check_entry(path: Path, root: Path, data_dir: Path | None = None) -> tuple[LeaderboardEntry | None, list[str]]:
    """Problems of one entry file (empty when it is valid), and the parsed entry if it parsed."""
    try:
        entry = LeaderboardEntry.model_validate_json(path.read_text())
    except ValidationError as exc:
        return None, [_schema_error(path, exc)]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return None, [f"{path}: unreadable: {exc}"]
    problems = []
    if entry.model.name not in list_models():
        problems.append(f"{path}: unknown model {entry.model.name!r}")
    if entry.dataset.subset not in STANDARD_SUBSETS:
        problems.append(f"{path}: unknown subset {entry.dataset.subset!r}")
    expected = entry_path(root, entry)
    if path.resolve() != expected.resolve():
        problems.append(f"{path}: should be named {expected.relative_to(root)} (model/subset/quantizer-config)")
    ids = [u.id for u in entry.utterances]
    if len(ids) != entry.dataset.utterance_count or len(set(ids)) != len(ids):
        problems.append(f"{path}: {len(ids)} utterances listed, {len(set(ids))} distinct, dataset says {entry.dataset.utterance_count}")
    if utterance_digest(ids) != entry.dataset.utterance_ids_sha256:
        problems.append(f"{path}: utterance ids digest does not match the listed utterances")
    if entry.calibration is not None:
        cal = entry.calibration
        if utterance_digest(cal.utterance_ids) != cal.utterance_ids_sha256 or len(cal.utterance_ids) != cal.utterance_count:
            problems.append(f"{path}: calibration ids digest or count does not match the listed calibration utterances")
        if set(cal.utterance_ids) & set(ids):
            problems.append(f"{path}: calibration utterances overlap the scored ones")
    if hypotheses_digest((u.id, u.hypothesis) for u in entry.utterances) != entry.hypotheses_sha256:
        problems.append(f"{path}: hypotheses digest does not match the hypotheses")
    score = subset_score(entry.utterances)
    claimed = entry.subsets.get(entry.dataset.subset)
    if claimed is None or claimed != score:
        problems.append(f"{path}: subsets[{entry.dataset.subset!r}] does not match the per-utterance counts")
    for field, value in (("wer", score.wer), ("cer", score.cer)):
        if abs(getattr(entry, field) - value) > _TOLERANCE:
            problems.append(f"{path}: {field.upper()} {getattr(entry, field):.6f} does not match the per-utterance counts ({value:.6f})")
    if data_dir is not None and not problems:
        problems += _check_against_references(path, entry, data_dir)
    return entry, problems


def _check_against_references(path: Path, entry: LeaderboardEntry, data_dir: Path) -> list[str]:
    try:
        references = {u.id: u.transcript for u in list_utterances(data_dir, entry.dataset.subset)}
    except FileNotFoundError:
        return []  # references not on this machine: the self-consistency checks stand alone
    problems = []
    for u in entry.utterances:
        if u.id not in references:
            continue
        ref = normalize(references[u.id])
        w, c = word_errors(ref, u.hypothesis), char_errors(ref, u.hypothesis)
        if (w.errors, w.reference_length, c.errors, c.reference_length) != (u.word_errors, u.words, u.char_errors, u.chars):
            problems.append(f"{path}: utterance {u.id}: error counts do not match its reference and hypothesis")
            break
    return problems


def validate_leaderboards(root: Path, data_dir: Path | None = None) -> tuple[int, list[str]]:
    """(number of entries checked, problems); no problems means every entry is valid."""
    problems: list[str] = []
    seen: dict[tuple, Path] = {}
    utterance_sets: dict[tuple[str, str], tuple[str, Path]] = {}
    files = entry_files(root)
    for path in files:
        entry, found = check_entry(path, root, data_dir)
        problems += found
        if entry is None:
            continue
        key = (entry.model.name, entry.dataset.subset, entry.label, entry.dataset.utterance_ids_sha256)
        if key in seen:
            problems.append(f"{path}: duplicate of {seen[key]}")
        seen[key] = path
        # a table compares entries only if they scored the same utterances
        table = (entry.model.name, entry.dataset.subset)
        digest, other = utterance_sets.setdefault(table, (entry.dataset.utterance_ids_sha256, path))
        if digest != entry.dataset.utterance_ids_sha256:
            problems.append(f"{path}: scored other utterances than {other} ({entry.dataset.utterance_count} utterances); "
                            "entries of one model and subset must share the utterance set")
    schema = root / SCHEMA_FILE
    if schema.is_file() and json.loads(schema.read_text()) != LeaderboardEntry.model_json_schema():
        problems.append(f"{schema}: out of date; run `qbench leaderboard` to export it again")
    return len(files), problems
