"""Resumable HTTP downloads with a progress bar, shared by LibriSpeech archives and model weights.

Only the standard library's urllib: a `.part` file grows across attempts (a Range request picks
up where it stopped), and the caller checks size and hashes before trusting it.
"""

from __future__ import annotations

import hashlib
import urllib.error
import urllib.request
from pathlib import Path

from qbench.errors import QBenchError, one_line

CHUNK = 1 << 20


class DownloadError(QBenchError, RuntimeError):
    """A file could not be downloaded or extracted."""


class ChecksumError(DownloadError):
    """A downloaded file's size or hash differs from the published value."""


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


def progress_bar(enabled: bool):  # -> rich.progress.Progress | None
    if not enabled:
        return None
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    # stderr, so a run that pipes its results table to a file does not capture the bar.
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        transient=False,
    )


def fetch_resumable(url: str, part: Path, expected_size: int | None, label: str, progress: bool,
                    offline_hint: str) -> None:
    """Stream `url` into `part`, resuming with a Range request from what `part` already holds.

    `offline_hint` ends the one-line error when the network cannot be reached (what to do
    instead). Checksums are the caller's: a complete `part` is returned as it is.
    """
    have = part.stat().st_size if part.exists() else 0
    if expected_size is not None and have > expected_size:
        part.unlink()  # cannot be a prefix of the right file
        have = 0
    if expected_size is not None and have == expected_size:
        return  # complete already; the checksum decides whether it is right
    req = urllib.request.Request(url, headers={"User-Agent": "qbench"})
    if have:
        req.add_header("Range", f"bytes={have}-")
    try:
        resp = urllib.request.urlopen(req, timeout=60)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and have:
            # The server says there is nothing past `have`: the partial file is whole or wrong,
            # which verification settles.
            return
        raise DownloadError(f"cannot download {url}: HTTP {exc.code} {one_line(exc.reason)}") from exc
    except (urllib.error.URLError, OSError) as exc:
        reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
        raise DownloadError(
            f"cannot download {url}: {one_line(reason)} (offline? {offline_hint})"
        ) from exc

    with resp:
        status = resp.status
        if have and status == 206:
            content_range = resp.headers.get("Content-Range", "")
            if not content_range.startswith(f"bytes {have}-"):
                raise DownloadError(
                    f"cannot resume {url}: server sent range {content_range!r} for bytes={have}-"
                )
            mode = "ab"
        else:
            # 200 to a Range request: the server sent the whole file, so start over.
            have = 0
            mode = "wb"
        length = resp.headers.get("Content-Length")
        total = expected_size if expected_size is not None else (
            have + int(length) if length is not None else None
        )
        bar = progress_bar(progress)
        try:
            if bar is not None:
                bar.start()
                task = bar.add_task(label, total=total, completed=have)
            with part.open(mode) as out:
                while chunk := resp.read(CHUNK):
                    out.write(chunk)
                    if bar is not None:
                        bar.update(task, advance=len(chunk))
        except OSError as exc:
            raise DownloadError(
                f"download of {url} interrupted ({one_line(exc)}); {part} kept, re-run to resume"
            ) from exc
        finally:
            if bar is not None:
                bar.stop()
