"""Entries a hostile or careless submitter could write: each is refused by `qbench validate` with
one line naming the file and the field, the other entries are still checked, `qbench
leaderboard` writes nothing outside its folder and escapes what it renders, and `qbench verify`
catches the edits that are consistent enough for validate not to see."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import pytest

from qbench.embedded.compute import ComputeReport
from qbench.embedded.devices import get_device_profiles
from qbench.leaderboard import entry as entry_module
from qbench.leaderboard.entry import (
    COMPUTE_TIMING_FIELDS,
    MAX_ENTRY_BYTES,
    EntryCompute,
    EntryMachine,
    EntryPolicy,
    LeaderboardEntry,
    OutsideRootError,
    entry_from_result,
    entry_path,
    read_entry,
    write_entry,
)
from qbench.leaderboard.page import LeaderboardError, render_chart, render_leaderboard, render_markdown
from qbench.leaderboard.validate import validate_leaderboards
from qbench.leaderboard.verify import compare_rerun
from qbench.quant.apply import QuantizationPolicy
from qbench.results import MachineInfo, RunResult
from tests.test_leaderboard import HYPS, REFS, RTN4, RTN4_BYTES, RTN4_FILE, fake_device, fake_result

FP_FILE = "fp.json"


@pytest.fixture
def board(tmp_path: Path) -> Path:
    """Two consistent entries under `tmp_path/leaderboards`: the float baseline without a device
    and RTN 4-bit budgeted for pi-zero-2w (with compute counts and the submitter's machine)."""
    root = tmp_path / "leaderboards"
    write_entry(root, entry_from_result(fake_result(HYPS, REFS), ["jetson-nano-4gb"]))
    rtn = fake_result(HYPS, REFS, RTN4, model_bytes=RTN4_BYTES, device=fake_device())
    write_entry(root, entry_from_result(rtn, ["esp32-s3", "jetson-nano-4gb", "pi-zero-2w"]))
    assert validate_leaderboards(root) == (2, [])
    return root


def _file(root: Path, name: str = RTN4_FILE) -> Path:
    return root / "whisper-tiny.en" / "test-clean" / name


def _edit(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def _problems_of(root: Path, path: Path) -> list[str]:
    _, problems = validate_leaderboards(root)
    return [p for p in problems if p.startswith(f"{path}: ")]


def _files_under(folder: Path) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# -- validate: figures that can be checked without rerunning ------------------------------------


def _set(*keys_and_value):
    *keys, value = keys_and_value

    def change(data):
        for key in keys[:-1]:
            data = data[key]
        data[keys[-1]] = value

    return change


@pytest.mark.parametrize(
    "change, message",
    [
        # sizes and bits per weight must describe one model of the registered parameter count
        (_set("model_bytes", 1000), "model_bytes: 1000 is not what 37184256 parameters take"),
        (_set("model_bytes", -5), "schema: model_bytes: Input should be greater than or equal to 1"),
        (_set("quantizer", "mean_bits_per_weight", 1.0), "quantizer.mean_bits_per_weight: 1 is below the 1.6 bits"),
        (_set("quantizer", "mean_bits_per_weight", 40.0), f"model_bytes: {RTN4_BYTES} is not what 37184256 parameters take at 40 bits"),
        (_set("quantizer", "quantized_fraction", 1.5), "schema: quantizer.quantized_fraction: Input should be less than or equal to 1"),
        (_set("model", "parameters", 1000), "model.parameters: 1000, the registry says 37184256"),
        # devices: registered names only, and the fit verdict within the device's RAM
        (_set("devices_fitted", ["not-a-device", "pi-zero-2w"]), "devices_fitted: 'not-a-device' not registered device profile(s)"),
        (_set("devices_fitted", ["esp32-s3"]), "devices_fitted: lacks 'pi-zero-2w', the device the run fitted"),
        (_set("device", "name", "not-a-device"), "device.name: 'not-a-device' is not a registered device profile"),
        (_set("device", "fits", False), "device.fits: false, but an entry is a complete run"),
        (_set("device", "total_ram_bytes", 2**40), "device.total_ram_bytes: 1099511627776 is more than pi-zero-2w's"),
        # compute totals are the sums of their parts
        (_set("compute", "total_macs", 1), "compute.total_macs: 1, but linear and attention MACs sum to 1200000"),
        (_set("compute", "linear", "mlp", "bit_ops", 7), "compute.total_bit_ops: "),
        # the submitter's timings cannot be rechecked, but must agree with each other
        (_set("submitted_measurements", "rtfx", 600.0), "submitted_measurements.rtfx: 600 is not what audio_seconds and wall_seconds give (6)"),
        (_set("submitted_measurements", "rtf", 0.001), "submitted_measurements.rtf: 0.001 is not what"),
    ],
)
def test_validate_refuses_edited_figures(board, change, message):
    path = _file(board)
    _edit(path, change)
    problems = _problems_of(board, path)
    assert any(message in p for p in problems), problems
    assert all("\n" not in p for p in problems)


@pytest.mark.parametrize(
    "text_change, message",
    [
        # NaN passed before: abs(nan - x) > tol is false
        (lambda t: t.replace('"wer": 0.1,', '"wer": NaN,', 1), "wer: non-finite number"),
        (lambda t: t.replace('"cer": 0.075,', '"cer": -Infinity,', 1), "cer: non-finite number"),
        (lambda t: t.replace('"bits": 4', '"bits": NaN', 1), "quantizer.config.bits: non-finite number"),
        (lambda t: t.replace('"wall_seconds": 1.0', '"wall_seconds": 1e999', 1), "submitted_measurements.wall_seconds: non-finite"),
        (lambda t: t.replace('"utterances": [', '"utterances": [], "utterances": [', 1), "not JSON: duplicate key 'utterances'"),
        (lambda t: t.replace('"schema_version": 2', '"schema_version": 999', 1),
         "schema_version: 999 is not an entry schema version this qbench knows (2)"),
        (lambda t: t.replace('"schema_version": 2', '"schema_version": "2"', 1), "schema_version: '2' is not an entry schema version"),
        (lambda t: t.replace('"schema_version": 2', '"schema_version": 1', 1),
         "schema_version: 1 is an older entry schema (this qbench writes 2); regenerate the entry with `qbench run --submit`"),
    ],
)
def test_validate_refuses_non_finite_numbers_duplicate_keys_and_unknown_versions(board, text_change, message):
    path = _file(board)
    text = json.dumps(json.loads(path.read_text()))  # one space after each colon, as the replacements expect
    edited = text_change(text)
    assert edited != text
    path.write_text(edited)
    assert any(message in p for p in _problems_of(board, path)), _problems_of(board, path)


@pytest.mark.parametrize(
    "change, message",
    [
        (_set("rtfx", 6.0), "schema: rtfx: Extra inputs are not permitted (unknown key)"),  # the v1 place of a timing
        (_set("submitted_measurements", "machine", "surprise", 1),
         "schema: submitted_measurements.machine.surprise: Extra inputs are not permitted (unknown key)"),
        (_set("compute", "surprise", 1), "schema: compute.surprise: Extra inputs are not permitted (unknown key)"),
        (_set("compute", "linear", "mlp", "surprise", 1), "schema: compute.linear.mlp.surprise: Extra inputs are not permitted"),
        (_set("compute", "wall_seconds", 1.0), "schema: compute.wall_seconds: Extra inputs are not permitted"),
        (_set("quantizer", "policy", "surprise", True), "schema: quantizer.policy: surprise: Extra inputs are not permitted"),
        (_set("device", "measured_peak_bytes", 1), "schema: device.measured_peak_bytes: Extra inputs are not permitted"),
        (_set("model_bytes", "50000000"), "schema: model_bytes: Input should be a valid integer"),
        (_set("hypotheses_sha256", "x"), "schema: hypotheses_sha256: String should match pattern"),
        (_set("submitted_measurements", "machine", "platform", "Linux\n| injected |"),
         "schema: submitted_measurements.machine.platform: String should match pattern"),
    ],
)
def test_validate_refuses_unknown_keys_at_any_depth_and_wrong_types(board, change, message):
    path = _file(board)
    _edit(path, change)
    assert any(message in p for p in _problems_of(board, path)), _problems_of(board, path)


@pytest.mark.parametrize(
    "change, field",
    [
        (_set("model", "name", "../../x"), "model.name: '../../x' is not a safe name"),
        (_set("model", "name", "/etc/x"), "model.name: '/etc/x' is not a safe name"),
        (_set("dataset", "subset", ".."), "dataset.subset: '..' is not a safe name"),
        (_set("quantizer", "name", "rtn|<b>[x](javascript:y)`"), "quantizer.name: 'rtn|<b>[x](javascript:y)`' is not a safe name"),
        (_set("quantizer", "distribution", "qbench-rtn --index-url http://evil"), "quantizer.distribution: "),
        (_set("quantizer", "config", {"bits": 4, "a/b": 1}), "quantizer.config.a/b.[key]: 'a/b' is not a safe name"),
        (_set("devices_fitted", ["pi-zero-2w", "../x"]), "devices_fitted.1: '../x' is not a safe name"),
        (_set("device", "name", "<script>"), "device.name: '<script>' is not a safe name"),
    ],
)
def test_validate_refuses_unsafe_names_and_checks_the_other_entries(board, change, field):
    path, other = _file(board), _file(board, FP_FILE)
    _edit(path, change)
    _edit(other, _set("wer", 0.5))  # a second bad entry: it must still be checked and reported
    n, problems = validate_leaderboards(board)
    assert n == 2
    assert any(p.startswith(f"{path}: schema: {field}") for p in problems), problems
    assert any(p.startswith(f"{other}: wer: WER 0.500000 does not match") for p in problems), problems


def test_a_padded_file_is_refused_before_it_is_parsed(board, monkeypatch):
    path = _file(board)
    data = json.loads(path.read_text())
    path.write_text(json.dumps(data)[:-1] + ', "padding": "' + "x" * (50 * 2**20) + '"}')
    parsed_sizes = []
    loads = json.loads
    monkeypatch.setattr(entry_module.json, "loads", lambda text, **k: parsed_sizes.append(len(text)) or loads(text, **k))
    problems = _problems_of(board, path)
    assert problems == [f"{path}: larger than the {MAX_ENTRY_BYTES // 2**20} MiB an entry may be; not read"]
    assert parsed_sizes and max(parsed_sizes) < MAX_ENTRY_BYTES  # the other entry was parsed, the padded one never


def test_links_and_stray_files_are_refused(board, tmp_path):
    outside = tmp_path / "elsewhere.json"
    outside.write_text(_file(board).read_text())
    link_out, link_in = _file(board, "link-out.json"), _file(board, "link-in.json")
    link_out.symlink_to(outside)
    link_in.symlink_to(_file(board))
    stray = board / "whisper-tiny.en" / "notes.json"
    stray.write_text("{}")
    _, problems = validate_leaderboards(board)
    assert any(p.startswith(f"{link_out} is outside the leaderboard folder") for p in problems), problems
    assert f"{link_in}: not a regular file (entries are plain JSON files, not links)" in problems
    assert f"{stray}: a JSON file where no entry lives (entries are <model>/<subset>/<name>.json)" in problems


def test_validate_prints_its_verdict_on_stdout_one_problem_a_line(board, capsys):
    from qbench.cli import main

    assert main(["validate", "--leaderboards", str(board), "--no-references"]) == 0
    assert capsys.readouterr().out.strip() == "2 entries checked: all valid"
    _edit(_file(board), _set("model", "name", "../../x"))
    _edit(_file(board, FP_FILE), _set("wer", float("nan")))
    assert main(["validate", "--leaderboards", str(board), "--no-references"]) == 1
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1] == "2 entries checked: 2 problem(s)"
    assert sorted(lines[:-1]) == sorted([f"invalid: {_file(board, FP_FILE)}: wer: non-finite number (NaN or infinity); "
                                         "an entry's figures are finite",
                                         f"invalid: {_file(board)}: schema: model.name: '../../x' is not a safe name: a letter "
                                         "or digit, then up to 63 of letters, digits and . _ + - (no path separators, no markup)"])


# -- qbench leaderboard: nothing outside its folder, everything escaped --------------------------


def test_leaderboard_with_a_bad_entry_writes_nothing_anywhere(board, tmp_path, capsys):
    from qbench.cli import main

    _edit(_file(board), _set("model", "name", "../../x"))
    before = _files_under(tmp_path.parent)
    assert main(["leaderboard", "--leaderboards", str(board)]) == 2
    err = capsys.readouterr().err
    assert "'../../x' is not a safe name" in err and "the page is rendered only from valid entries" in err
    assert _files_under(tmp_path.parent) == before  # not the chart beside the folder, nor the page inside it


def test_no_output_path_may_leave_the_folder(board, tmp_path):
    outside = tmp_path / "outside.md"
    outside.write_text("keep")
    (board / "README.md").symlink_to(outside)
    with pytest.raises(LeaderboardError, match="outside the leaderboard folder"):
        render_leaderboard(board)
    assert outside.read_text() == "keep"
    # a name that escaped the schema (built without validation) cannot place an entry outside
    entry = read_entry(_file(board))
    forged = entry.model_copy(update={"model": entry.model.model_copy(update={"name": "../../x"})})
    with pytest.raises(OutsideRootError):
        entry_path(board, forged)


def _forged_entry(board: Path, name: str, machine_platform: str) -> LeaderboardEntry:
    """An entry with markup in its names, built without validation: what the page must survive
    even if a name rule were ever loosened."""
    entry = read_entry(_file(board))
    q = entry.quantizer.model_copy(update={"name": name, "config": {"mode": "<img src=x onerror=alert(1)>"}})
    machine = entry.submitted_measurements.machine.model_copy(update={"platform": machine_platform})
    s = entry.submitted_measurements.model_copy(update={"machine": machine})
    return entry.model_copy(update={"quantizer": q, "submitted_measurements": s})


def test_the_page_escapes_markdown_and_html(board):
    entry = _forged_entry(board, "rtn|x](http://evil)`<b>*_$", "Linux | two\nlines <i>")
    page = render_markdown([entry])
    row = next(line for line in page.splitlines() if line.startswith("| 4 bits |"))
    assert row.replace("\\|", "").count("|") == 13  # 12 cells: no pipe of a name splits one
    assert "<b>" not in page and "<img" not in page and "<i>" not in page
    assert r"rtn\|x\](http://evil)\`&lt;b&gt;\*\_\$" in row
    assert "Linux \\| two lines &lt;i&gt;" in page


def test_the_chart_is_well_formed_svg_with_the_literal_text(board, tmp_path):
    path = tmp_path / "chart.svg"
    render_chart([_forged_entry(board, "a<b>&$x$", "p")], path)
    texts = "".join(t.text or "" for t in ElementTree.parse(path).iter() if t.tag.endswith("text"))
    assert "a<b>&$x$ 4.1b" in texts  # XML-escaped by the writer, and no mathtext


# -- the entry models mirror what results carry ---------------------------------------------------


def test_entry_models_mirror_the_result_models_field_for_field():
    """When ComputeReport, MachineInfo or QuantizationPolicy gain a field, the entry model must
    gain it too (entry_from_result refuses the run until then)."""
    assert set(EntryCompute.model_fields) == set(ComputeReport.model_fields) - set(COMPUTE_TIMING_FIELDS)
    assert set(EntryMachine.model_fields) == set(MachineInfo.model_fields)
    assert set(EntryPolicy.model_fields) == set(QuantizationPolicy.model_fields)


def test_a_compute_field_the_entry_does_not_know_is_named():
    device = fake_device()
    device["compute"]["joules"] = 3
    with pytest.raises(entry_module.EntryError, match="compute report has field.s. the entry schema does not know: joules"):
        entry_from_result(fake_result(HYPS, REFS, RTN4, model_bytes=RTN4_BYTES, device=device), ["pi-zero-2w"])


def test_registered_devices_include_the_ones_the_fixtures_name():
    assert {"pi-zero-2w", "esp32-s3", "jetson-nano-4gb"} <= set(get_device_profiles())


# -- verify: what only a rerun can see ------------------------------------------------------------


@pytest.fixture(scope="module")
def small_run(tiny_en, data_dir, tmp_path_factory) -> tuple[Path, Path, RunResult]:
    """One real 2-utterance RTN 4-bit run on pi-zero-2w, submitted: (leaderboard, entry, result)."""
    from qbench.cli import main

    tmp = tmp_path_factory.mktemp("hostile")
    root = tmp / "lb"
    argv = ["run", "--limit", "2", "--data-dir", str(data_dir), "--plugin", "rtn", "--set", "bits=4",
            "--submit", "--leaderboards", str(root), "-o", str(tmp / "r.json"), "-q"]
    assert main(argv) == 0
    (path,) = root.glob("whisper-tiny.en/test-clean/*.json")
    return root, path, RunResult.model_validate_json((tmp / "r.json").read_text())


def _consistent_edit(entry: LeaderboardEntry, field: str) -> LeaderboardEntry:
    """`entry` with one recomputable figure changed, everything validate can see kept consistent."""
    e = entry.model_copy(deep=True)
    if field == "model_bytes":
        e.model_bytes -= 4096
    elif field == "devices_fitted":
        e.devices_fitted = sorted(set(e.devices_fitted) - {"jetson-nano-4gb"})
    elif field == "compute":
        mlp = e.compute.linear["mlp"]
        mlp.macs, mlp.bit_ops = mlp.macs - 1000, mlp.bit_ops - 1000 * 4 * 32
        e.compute.total_macs -= 1000
        e.compute.total_bit_ops -= 1000 * 4 * 32
        s = e.submitted_measurements
        s.macs_per_second = e.compute.total_macs / s.compute_wall_seconds
    elif field == "mean_bits_per_weight":
        e.quantizer.mean_bits_per_weight -= 0.01
    elif field == "total_ram_bytes":
        e.device.total_ram_bytes -= 2**20
    elif field == "artifact_sha256":
        e.quantizer.artifact_sha256 = "0" * 64
    return e


@pytest.mark.parametrize("field, message", [
    ("model_bytes", "model_bytes: "),
    ("devices_fitted", "devices_fitted: "),
    ("compute", "compute.linear.mlp.macs: "),
    ("mean_bits_per_weight", "quantizer.mean_bits_per_weight: "),
    ("total_ram_bytes", "device.total_ram_bytes: "),
    ("artifact_sha256", "quantizer.artifact_sha256: "),
])
def test_verify_compares_every_recomputable_figure(small_run, field, message):
    root, path, result = small_run
    entry = read_entry(path)
    assert compare_rerun(entry, result) == []
    assert "jetson-nano-4gb" in entry.devices_fitted and entry.compute is not None and entry.device.total_ram_bytes
    if field == "artifact_sha256" and result.quantization.get("artifact_sha256") is None:
        pytest.skip("this harness writes no quantized artifact digest yet")
    edited = _consistent_edit(entry, field)
    problems = compare_rerun(edited, result)
    assert any(p.startswith(message) and "on rerun, the entry says" in p for p in problems), problems
    # the submitter's timings are theirs: never compared
    s = entry.submitted_measurements
    slower = entry.model_copy(update={"submitted_measurements": s.model_copy(update={
        "wall_seconds": s.wall_seconds * 2, "rtf": s.rtf * 2, "rtfx": s.rtfx / 2, "peak_rss_bytes": 1})})
    assert compare_rerun(slower, result) == []


def test_an_edit_validate_cannot_see_is_not_reproduced_by_verify(small_run, data_dir, capsys):
    """model_bytes, devices_fitted and a compute count edited consistently: validate passes, the
    rerun does not reproduce them."""
    from qbench.cli import main

    root, path, _ = small_run
    original = path.read_text()
    try:
        entry = read_entry(path)
        for field in ("model_bytes", "devices_fitted", "compute"):
            entry = _consistent_edit(entry, field)
        write_entry(root, entry)
        assert main(["validate", "--leaderboards", str(root), "--data-dir", str(data_dir)]) == 0
        capsys.readouterr()
        assert main(["verify", str(path), "--data-dir", str(data_dir)]) == 1
        err = capsys.readouterr().err
        for field in ("model_bytes", "devices_fitted", "compute.linear.mlp.macs", "compute.total_macs"):
            assert f"not reproduced {path}: {field}: " in err, err
    finally:
        path.write_text(original)


def test_a_run_with_an_unsafe_name_cannot_become_an_entry():
    quantization = dict(RTN4, quantizer="my plugin")
    with pytest.raises(entry_module.EntryError, match="cannot become an entry: EntryQuantizer: name: 'my plugin' is not a safe name"):
        entry_from_result(fake_result(HYPS, REFS, quantization, model_bytes=RTN4_BYTES), ["jetson-nano-4gb"])
