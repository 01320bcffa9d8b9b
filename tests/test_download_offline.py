"""`qbench download-model` without network: one line that says which files are missing, how
big they are, where the loader looks for them and that `--weights DIR` takes such a folder."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

from qbench.checkpoints.download import download_model, hub_cache_folder
from qbench.checkpoints.registry import get_card
from qbench.cli import main
from qbench.data.downloading import DownloadError


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed when the block ends: nothing listens there


def test_hub_unreachable_names_files_sizes_place_and_weights_dir(tmp_path):
    pytest.importorskip("huggingface_hub")
    env = os.environ | {"HF_ENDPOINT": f"http://127.0.0.1:{closed_port()}", "HF_HUB_CACHE": str(tmp_path / "hub"),
                        "HF_HUB_DISABLE_TELEMETRY": "1", "COLUMNS": "80"}
    run = subprocess.run([sys.executable, "-m", "qbench.cli", "download-model", "wav2vec2-base-960h", "-q"],
                         capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode == 2
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in run.stderr
    line = lines[0]
    assert line.startswith("error: cannot reach the Hugging Face Hub for facebook/wav2vec2-base-960h@main")
    assert "model.safetensors (360.1 MiB)" in line and "config.json (1.6 KiB)" in line and "vocab.json (291 bytes)" in line
    assert "pytorch_model.bin (360.2 MiB) instead of model.safetensors" in line
    assert str(tmp_path / "hub" / "models--facebook--wav2vec2-base-960h") in line
    assert "--weights DIR" in line
    assert "An error happened while trying to locate" not in line  # not huggingface_hub's raw text


def test_a_connection_error_from_the_hub_call_becomes_the_offline_message(monkeypatch, capsys):
    huggingface_hub = pytest.importorskip("huggingface_hub")

    def offline(**kwargs):
        try:
            raise ConnectionRefusedError(111, "Connection refused")
        except ConnectionRefusedError as exc:
            raise huggingface_hub.errors.LocalEntryNotFoundError("cannot find the snapshot folder") from exc

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    card = get_card("wav2vec2-base-960h")
    with pytest.raises(DownloadError, match=r"\(ConnectionRefusedError: \[Errno 111\] Connection refused\)\. "
                                            r"wav2vec2-base-960h needs model\.safetensors \(360\.1 MiB\)"):
        download_model(card, progress=False)
    assert main(["download-model", "wav2vec2-base-960h", "-q"]) == 2
    err = capsys.readouterr().err
    assert str(hub_cache_folder(card.sources[0])) in err and "`--weights DIR`" in err


def test_a_refusal_is_not_called_offline(monkeypatch):
    huggingface_hub = pytest.importorskip("huggingface_hub")

    def refused(**kwargs):
        raise huggingface_hub.errors.HFValidationError("401 Client Error: Unauthorized")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", refused)
    with pytest.raises(DownloadError, match="cannot download facebook/wav2vec2-base-960h@main: 401") as info:
        download_model(get_card("wav2vec2-base-960h"), progress=False)
    assert "cannot reach" not in str(info.value)


def test_url_source_offline_names_the_file_and_where_it_goes(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("QBENCH_CACHE_DIR", str(tmp_path))
    port = closed_port()
    monkeypatch.setenv("http_proxy", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("https_proxy", f"http://127.0.0.1:{port}")
    assert main(["download-model", "whisper-tiny.en", "--source", "url", "-q"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert f"put it at {tmp_path / 'models' / 'whisper-tiny.en' / 'tiny.en.pt'}" in err
    assert "needs tiny.en.pt" in err and "--weights FILE" in err
