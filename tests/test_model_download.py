"""`qbench download-model`: URL weights over loopback HTTP, Hub weights through a stand-in
snapshot_download, the registry's checksums, and the loader's check of pinned weights."""

from __future__ import annotations

import hashlib
import shutil

import pytest

from qbench.cli import main
from qbench.data.downloading import ChecksumError
from qbench.checkpoints.download import download_model
from qbench.checkpoints.registry import ModelCard, get_card, list_models, resolve_weights

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
    assert files["model.safetensors"].sha256 and files["model.safetensors"].size  # pinned, not left empty
    calls = []

    def fake_snapshot_download(repo_id, revision, allow_patterns):
        calls.append((repo_id, revision, allow_patterns))
        for name in allow_patterns:
            (tmp_path / name).write_bytes(b"{}")
        return str(tmp_path)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    with pytest.raises(ChecksumError, match=r"model.safetensors: 2 bytes, the registry expects 377607901"):
        download_model(card, progress=False)
    # the safetensors weights, not the pickle: the repo publishes both
    assert calls == [("facebook/wav2vec2-base-960h", "main", ["model.safetensors", "config.json", "vocab.json"])]


SAFETENSORS, PICKLE, CONFIG = b"safetensors weights" * 50, b"pickled weights" * 50, b'{"model_type": "wav2vec2"}'


def hub_card(**overrides) -> ModelCard:
    """A Hub source publishing weights as model.safetensors, with pytorch_model.bin as its fallback."""
    def pinned(name: str, data: bytes, **extra) -> dict:
        return {"path": name, "sha256": hashlib.sha256(data).hexdigest(), "size": len(data), **extra}

    files = [pinned("model.safetensors", SAFETENSORS),
             pinned("pytorch_model.bin", PICKLE, fallback_for="model.safetensors"),
             pinned("config.json", CONFIG)]
    return ModelCard(name="test-hub-model", architecture="wav2vec2", parameters=1,
                     sources=[{"kind": "huggingface", "repo_id": "test/model", "revision": "main", "files": files,
                               **overrides}])


def fake_hub(tmp_path, monkeypatch, published: dict[str, bytes]) -> list:
    """snapshot_download over a repo holding `published`; returns the allow_patterns of each call."""
    huggingface_hub = pytest.importorskip("huggingface_hub")
    calls = []

    def fake_snapshot_download(repo_id, revision, allow_patterns):
        calls.append(allow_patterns)
        for name in allow_patterns:  # like the hub: a pattern matching no file is not an error
            if name in published:
                (tmp_path / name).write_bytes(published[name])
        return str(tmp_path)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    return calls


def test_a_pickle_is_downloaded_only_where_no_safetensors_is_published(tmp_path, monkeypatch):
    both = tmp_path / "both"
    both.mkdir()
    calls = fake_hub(both, monkeypatch, {"model.safetensors": SAFETENSORS, "pytorch_model.bin": PICKLE,
                                         "config.json": CONFIG})
    assert download_model(hub_card(), progress=False) == both
    assert calls == [["model.safetensors", "config.json"]] and not (both / "pytorch_model.bin").exists()

    only_pickle = tmp_path / "only_pickle"
    only_pickle.mkdir()
    calls = fake_hub(only_pickle, monkeypatch, {"pytorch_model.bin": PICKLE, "config.json": CONFIG})
    assert download_model(hub_card(), progress=False) == only_pickle
    assert calls == [["model.safetensors", "config.json"], ["pytorch_model.bin"]]

    # the fallback is checked against its own pin
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    fake_hub(wrong, monkeypatch, {"pytorch_model.bin": b"other bytes", "config.json": CONFIG})
    with pytest.raises(ChecksumError, match=rf"pytorch_model.bin: 11 bytes, the registry expects {len(PICKLE)}"):
        download_model(hub_card(), progress=False)

    neither = tmp_path / "neither"
    neither.mkdir()
    fake_hub(neither, monkeypatch, {"config.json": CONFIG})
    with pytest.raises(ChecksumError, match=r"pytorch_model.bin: missing after download \(test/model lists it as "
                                            r"the fallback for model.safetensors, which is missing too\)"):
        download_model(hub_card(), progress=False)


def test_cards_download_safetensors_and_say_why_a_file_is_unpinned():
    """Wherever a card lists a pickle it is only the fallback for model.safetensors, and every
    file without a published size and sha256 says so rather than leaving it silent."""
    for card in list_models().values():
        for source in card.sources:
            names = [f.path for f in source.files]
            for f in source.files:
                # a pickle; CTranslate2's model.bin is its own container, read with struct
                if f.path.endswith((".bin", ".pt")) and source.kind == "huggingface" and source.format != "ctranslate2":
                    assert f.fallback_for == "model.safetensors" and "model.safetensors" in names, (card.name, f.path)
                if f.sha256 is not None:
                    assert len(f.sha256) == 64 and set(f.sha256) <= set("0123456789abcdef"), (card.name, f.path)
                elif f.path.endswith((".safetensors", ".bin")) and source.kind != "url":
                    assert f.note and "not pinned" in f.note, (card.name, f.path)


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
    # the same file named with --weights is the user's choice: it loads, and its own sha256 is recorded
    explicit = loader.load_model("whisper-tiny.en", weights=fake)
    assert explicit.sha256 == hashlib.sha256((fake / "model.bin").read_bytes()).hexdigest() != tiny_en.sha256
