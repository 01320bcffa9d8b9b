"""What the CLI prints stays whole: tables at 80 columns and through a pipe never cut a value,
every run says what it reads and where it runs, and errors and plugin text are printed as
they are (never read as rich markup)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from qbench.cli import _mib, main, show_table


def qbench(*argv: str, columns: int = 80, **env: str) -> subprocess.CompletedProcess:
    """`qbench ARGV` in a fresh interpreter, stdout and stderr piped (not a terminal)."""
    environ = os.environ | {"COLUMNS": str(columns), "TERM": "dumb"} | env
    return subprocess.run([sys.executable, "-m", "qbench.cli", *argv], capture_output=True, text=True, timeout=600,
                          env=environ)


def assert_whole(stdout: str, values: list[str], columns: int = 80) -> None:
    assert "…" not in stdout
    for line in stdout.splitlines():
        assert len(line.rstrip()) <= columns, line
    words = stdout.split()
    for value in values:
        assert value in words, f"{value!r} is not printed whole"


def test_run_tables_are_whole_at_80_columns_when_piped(tiny_en, data_dir, tmp_path):
    out = tmp_path / "r.json"
    run = qbench("run", "--limit", "1", "--data-dir", str(data_dir), "-o", str(out), "--threads", "1")
    assert run.returncode == 0, run.stderr
    r = json.loads(out.read_text())
    m, d = r["metrics"], r["device"]
    b = d["breakdown"]
    total = b["weights_ram_bytes"] + max(b["working_peak_bytes"], d["measured_peak_bytes"])
    assert_whole(run.stdout, [
        f"{100 * m['wer']:.2f}", f"{100 * m['cer']:.2f}", f"{m['audio_seconds']:.1f}", _mib(m["model_bytes"]),
        _mib(m["peak_rss_bytes"]), _mib(b["working_peak_bytes"]), _mib(d["measured_peak_bytes"]), _mib(total),
        f"{d['compute']['total_macs'] / 1e9:.2f}", "yes",
    ])
    # the memory words and the figure the verdict uses are said
    assert "working peak" in " ".join(run.stdout.split()) and "total RAM*" in run.stdout
    assert "* the fit verdict: total RAM = weights in RAM + working peak" in " ".join(run.stdout.split())
    # the run says what it reads and where it runs, in one line
    (setup,) = [line for line in run.stderr.splitlines() if line.startswith("data ")]
    assert str(data_dir / "LibriSpeech" / "test-clean") in setup and "(1 of " in setup
    assert f"weights {tiny_en.path} (sha256 {tiny_en.sha256[:12]})" in setup
    assert "· 1 threads ·" in setup and "device pi-zero-2w (512 MiB RAM)" in setup


def test_fit_table_is_whole_at_80_columns(tiny_en):
    from qbench.embedded.devices import get_device_profiles

    fit = qbench("fit", "--plugin", "rtn", "--set", "bits=4")
    assert fit.returncode == 0, fit.stderr
    profiles = get_device_profiles().values()
    assert_whole(fit.stdout, [p.name for p in profiles] + [_mib(p.storage_bytes) for p in profiles])
    assert "* the fit verdict" in fit.stdout


@pytest.mark.parametrize("argv", [["plugins"], ["plugins", "--show", "gptq"], ["models"]])
def test_listings_are_whole_at_80_columns(argv):
    listing = qbench(*argv)
    assert listing.returncode == 0, listing.stderr
    assert "…" not in listing.stdout
    if argv == ["models"]:
        assert "whisper-tiny.en" in listing.stdout.split()


def test_a_table_too_wide_for_the_console_turns_vertical_and_keeps_every_value(capsys, monkeypatch):
    import qbench.cli as cli
    from rich.console import Console

    monkeypatch.setattr(cli, "out", Console(width=40, force_terminal=False))
    values = ["a-long-device-name", "123456.7", "98765.4", "yes"]
    show_table("title", ["device", "RAM MiB", "storage MiB", "fits"], [values], notes=["a note"])
    text = capsys.readouterr().out
    assert "…" not in text
    for header, value in zip(["device", "RAM MiB", "storage MiB", "fits"], values):
        assert any(line.split() == header.split() + [value] for line in text.splitlines()), (header, value)


def test_an_error_is_printed_verbatim_never_as_markup(monkeypatch, capsys):
    import qbench.checkpoints.download as download
    from qbench.checkpoints.registry import WeightsNotFoundError

    message = "downloading needs huggingface_hub: pip install 'qbench[hub]' (or \"qbench[hub,test]\") [/bold]"

    def fail(*args, **kwargs):
        raise WeightsNotFoundError(message)

    monkeypatch.setattr(download, "download_model", fail)
    assert main(["download-model", "wav2vec2-base-960h", "-q"]) == 2
    assert capsys.readouterr().err.strip() == f"error: {message}"


def test_plugin_text_is_shown_as_written(install_plugin):
    install_plugin("qbench-markup", '''
        from qbench import hookimpl, Quantizer, QuantizedTensor

        class Q(Quantizer):
            name = "markup"
            description = "codes in [bold]brackets[/bold] and a stray [/i] tag"

            def quantize(self, weight, stats):
                raise NotImplementedError

        @hookimpl
        def qbench_register_quantizers():
            return [Q]
    ''', entry_point="markup")
    for argv in (["plugins"], ["plugins", "--show", "markup"]):
        listing = qbench(*argv, columns=200)
        assert listing.returncode == 0, listing.stderr
        assert "codes in [bold]brackets[/bold] and a stray [/i] tag" in listing.stdout


def test_verify_shows_progress_without_scratch_paths(tiny_en, data_dir, tmp_path):
    root = tmp_path / "lb"
    made = qbench("run", "--limit", "1", "--data-dir", str(data_dir), "--submit", "--leaderboards", str(root),
                  "-o", str(tmp_path / "r.json"), "-q")
    assert made.returncode == 0, made.stderr
    (entry,) = root.glob("*/*/*.json")
    verify = qbench("verify", str(entry), "--data-dir", str(data_dir))
    assert verify.returncode == 0, verify.stderr
    assert f"verifying {entry}" in verify.stderr and f"reproduced {entry}" in verify.stderr
    assert "1/1" in verify.stderr  # the transcription bar's count
    assert "rerun.json" not in verify.stderr and "rerun.safetensors" not in verify.stderr
    assert all(not word.startswith(str(Path(os.environ.get("TMPDIR", "/tmp")) / "tmp")) for word in verify.stderr.split())
