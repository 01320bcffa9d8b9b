"""`qbench download-model`: URL weights over loopback HTTP, Hub weights through a stand-in
snapshot_download, the registry's checksums, and the loader's check of pinned weights."""

from __future__ import annotations

import hashlib
import shutil

import pytest

from qbench.cli import main
from qbench.data.downloading import ChecksumError
from qbench.checkpoints.download import download_model
from qbench.checkpoints.registry import ModelCard, get_card, resolve_weights

DATA = b"not really a checkpoint, but bytes with a known sha256\n" * 1000


def url_card(url: str, data: bytes = DATA, **file_over) -> ModelCard:
    f = {"path": "tiny.en.pt", "sha256": hashlib.sha256(data).hexdigest(), "size": len(data), **file_over}
    return ModelCard(name="test-model", architecture="whisper", parameters=1,
                     sources=[{"kind": "url", "format": "openai-pt", "url": url, "files": [f]}])


def test_url_weights_download_once_then_resolve_offline(tmp_path, server_factory, monkeypatch):
    monkeypatch.setenv("QBENCH_CACHE_DIR", str(tmp_path / "cache"))
    srv = server_factory(DATA, path="/tiny.en.pt")
    card = url_card(srv.url)
    path = download_model(card, progress=False)
    assert path == tmp_path / "cache" / "models" / "test-model" / "tiny.en.pt"
    assert path.read_bytes() == DATA and not path.with_name("tiny.en.pt.part").exists()
    assert download_model(card, progress=False) == path and srv.requests == [None]  # no second transfer
    assert resolve_weights(card) == (path, "openai-pt")


def test_url_download_resumes_and_rejects_a_wrong_file(tmp_path, server_factory, monkeypatch):
    monkeypatch.setenv("QBENCH_CACHE_DIR", str(tmp_path / "cache"))
    srv = server_factory(DATA, path="/tiny.en.pt")
    part = tmp_path / "cache" / "models" / "test-model" / "tiny.en.pt.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(DATA[:1000])
    download_model(url_card(srv.url), progress=False)
    assert srv.requests == ["bytes=1000-"]

    shutil.rmtree(tmp_path / "cache")
    with pytest.raises(ChecksumError, match="tiny.en.pt.part: sha256 .* the registry expects 0{64}"):
        download_model(url_card(srv.url, sha256="0" * 64), progress=False)
    assert not part.exists()  # a wrong file is not kept to be "resumed"


def test_hub_weights_go_through_snapshot_download_and_are_checked(tmp_path, monkeypatch):
    huggingface_hub = pytest.importorskip("huggingface_hub")
    card = get_card("wav2vec2-base-960h")
    files = {f.path: f for f in card.sources[0].files}
    assert files["pytorch_model.bin"].sha256 and files["pytorch_model.bin"].size  # pinned, not left empty
    calls = []

    def fake_snapshot_download(repo_id, revision, allow_patterns):
        calls.append((repo_id, revision, allow_patterns))
        for name in allow_patterns:
            (tmp_path / name).write_bytes(b"{}")
        return str(tmp_path)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    with pytest.raises(ChecksumError, match=r"pytorch_model.bin: 2 bytes, the registry expects 377667514"):
        download_model(card, progress=False)
    assert calls == [("facebook/wav2vec2-base-960h", "main", ["pytorch_model.bin", "config.json", "vocab.json"])]


def test_cli_download_model_errors_are_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("QBENCH_CACHE_DIR", str(tmp_path))
    assert main(["download-model", "whisper-huge"]) == 2
    assert "unknown model" in capsys.readouterr().err
    # tiny.en's URL source, offline here: the error names the URL and what to do instead
    monkeypatch.setenv("http_proxy", "http://127.0.0.1:9")  # nothing listens: fails fast, never the internet
    monkeypatch.setenv("https_proxy", "http://127.0.0.1:9")
    assert main(["download-model", "whisper-tiny.en", "--source", "url", "-q"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "cannot download https://openaipublic" in err and "--weights" in err and "Traceback" not in err


def test_loader_refuses_weights_that_differ_from_the_card(tiny_en, tmp_path, monkeypatch):
    """The card pins model.bin's sha256: a substituted file in the registry's place is refused."""
    import qbench.checkpoints.loader as loader
    from qbench.checkpoints.errors import CheckpointError

    fake = tmp_path / "model"
    shutil.copytree(tiny_en.path, fake)
    with open(fake / "model.bin", "ab") as f:
        f.write(b"\0")
    monkeypatch.setattr(loader, "resolve_weights", lambda card, weights=None: (fake, "ctranslate2"))
    with pytest.raises(CheckpointError, match=r"model.bin: sha256 .* card expects 1a5afae0"):
        loader.load_model("whisper-tiny.en")
