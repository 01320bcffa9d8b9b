"""Leaderboard entries: derivation from a run, validation that catches edits, the rendered page."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from qbench.data.librispeech import utterance_digest
from qbench.data.scoring import char_errors, normalize, word_errors
from qbench.embedded.compute import ComputeReport, KindCount
from qbench.evaluate import summarize
from qbench.leaderboard.entry import entry_from_result, entry_path, read_entry, write_entry
from qbench.leaderboard.page import load_entries, pareto_front, render_leaderboard, render_markdown
from qbench.leaderboard.validate import validate_leaderboards
from qbench.results import DatasetRef, MachineInfo, ModelRef, RunResult, hypotheses_digest

REPO_LEADERBOARDS = Path(__file__).resolve().parents[1] / "leaderboards"
#: whisper-tiny.en's card: validate checks an entry's parameter count against it
TINY_EN_PARAMETERS = 37_184_256


def fake_compute(linear_macs: int = 1_000_000, attention_macs: int = 200_000, weight_bits: int = 16) -> dict:
    """A compute report whose totals are the sums of their parts, as the counting store writes them."""
    return ComputeReport(
        linear={"mlp": KindCount(macs=linear_macs, bit_ops=linear_macs * weight_bits * 32)},
        attention_macs={"encoder_self": attention_macs}, total_macs=linear_macs + attention_macs,
        total_bit_ops=linear_macs * weight_bits * 32 + attention_macs * 32 * 32, encoder_windows=3, decode_steps=30,
        decoded_token_rows=30, wall_seconds=0.5, macs_per_second=(linear_macs + attention_macs) / 0.5,
    ).model_dump(mode="json")


def fake_device(name: str = "pi-zero-2w", total_ram_bytes: int = 100 * 2**20) -> dict:
    """The `device` record of a result that fitted `name` (the fields an entry takes)."""
    return {"profile": {"name": name}, "fits": True, "batch_size": 1, "breakdown": {"total_ram_bytes": total_ram_bytes},
            "measured_peak_bytes": 50 * 2**20, "compute": fake_compute()}


def fake_result(hyps: dict[str, str], refs: dict[str, str], quantization: dict | None = None,
                model_bytes: int | None = None, device: dict | None = None) -> RunResult:
    from qbench.results import UtteranceResult

    utts = []
    for uid in sorted(refs):
        r, h = normalize(refs[uid]), normalize(hyps[uid])
        w, c = word_errors(r, h), char_errors(r, h)
        utts.append(UtteranceResult(id=uid, duration=2.0, reference=refs[uid], hypothesis=hyps[uid], reference_normalized=r,
                                    hypothesis_normalized=h, word_errors=w.errors, words=w.reference_length,
                                    char_errors=c.errors, chars=c.reference_length))
    result = RunResult(
        model=ModelRef(name="whisper-tiny.en", architecture="whisper", format="ctranslate2", path="/x", sha256="ab" * 32,
                       parameters=TINY_EN_PARAMETERS),
        dataset=DatasetRef(subset="test-clean", data_dir="/d", limit=len(refs), utterance_count=len(refs),
                           utterance_ids_sha256=utterance_digest(refs), partial_subset=True),
        quantization=quantization, device=device, machine=MachineInfo.current(), utterances=utts, status="complete",
    )
    # float16 weights: 2 bytes a parameter (what the committed float entry of tiny.en has, near enough)
    result.metrics = summarize(utts, wall_seconds=1.0, model_bytes=model_bytes or 2 * TINY_EN_PARAMETERS)
    result.hypotheses_sha256 = hypotheses_digest((u.id, u.hypothesis_normalized) for u in utts)
    return result


REFS = {"1-2-0000": "THE CAT SAT", "1-2-0001": "ON THE MAT", "1-2-0002": "A DOG BARKED LOUDLY"}
HYPS = {"1-2-0000": "The cat sat.", "1-2-0001": "On a mat.", "1-2-0002": "A dog barked loudly!"}
RTN4 = {"quantizer": "rtn", "quantizer_version": "0.1.0", "distribution": "qbench-rtn", "distribution_version": "0.1.0",
        "config": {"bits": 4, "group_size": 128, "symmetric": True}, "policy": {"quantize_embeddings": False},
        "mean_bits_per_weight": 4.13, "quantized_fraction": 0.4, "scale_dtype": "float16"}
#: packed 4.13-bit weights for 40 % of the parameters, float16 for the rest
RTN4_BYTES = int(4.13 * 0.4 * TINY_EN_PARAMETERS / 8 + 2 * 0.6 * TINY_EN_PARAMETERS)
RTN4_FILE = "rtn-bits4-group_size128-symmetrictrue.json"


@pytest.fixture
def board(tmp_path: Path) -> Path:
    """Two consistent entries: the float baseline without a device, RTN 4-bit on pi-zero-2w."""
    root = tmp_path / "leaderboards"
    write_entry(root, entry_from_result(fake_result(HYPS, REFS), ["jetson-nano-4gb"]))
    hyps = dict(HYPS, **{"1-2-0002": "A dog parked loudly"})
    rtn = fake_result(hyps, REFS, RTN4, model_bytes=RTN4_BYTES, device=fake_device())
    write_entry(root, entry_from_result(rtn, ["esp32-s3", "jetson-nano-4gb", "pi-zero-2w"]))
    return root


def test_entries_have_stable_names_and_recomputed_scores(board):
    fp, rtn = sorted(board.glob("*/*/*.json"))
    assert fp.relative_to(board).as_posix() == "whisper-tiny.en/test-clean/fp.json"
    assert rtn.name == RTN4_FILE
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
        (lambda d: d.__setitem__("wer", 0.0001), "wer: WER 0.000100 does not match"),
        (lambda d: d["utterances"][0].__setitem__("hypothesis", "the cat sat down"), "hypotheses digest does not match"),
        (lambda d: d["utterances"][2].__setitem__("word_errors", 0), "does not match the per-utterance counts"),
        (lambda d: d.pop("model_bytes"), "schema: model_bytes: Field required"),
        (lambda d: d.__setitem__("surprise", 1), "schema: surprise: Extra inputs are not permitted"),
        (lambda d: d["dataset"].__setitem__("utterance_ids_sha256", "0" * 64), "utterance ids digest does not match"),
        (lambda d: d["model"].__setitem__("name", "whisper-huge"), "unknown model 'whisper-huge'"),
    ],
)
def test_validate_catches_edited_entries(board, change, message):
    path = board / "whisper-tiny.en" / "test-clean" / RTN4_FILE
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
    assert "| 4 bits | 1 | rtn (qbench-rtn 0.1.0) | bits=4, group\\_size=128, symmetric=true |" in page
    assert "esp32-s3, jetson-nano-4gb, pi-zero-2w" in page
    # the speed is the submitter's, labelled with the machine it was measured on
    assert "RTFx (submitter's machine)" in page and "| 6.0 (M1) |" in page
    assert f"- M1: {MachineInfo.current().processor}".replace("_", "\\_") in page
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
    and the comparison `verify` makes notices hypotheses that are not what the code produces."""
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

    # the comparison verify makes, against the run's own result (a rerun gives the same)
    from qbench.leaderboard.verify import compare_rerun

    result = RunResult.model_validate_json((tmp_path / "r.json").read_text())
    assert compare_rerun(entry, result) == []
    # an entry from before the compute report split operations is checked on what it holds
    old = json.loads(path.read_text())
    assert old["compute"].pop("operations")["fp32_mac"] > 0 and old["compute"].pop("arithmetic_energy_pj") > 0
    older = tmp_path / "older.json"
    older.write_text(json.dumps(old))
    assert compare_rerun(read_entry(older), result) == []
    old["compute"]["total_macs"] += 1
    older.write_text(json.dumps(old))
    assert any(p.startswith("compute.total_macs") for p in compare_rerun(read_entry(older), result))
    entry.utterances[0].hypothesis += " extra"
    entry.hypotheses_sha256 = hypotheses_digest((u.id, u.hypothesis) for u in entry.utterances)
    assert "hypotheses differ from the entry's on the same qbench version" in compare_rerun(entry, result)


