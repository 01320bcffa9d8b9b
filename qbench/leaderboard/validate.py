"""`qbench validate`: every committed entry is well formed and agrees with its own evidence.

Checks, per entry file, each failure a one-line problem naming the file and the field, and the
other entries checked all the same:

* the file: a regular file inside the leaderboard folder, at most `MAX_ENTRY_BYTES` (checked
  before parsing), JSON without duplicate keys or non-finite numbers at any depth;
* the schema: the current `schema_version`, every object strict (no unknown key at any depth),
  every name a safe name;
* identity: a registered model whose card has the entry's architecture and parameter count,
  standard subsets, the stable file name;
* evidence: utterance count and ids digest, the hypotheses digest recomputed from the
  hypotheses, WER/CER recomputed from the per-utterance error counts and, where the LibriSpeech
  references are on this machine, the per-utterance error counts recomputed from them;
* figures that can be checked without rerunning: bits per weight and quantized fraction
  consistent with model bytes and the parameter count, registered device names, the fit
  verdict within the device's RAM, compute totals equal to the sum of their parts, RTF and
  RTFx consistent with the audio and wall seconds.

Across entries: no two for the same model, subset, quantizer config and utterances, and one
utterance set per table. `qbench verify` reruns an entry for everything else.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from pydantic import ValidationError

from qbench.checkpoints.registry import list_models
from qbench.data.librispeech import STANDARD_SUBSETS, list_utterances, utterance_digest
from qbench.data.scoring import char_errors, normalize, word_errors
from qbench.embedded.devices import DeviceProfile, get_device_profiles
from qbench.leaderboard.entry import (
    EntryError,
    LeaderboardEntry,
    contained_path,
    entry_path,
    read_entry_json,
    schema_problems,
    schema_version_problem,
    subset_score,
)
from qbench.results import hypotheses_digest

SCHEMA_FILE = "entry.schema.json"
_TOLERANCE = 1e-9
#: Packed weights take at least 1.6 bits each (trit5: five ternary codes a byte); integer codes
#: take 2..8 bits (qbench.quant.contract), scales and zero points come on top.
PACKED_BITS_FLOOR = 1.6
#: A parameter left in float is stored at 8 to 32 bits (int8/fp16/bf16/fp32 checkpoints).
FLOAT_BYTES_PER_PARAMETER = (1.0, 4.0)
#: slack on the bytes bounds: a card's parameter count need not be exactly the stored tensors'
_BYTES_SLACK = 0.02


def entry_files(root: Path) -> list[Path]:
    """Entry files: `<root>/<model>/<subset>/*.json`."""
    return sorted(p for p in root.glob("*/*/*.json"))


def _stray_files(root: Path) -> list[Path]:
    """JSON files where no entry lives (and that nothing would check)."""
    entries = set(entry_files(root))
    return sorted(p for p in root.rglob("*.json") if p not in entries and p != root / SCHEMA_FILE)


def check_entry(path: Path, root: Path, data_dir: Path | None = None,
                devices: dict[str, DeviceProfile] | None = None) -> tuple[LeaderboardEntry | None, list[str]]:
    """Problems of one entry file (empty when it is valid), and the parsed entry if it parsed."""
    try:
        contained_path(root, path)
        data = read_entry_json(path)
    except EntryError as exc:
        return None, [str(exc)]
    problem = schema_version_problem(data)
    if problem is not None:
        return None, [f"{path}: {problem}"]
    try:
        entry = LeaderboardEntry.model_validate(data)
    except ValidationError as exc:
        return None, [f"{path}: schema: {p}" for p in schema_problems(exc)]
    devices = get_device_profiles() if devices is None else devices
    found = (_identity_problems(entry) + _evidence_problems(entry) + _size_problems(entry)
             + _device_problems(entry, devices) + _compute_problems(entry) + _measurement_problems(entry))
    expected = entry_path(root, entry)  # inside root: the names are safe
    if path.resolve() != expected.resolve():
        found.append(f"should be named {expected.relative_to(root).as_posix()} (model/subset/quantizer-config)")
    problems = [f"{path}: {p}" for p in found]
    if data_dir is not None and not problems:
        problems += [f"{path}: {p}" for p in _reference_problems(entry, data_dir)]
    return entry, problems


def _identity_problems(entry: LeaderboardEntry) -> list[str]:
    problems = []
    card = list_models().get(entry.model.name)
    if card is None:
        problems.append(f"model.name: unknown model {entry.model.name!r}")
    else:
        if entry.model.architecture != card.architecture:
            problems.append(f"model.architecture: {entry.model.architecture!r}, the registry says {card.architecture!r}")
        if entry.model.parameters != card.parameters:
            problems.append(f"model.parameters: {entry.model.parameters}, the registry says {card.parameters}")
    if entry.dataset.subset not in STANDARD_SUBSETS:
        problems.append(f"dataset.subset: unknown subset {entry.dataset.subset!r}")
    if entry.calibration is not None and entry.calibration.subset not in STANDARD_SUBSETS:
        problems.append(f"calibration.subset: unknown subset {entry.calibration.subset!r}")
    if set(entry.subsets) != {entry.dataset.subset}:
        problems.append(f"subsets: holds {sorted(entry.subsets)}, the entry scored {entry.dataset.subset!r}")
    return problems


def _evidence_problems(entry: LeaderboardEntry) -> list[str]:
    problems = []
    ids = [u.id for u in entry.utterances]
    if len(ids) != entry.dataset.utterance_count or len(set(ids)) != len(ids):
        problems.append(f"utterances: {len(ids)} listed, {len(set(ids))} distinct, dataset says {entry.dataset.utterance_count}")
    if utterance_digest(ids) != entry.dataset.utterance_ids_sha256:
        problems.append("dataset.utterance_ids_sha256: utterance ids digest does not match the listed utterances")
    if entry.calibration is not None:
        cal = entry.calibration
        if utterance_digest(cal.utterance_ids) != cal.utterance_ids_sha256 or len(cal.utterance_ids) != cal.utterance_count:
            problems.append("calibration: calibration ids digest or count does not match the listed calibration utterances")
        if set(cal.utterance_ids) & set(ids):
            problems.append("calibration: calibration utterances overlap the scored ones")
    if hypotheses_digest((u.id, u.hypothesis) for u in entry.utterances) != entry.hypotheses_sha256:
        problems.append("hypotheses_sha256: hypotheses digest does not match the hypotheses")
    score = subset_score(entry.utterances)
    claimed = entry.subsets.get(entry.dataset.subset)
    if claimed is None or claimed != score:
        problems.append(f"subsets[{entry.dataset.subset!r}] does not match the per-utterance counts")
    for field, value in (("wer", score.wer), ("cer", score.cer)):
        claimed_value = getattr(entry, field)
        if not abs(claimed_value - value) <= _TOLERANCE:  # written so that a NaN could never pass
            problems.append(f"{field}: {field.upper()} {claimed_value:.6f} does not match the per-utterance counts ({value:.6f})")
    return problems


def _size_problems(entry: LeaderboardEntry) -> list[str]:
    """Bits per weight, quantized fraction and model bytes must describe one model: the packed
    bytes of the quantized weights plus 1-4 bytes for every other parameter."""
    params, q = entry.model.parameters, entry.quantizer
    bits = q.mean_bits_per_weight if q else 0.0
    fraction = q.quantized_fraction if q else 0.0
    problems = []
    if q is not None:
        if fraction > 0 and bits < PACKED_BITS_FLOOR - _TOLERANCE:
            problems.append(f"quantizer.mean_bits_per_weight: {bits:g} is below the {PACKED_BITS_FLOOR} bits a packed weight "
                            "takes at least")
        if (fraction == 0) != (bits == 0):
            problems.append(f"quantizer: mean_bits_per_weight {bits:g} with quantized_fraction {fraction:g} "
                            "(both are zero when nothing was quantized, else neither)")
    packed = bits * fraction * params / 8
    rest = (1 - fraction) * params
    low, high = (packed + rest * FLOAT_BYTES_PER_PARAMETER[0]) * (1 - _BYTES_SLACK), (packed + rest * FLOAT_BYTES_PER_PARAMETER[1]) * (1 + _BYTES_SLACK)
    if not low <= entry.model_bytes <= high:
        problems.append(f"model_bytes: {entry.model_bytes} is not what {params} parameters take at {bits:g} bits per quantized "
                        f"weight ({100 * fraction:.1f} % quantized) and 8-32 bits per other parameter "
                        f"({low:.0f} to {high:.0f} bytes)")
    return problems


def _device_problems(entry: LeaderboardEntry, devices: dict[str, DeviceProfile]) -> list[str]:
    problems = []
    unknown = [name for name in entry.devices_fitted if name not in devices]
    if unknown:
        problems.append(f"devices_fitted: {', '.join(map(repr, unknown))} not registered device profile(s) (qbench fit lists them)")
    if entry.devices_fitted != sorted(set(entry.devices_fitted)):
        problems.append("devices_fitted: not sorted and distinct, as the harness writes it")
    d = entry.device
    if d is None:
        return problems
    profile = devices.get(d.name)
    if profile is None:
        return problems + [f"device.name: {d.name!r} is not a registered device profile"]
    if not d.fits:
        problems.append("device.fits: false, but an entry is a complete run, which fits its device")
    if d.total_ram_bytes is not None and d.total_ram_bytes > profile.ram_bytes:
        problems.append(f"device.total_ram_bytes: {d.total_ram_bytes} is more than {d.name}'s {profile.ram_bytes} bytes of RAM, "
                        "yet the entry says it fits")
    if d.name not in entry.devices_fitted:
        # the run fitted its device at its batch size, so the model fits it at one utterance
        problems.append(f"devices_fitted: lacks {d.name!r}, the device the run fitted")
    return problems


def _compute_problems(entry: LeaderboardEntry) -> list[str]:
    c = entry.compute
    if c is None:
        return []
    problems = []
    linear_macs = sum(k.macs for k in c.linear.values())
    attention = sum(c.attention_macs.values())
    if c.total_macs != linear_macs + attention:
        problems.append(f"compute.total_macs: {c.total_macs}, but linear and attention MACs sum to {linear_macs + attention}")
    # attention multiplies two activations: float32 unless the run quantized attention
    bit_ops = sum(k.bit_ops for k in c.linear.values()) + attention * c.attention_bits ** 2
    if c.total_bit_ops != bit_ops:
        problems.append(f"compute.total_bit_ops: {c.total_bit_ops}, but its parts sum to {bit_ops}")
    if not c.ternary_additions <= c.ternary_macs <= linear_macs:
        problems.append("compute: ternary_additions <= ternary_macs <= linear MACs does not hold")
    return problems


def _measurement_problems(entry: LeaderboardEntry) -> list[str]:
    """The submitter's timings cannot be rechecked, but they must agree with each other."""
    s, audio = entry.submitted_measurements, entry.audio_seconds
    problems = []
    if entry.utterances and audio <= 0:
        problems.append("audio_seconds: zero for a non-empty utterance list")
    if s.wall_seconds > 0 and audio > 0:
        for field, value in (("rtfx", audio / s.wall_seconds), ("rtf", s.wall_seconds / audio)):
            if not math.isclose(getattr(s, field), value, rel_tol=1e-6):
                problems.append(f"submitted_measurements.{field}: {getattr(s, field):g} is not what audio_seconds and "
                                f"wall_seconds give ({value:g})")
    if entry.compute is not None and s.compute_wall_seconds and s.macs_per_second is not None:
        value = entry.compute.total_macs / s.compute_wall_seconds
        if not math.isclose(s.macs_per_second, value, rel_tol=1e-6):
            problems.append(f"submitted_measurements.macs_per_second: {s.macs_per_second:g} is not total_macs / "
                            f"compute_wall_seconds ({value:g})")
    return problems


