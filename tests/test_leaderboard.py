"""Leaderboard entries: derivation from a run, validation that catches edits, the rendered page."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from qbench.leaderboard.entry import entry_from_result, entry_path, read_entry, write_entry
from qbench.leaderboard.page import pareto_front, render_leaderboard, render_markdown, load_entries
from qbench.leaderboard.validate import validate_leaderboards
from qbench.data.librispeech import utterance_digest
from qbench.results import DatasetRef, MachineInfo, ModelRef, RunResult, hypotheses_digest
from qbench.evaluate import summarize
from qbench.data.scoring import char_errors, normalize, word_errors

REPO_LEADERBOARDS = Path(__file__).resolve().parents[1] / "leaderboards"


def fake_result(hyps: dict[str, str], refs: dict[str, str], quantization: dict | None = None) -> RunResult:
    from qbench.results import UtteranceResult

    utts = []
    for uid in sorted(refs):
        r, h = normalize(refs[uid]), normalize(hyps[uid])
        w, c = word_errors(r, h), char_errors(r, h)
        utts.append(UtteranceResult(id=uid, duration=2.0, reference=refs[uid], hypothesis=hyps[uid], reference_normalized=r,
                                    hypothesis_normalized=h, word_errors=w.errors, words=w.reference_length,
                                    char_errors=c.errors, chars=c.reference_length))
    result = RunResult(
        model=ModelRef(name="whisper-tiny.en", architecture="whisper", format="ctranslate2", path="/x", sha256="ab" * 32, parameters=1),
        dataset=DatasetRef(subset="test-clean", data_dir="/d", limit=len(refs), utterance_count=len(refs),
                           utterance_ids_sha256=utterance_digest(refs), partial_subset=True),
        quantization=quantization, machine=MachineInfo.current(), utterances=utts, status="complete",
    )
    result.metrics = summarize(utts, wall_seconds=1.0, model_bytes=1000)
    result.hypotheses_sha256 = hypotheses_digest((u.id, u.hypothesis_normalized) for u in utts)
    return result


REFS = {"1-2-0000": "THE CAT SAT", "1-2-0001": "ON THE MAT", "1-2-0002": "A DOG BARKED LOUDLY"}
HYPS = {"1-2-0000": "The cat sat.", "1-2-0001": "On a mat.", "1-2-0002": "A dog barked loudly!"}
RTN4 = {"quantizer": "rtn", "quantizer_version": "0.1.0", "distribution": "qbench-rtn", "distribution_version": "0.1.0",
        "config": {"bits": 4, "group_size": 128, "symmetric": True}, "policy": {"quantize_embeddings": False},
        "mean_bits_per_weight": 4.13, "quantized_fraction": 0.4, "scale_dtype": "float16"}


@pytest.fixture
def board(tmp_path: Path) -> Path:
    root = tmp_path / "leaderboards"
    write_entry(root, entry_from_result(fake_result(HYPS, REFS), ["jetson-nano-4gb"]))
    hyps = dict(HYPS, **{"1-2-0002": "A dog parked loudly"})
    write_entry(root, entry_from_result(fake_result(hyps, REFS, RTN4), ["esp32-s3", "jetson-nano-4gb"]))
    return root


def test_entries_have_stable_names_and_recomputed_scores(board):
    fp, rtn = sorted(board.glob("*/*/*.json"))
    assert fp.relative_to(board).as_posix() == "whisper-tiny.en/test-clean/fp.json"
    assert rtn.name == "rtn-bits4-group_size128-symmetrictrue.json"
    entry = read_entry(rtn)
    assert entry.wer == pytest.approx(2 / 10)  # "a" for "the", "parked" for "barked": 2 of 10 reference words
    assert entry_path(board, entry) == rtn


def test_validate_accepts_consistent_entries(board):
    n, problems = validate_leaderboards(board)
    assert n == 2 and problems == []


def _edit(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda d: d.__setitem__("wer", 0.0001), "WER 0.000100 does not match"),
        (lambda d: d["utterances"][0].__setitem__("hypothesis", "the cat sat down"), "hypotheses digest does not match"),
        (lambda d: d["utterances"][2].__setitem__("word_errors", 0), "does not match the per-utterance counts"),
        (lambda d: d.pop("model_bytes"), "schema: model_bytes: Field required"),
        (lambda d: d.__setitem__("surprise", 1), "schema: surprise: Extra inputs are not permitted"),
        (lambda d: d["dataset"].__setitem__("utterance_ids_sha256", "0" * 64), "utterance ids digest does not match"),
        (lambda d: d["model"].__setitem__("name", "whisper-huge"), "unknown model 'whisper-huge'"),
    ],
)
def test_validate_catches_edited_entries(board, change, message):
    path = board / "whisper-tiny.en" / "test-clean" / "rtn-bits4-group_size128-symmetrictrue.json"
    _edit(path, change)
    _, problems = validate_leaderboards(board)
    assert any(message in p and str(path) in p for p in problems), problems


def test_validate_catches_a_misnamed_copy(board):
    src = board / "whisper-tiny.en" / "test-clean" / "fp.json"
    shutil.copy(src, src.with_name("fp-copy.json"))
    _, problems = validate_leaderboards(board)
    assert any("fp-copy.json: should be named whisper-tiny.en/test-clean/fp.json" in p for p in problems)


def test_validate_against_references_catches_forged_counts(board, tmp_path):
    data = tmp_path / "data" / "LibriSpeech" / "test-clean" / "1" / "2"
    data.mkdir(parents=True)
    for uid in REFS:
        (data / f"{uid}.flac").write_bytes(b"")
    (data / "1-2.trans.txt").write_text("".join(f"{k} {v}\n" for k, v in REFS.items()))
    assert validate_leaderboards(board, tmp_path / "data")[1] == []
    # forge: an utterance's error counts zeroed and the totals recomputed to match: only the
    # references can tell that "on a mat" is not a perfect transcript of "ON THE MAT"
    from qbench.leaderboard.entry import subset_score

    path = board / "whisper-tiny.en" / "test-clean" / "fp.json"
    entry = read_entry(path)
    entry.utterances[1].word_errors = 0
    entry.utterances[1].char_errors = 0
    entry.subsets["test-clean"] = subset_score(entry.utterances)
    entry.wer, entry.cer = entry.subsets["test-clean"].wer, entry.subsets["test-clean"].cer
    write_entry(board, entry)
    assert validate_leaderboards(board)[1] == []  # self-consistent...
    problems = validate_leaderboards(board, tmp_path / "data")[1]
    assert any("1-2-0001: error counts do not match" in p for p in problems)  # ...but not with the references


def test_page_ranks_within_bit_classes_and_draws_the_chart(board):
    written = render_leaderboard(board)
    page = (board / "README.md").read_text()
    assert "| float | 1 | float baseline |" in page
    assert "| 4 bits | 1 | rtn (qbench-rtn 0.1.0) |" in page
    assert "esp32-s3, jetson-nano-4gb" in page
    svg = board / "whisper-tiny.en__test-clean__pareto.svg"
    assert svg in written and svg.read_text().startswith("<?xml")
    first = svg.read_bytes()
    render_leaderboard(board)
    assert svg.read_bytes() == first  # deterministic: committed charts change only with entries


def test_pareto_front():
    assert pareto_front([(1, 10), (2, 5), (3, 7), (4, 1)]) == [0, 1, 3]


def test_committed_leaderboard_is_valid_and_up_to_date(data_dir):
    entries = load_entries(REPO_LEADERBOARDS)
    n, problems = validate_leaderboards(REPO_LEADERBOARDS, data_dir)
    assert problems == []
    assert n == len(entries)
    assert (REPO_LEADERBOARDS / "README.md").read_text() == render_markdown(entries), "run `qbench leaderboard`"


def test_submit_validate_verify_end_to_end(tiny_en, data_dir, tmp_path, capsys):
    """A small real entry: `run --submit` writes it, `validate` passes, `verify` reproduces it,
    and `verify` notices when the entry's hypotheses were not what the code produces."""
    from qbench.cli import main

    root = tmp_path / "lb"
    argv = ["run", "--limit", "2", "--data-dir", str(data_dir), "--plugin", "rtn", "--set", "bits=4",
            "--submit", "--leaderboards", str(root), "-o", str(tmp_path / "r.json"), "-q"]
    assert main(argv) == 0
    (path,) = root.glob("whisper-tiny.en/test-clean/*.json")
    entry = read_entry(path)
    assert entry.device is not None and entry.device.name == "pi-zero-2w" and entry.device.fits
    assert "pi-zero-2w" in entry.devices_fitted and "stm32h743" not in entry.devices_fitted
    assert entry.quantizer.config == {"bits": 4, "group_size": 128, "symmetric": True}
    assert main(["validate", "--leaderboards", str(root), "--data-dir", str(data_dir)]) == 0
    assert main(["verify", str(path), "--data-dir", str(data_dir)]) == 0
    assert "reproduced" in capsys.readouterr().err

    entry.utterances[0].hypothesis += " extra"
    entry.hypotheses_sha256 = hypotheses_digest((u.id, u.hypothesis) for u in entry.utterances)
    write_entry(root, entry)
    assert main(["verify", str(path), "--data-dir", str(data_dir)]) == 1
    assert "hypotheses differ" in capsys.readouterr().err


def test_a_new_entry_can_take_the_utterances_of_a_committed_one(tmp_path):
    from qbench.cli import CliError, read_ids

    gptq = next(REPO_LEADERBOARDS.glob("whisper-tiny.en/test-clean/gptq-*.json"))
    entry = read_entry(gptq)
    assert read_ids(str(gptq), "scored") == [u.id for u in entry.utterances]
    assert read_ids(str(gptq), "calibration") == entry.calibration.utterance_ids
    with pytest.raises(CliError, match="no calibration set"):
        read_ids(str(REPO_LEADERBOARDS / "whisper-tiny.en" / "test-clean" / "fp.json"), "calibration")
    ids = tmp_path / "ids.txt"
    ids.write_text("a\n\n b \n")
    assert read_ids(str(ids), "scored") == ["a", "b"]