def test_a_new_entry_can_take_the_utterances_of_a_committed_one(board, tmp_path):
    from qbench.cli import CliError, read_ids

    gptq = dict(RTN4, quantizer="gptq", config={"bits": 4, "percdamp": 0.01})
    result = fake_result(HYPS, REFS, gptq, model_bytes=RTN4_BYTES)
    result.calibration = {"subset": "dev-clean", "utterance_count": 2, "utterance_ids_sha256": utterance_digest(["9-9-0000", "9-9-0001"]),
                          "utterance_ids": ["9-9-0000", "9-9-0001"]}
    path = write_entry(board, entry_from_result(result, ["jetson-nano-4gb"]))
    assert read_ids(str(path), "scored") == sorted(REFS)
    assert read_ids(str(path), "calibration") == ["9-9-0000", "9-9-0001"]
    with pytest.raises(CliError, match="no calibration set"):
        read_ids(str(board / "whisper-tiny.en" / "test-clean" / "fp.json"), "calibration")
    ids = tmp_path / "ids.txt"
    ids.write_text("a\n\n b \n")
    assert read_ids(str(ids), "scored") == ["a", "b"]


def test_committed_version_1_entries_still_give_their_ids():
    """Until the committed entries are regenerated, `--utterance-ids` and `RunSpec.from_entry`
    read them (upgraded in memory); `qbench validate` alone asks for the current version."""
    for path in REPO_LEADERBOARDS.glob("*/*/*.json"):
        entry = read_entry(path)
        assert len(entry.utterances) == entry.dataset.utterance_count
        assert entry.submitted_measurements.machine.cpu_count >= 1