def _reference_problems(entry: LeaderboardEntry, data_dir: Path) -> list[str]:
    try:
        references = {u.id: u.transcript for u in list_utterances(data_dir, entry.dataset.subset)}
    except FileNotFoundError:
        return []  # references not on this machine: the self-consistency checks stand alone
    for u in entry.utterances:
        if u.id not in references:
            continue
        ref = normalize(references[u.id])
        w, c = word_errors(ref, u.hypothesis), char_errors(ref, u.hypothesis)
        if (w.errors, w.reference_length, c.errors, c.reference_length) != (u.word_errors, u.words, u.char_errors, u.chars):
            return [f"utterance {u.id}: error counts do not match its reference and hypothesis"]
    return []


def check_leaderboards(root: Path, data_dir: Path | None = None) -> tuple[int, list[LeaderboardEntry], list[str]]:
    """(entry files checked, the entries that parsed, problems of the entries and across them)."""
    problems: list[str] = [f"{p}: a JSON file where no entry lives (entries are <model>/<subset>/<name>.json)"
                           for p in _stray_files(root)]
    seen: dict[tuple, Path] = {}
    utterance_sets: dict[tuple[str, str], tuple[str, Path]] = {}
    entries: list[LeaderboardEntry] = []
    devices = get_device_profiles()
    files = entry_files(root)
    for path in files:
        entry, found = check_entry(path, root, data_dir, devices)
        problems += found
        if entry is None:
            continue
        entries.append(entry)
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
    return len(files), entries, problems


def validate_leaderboards(root: Path, data_dir: Path | None = None) -> tuple[int, list[str]]:
    """(number of entries checked, problems); no problems means every entry is valid."""
    n, _, problems = check_leaderboards(root, data_dir)
    schema = root / SCHEMA_FILE
    if schema.is_file():
        try:
            current = json.loads(schema.read_text()) == LeaderboardEntry.model_json_schema()
        except (OSError, ValueError):
            current = False
        if not current:
            problems.append(f"{schema}: out of date; run `qbench leaderboard` to export it again")
    return n, problems
