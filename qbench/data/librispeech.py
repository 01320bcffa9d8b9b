"""LibriSpeech on disk: where it is, which utterances a run uses, and how to download a subset.

Layout (the corpus's own): `<root>/LibriSpeech/<subset>/<spk>/<chapter>/<spk>-<chapter>-<utt>.flac`
with one `<spk>-<chapter>.trans.txt` per chapter. `<root>` is what `find_data_dir` returns and
what `list_utterances` and `download_subset` take and return.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tarfile
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path, PurePosixPath

import soundfile as sf

from qbench.data.downloading import CHUNK, ChecksumError, DownloadError, fetch_resumable
from qbench.errors import QBenchError, one_line

__all__ = [
    "ARCHIVES",
    "OFFICIAL_COUNTS",
    "ArchiveInfo",
    "ChecksumError",
    "DataNotFoundError",
    "DownloadError",
    "STANDARD_SUBSETS",
    "SkippedFiles",
    "Utterance",
    "UtteranceList",
    "default_cache_dir",
    "download_subset",
    "find_data_dir",
    "list_utterances",
    "utterance_digest",
]

STANDARD_SUBSETS: tuple[str, ...] = ("test-clean", "test-other", "dev-clean", "dev-other")

OPENSLR_BASE_URL = "https://www.openslr.org/resources/12"


@dataclass(frozen=True)
class ArchiveInfo:
    """Where a subset's archive is and what its bytes must hash to (None: not checked)."""

    url: str
    size: int | None
    md5: str | None
    sha256: str | None


# Sizes and MD5s are openslr's published values for SLR12 (its md5sum.txt; the sizes are the
# "final release" list in Kaldi's egs/librispeech/s5/local/download_and_untar.sh). The SHA-256s
# are torchaudio's `_CHECKSUMS` for the same URLs. Each value was cross-checked against several
# independent public sources that report the same bytes; none was guessed. All three are checked.
# utterances in each official subset: a run on fewer is marked as a partial subset
OFFICIAL_COUNTS: dict[str, int] = {"test-clean": 2620, "test-other": 2939, "dev-clean": 2703, "dev-other": 2864}

ARCHIVES: dict[str, ArchiveInfo] = {
    "test-clean": ArchiveInfo(
        url=f"{OPENSLR_BASE_URL}/test-clean.tar.gz",
        size=346663984,
        md5="32fa31d27d2e1cad72775fee3f4849a9",
        sha256="39fde525e59672dc6d1551919b1478f724438a95aa55f874b576be21967e6c23",
    ),
    "test-other": ArchiveInfo(
        url=f"{OPENSLR_BASE_URL}/test-other.tar.gz",
        size=328757843,
        md5="fb5a50374b501bb3bac4815ee91d3135",
        sha256="d09c181bba5cf717b3dee7d4d592af11a3ee3a09e08ae025c5506f6ebe961c29",
    ),
    "dev-clean": ArchiveInfo(
        url=f"{OPENSLR_BASE_URL}/dev-clean.tar.gz",
        size=337926286,
        md5="42e2234ba48799c1f50f24a7926300a1",
        sha256="76f87d090650617fca0cac8f88b9416e0ebf80350acb97b343a85fa903728ab3",
    ),
    "dev-other": ArchiveInfo(
        url=f"{OPENSLR_BASE_URL}/dev-other.tar.gz",
        size=314305928,
        md5="c8d0bcc9cca99d4f8b62fcc847357931",
        sha256="12661c48e8c3fe1de2c1caa4c3e135193bfb1811584f11f569dd12645aa84365",
    ),
}

# Tests point this elsewhere so the checkout's own ../shared/librispeech does not leak in.
_PACKAGE_DIR = Path(__file__).resolve().parent.parent

_UTT_ID = re.compile(r"^(\d+)-(\d+)-(\d+)$")
_COMPLETE_MARKER = ".qbench-complete"


class DataError(QBenchError, ValueError):
    """A LibriSpeech folder whose contents are malformed (transcripts, ids), or a bad selection."""


class DataNotFoundError(QBenchError, FileNotFoundError):
    """No LibriSpeech data where it was looked for; the message says how to provide it."""


def _check_subset(subset: str) -> None:
    if subset not in STANDARD_SUBSETS:
        raise DataError(
            f"unknown LibriSpeech subset {subset!r}; expected one of {', '.join(STANDARD_SUBSETS)}"
        )


@dataclass(frozen=True)
class Utterance:
    """One LibriSpeech utterance: its id (`spk-chapter-utt`), subset, flac path and transcript."""

    id: str
    subset: str
    path: Path
    transcript: str

    @property
    def speaker(self) -> str:
        return self.id.split("-", 1)[0]

    @property
    def chapter(self) -> str:
        return self.id.split("-", 2)[1]

    @cached_property
    def duration(self) -> float:
        """Seconds, from the flac header (read on first use: listing 1000 files stays cheap)."""
        info = sf.info(str(self.path))
        return info.frames / info.samplerate


@dataclass(frozen=True)
class SkippedFiles:
    """Files of a subset `list_utterances` left out because the other half of the pair is missing."""

    audio_without_transcript: tuple[Path, ...] = ()
    transcripts_without_audio: tuple[tuple[str, Path], ...] = ()  # (utterance id, its trans.txt)

    @property
    def warning(self) -> str | None:
        """One line naming how many were skipped, with one example of each kind; None if none."""
        parts = []
        if self.audio_without_transcript:
            parts.append(f"{len(self.audio_without_transcript)} flac file(s) without a transcript line "
                         f"(e.g. {self.audio_without_transcript[0]})")
        if self.transcripts_without_audio:
            uid, trans = self.transcripts_without_audio[0]
            parts.append(f"{len(self.transcripts_without_audio)} transcript line(s) without a flac file "
                         f"(e.g. {uid} in {trans})")
        return "skipped " + " and ".join(parts) if parts else None


class UtteranceList(list):
    """`list_utterances`' answer: the utterances, plus what was skipped to get them (`.skipped`)."""

    def __init__(self, utterances: Iterable[Utterance] = (), skipped: SkippedFiles | None = None):
        super().__init__(utterances)
        self.skipped = skipped if skipped is not None else SkippedFiles()


# -- locating the data -----------------------------------------------------------------------


def default_cache_dir() -> Path:
    """`$QBENCH_CACHE_DIR`, else `~/.cache/qbench/librispeech`: where `download_subset` writes."""
    env = os.environ.get("QBENCH_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "qbench" / "librispeech"


def _as_root(path: Path) -> Path | None:
    """The folder holding `LibriSpeech/`, given it or `LibriSpeech/` itself; None if neither."""
    if (path / "LibriSpeech").is_dir():
        return path
    if path.name == "LibriSpeech" and path.is_dir():
        return path.parent
    return None


def _has_subset(root: Path, subset: str | None) -> bool:
    if subset is None:
        return any((root / "LibriSpeech" / s).is_dir() for s in STANDARD_SUBSETS)
    return (root / "LibriSpeech" / subset).is_dir()


def _shared_candidates() -> list[Path]:
    """`<ancestor>/../shared/librispeech` for every ancestor of the cwd, then of the package."""
    out: list[Path] = []
    for start in (Path.cwd().resolve(), _PACKAGE_DIR):
        for ancestor in (start, *start.parents):
            cand = ancestor.parent / "shared" / "librispeech"
            if cand not in out and (cand / "LibriSpeech").is_dir():
                out.append(cand)
    return out


def _not_found_message(subset: str | None) -> str:
    name = subset or "<subset>"
    return (
        "LibriSpeech data not found: pass --data-dir DIR or set QBENCH_DATA_DIR "
        "(DIR holding LibriSpeech/), or place it at ../shared/librispeech beside the checkout, "
        f"or run `qbench download {name}` (cache: {default_cache_dir()})"
    )


def find_data_dir(explicit: str | os.PathLike[str] | None, subset: str | None = None) -> Path:
    """The data root (the folder holding `LibriSpeech/`), resolved in this order:

    1. `explicit` (the `--data-dir` argument), 2. `$QBENCH_DATA_DIR`,
    3. `../shared/librispeech` beside the checkout (looked for above the cwd, then above the
       package), 4. the download cache if it holds a subset (`subset`, when given).

    A dir given by 1 or 2 must exist and hold LibriSpeech: a user who named a place means it,
    so it is an error rather than a silent fall-through. When `subset` is given and the shared
    sample lacks it but the cache has it (e.g. test-other after `qbench download test-other`),
    the cache wins; otherwise the order above is kept exactly.
    """
    if subset is not None:
        _check_subset(subset)
    for source, value in (("--data-dir", explicit), ("QBENCH_DATA_DIR", os.environ.get("QBENCH_DATA_DIR"))):
        if value is None or str(value) == "":
            continue
        path = Path(value).expanduser()
        root = _as_root(path)
        if root is None:
            raise DataNotFoundError(
                f"{source} {path}: no LibriSpeech/ folder there (give the folder holding "
                "LibriSpeech/ or LibriSpeech/ itself)"
            )
        return root.resolve()

    shared = _shared_candidates()
    cache = _as_root(default_cache_dir())
    cache_ok = cache is not None and _has_subset(cache, subset)
    if subset is not None:
        for cand in shared:
            if _has_subset(cand, subset):
                return cand
        if cache_ok:
            return cache.resolve()  # type: ignore[union-attr]
    if shared:
        return shared[0]
    if cache_ok:
        return cache.resolve()  # type: ignore[union-attr]
    raise DataNotFoundError(_not_found_message(subset))


# -- listing utterances ----------------------------------------------------------------------


def list_utterances(
    data_dir: str | os.PathLike[str], subset: str, limit: int | None = None
) -> UtteranceList:
    """Utterances of `subset` that have both a transcript line and a flac, sorted by id.

    The order is plain string order of the ids, so `limit=N` always means the same N files.
    A transcript line whose flac is absent is skipped (partial subsets are normal); a flac
    with no transcript line is never listed. Both are counted in `.skipped`, whose one-line
    `.warning` a run prints and records: a silently smaller test set is a different benchmark.
    """
    _check_subset(subset)
    if limit is not None and limit < 1:
        raise DataError(f"limit must be a positive number of utterances, got {limit}")
    root = _as_root(Path(data_dir).expanduser())
    if root is None:
        raise DataNotFoundError(f"{data_dir}: no LibriSpeech/ folder there")
    subset_dir = root / "LibriSpeech" / subset
    if not subset_dir.is_dir():
        raise DataNotFoundError(
            f"subset {subset} not found at {subset_dir}; run `qbench download {subset}` "
            "or point --data-dir/QBENCH_DATA_DIR at a copy that has it"
        )

    utts: dict[str, Utterance] = {}
    seen: set[str] = set()
    without_audio: list[tuple[str, Path]] = []
    for trans in sorted(subset_dir.glob("*/*/*.trans.txt")):
        chapter_prefix = trans.name[: -len(".trans.txt")] + "-"
        for lineno, line in _transcript_lines(trans):
            line = line.strip()
            if not line:
                continue
            utt_id, _, text = line.partition(" ")
            text = text.strip()
            # A malformed line means a damaged corpus; scoring it would be silently wrong.
            if not _UTT_ID.match(utt_id) or not utt_id.startswith(chapter_prefix) or not text:
                raise DataError(f"{trans}:{lineno}: malformed transcript line {line[:60]!r}")
            if utt_id in seen:
                raise DataError(f"{trans}:{lineno}: duplicate utterance id {utt_id}")
            seen.add(utt_id)
            flac = trans.parent / f"{utt_id}.flac"
            if flac.is_file():
                utts[utt_id] = Utterance(id=utt_id, subset=subset, path=flac, transcript=text)
            else:
                without_audio.append((utt_id, trans))
    without_transcript = tuple(sorted(f for f in subset_dir.glob("*/*/*.flac") if f.stem not in utts))
    skipped = SkippedFiles(audio_without_transcript=without_transcript, transcripts_without_audio=tuple(without_audio))
    if not utts:
        raise DataNotFoundError(
            f"subset {subset} at {subset_dir} has no utterance with both a transcript line and a "
            f"flac; run `qbench download {subset}`"
        )
    ordered = [utts[k] for k in sorted(utts)]
    return UtteranceList(ordered if limit is None else ordered[:limit], skipped)


def _transcript_lines(trans: Path) -> Iterable[tuple[int, str]]:
    """(line number, text) of a trans.txt; a line that is not UTF-8 is an error naming the file,
    the line and the offending byte (a codec message alone names no file)."""
    for lineno, raw in enumerate(trans.read_bytes().split(b"\n"), 1):
        try:
            yield lineno, raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise DataError(f"{trans}:{lineno}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at column {exc.start + 1})") from None


def utterance_digest(ids: Iterable[str]) -> str:
    """sha256 hex of the sorted ids joined by newlines: names exactly which utterances ran."""
    return hashlib.sha256("\n".join(sorted(ids)).encode("utf-8")).hexdigest()


# -- downloading -----------------------------------------------------------------------------

def _verify(path: Path, info: ArchiveInfo) -> str:
    """Check size, MD5 and SHA-256 (those known); return the SHA-256 actually computed."""
    size = path.stat().st_size
    if info.size is not None and size != info.size:
        raise ChecksumError(
            f"{path}: size {size} bytes, expected {info.size} from {info.url}; deleted, re-run to "
            "download again"
        )
    md5, sha = hashlib.md5(), hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(CHUNK):
            md5.update(chunk)
            sha.update(chunk)
    for name, want, got in (("MD5", info.md5, md5.hexdigest()), ("SHA-256", info.sha256, sha.hexdigest())):
        if want is not None and got != want.lower():
            raise ChecksumError(
                f"{path}: {name} {got} does not match the published {want} for {info.url}; "
                "deleted, re-run to download again"
            )
    return sha.hexdigest()


def _safe_members(tar: tarfile.TarFile, archive: Path) -> list[tarfile.TarInfo]:
    members = tar.getmembers()
    for m in members:
        name = PurePosixPath(m.name)
        # Checked by hand as well as by filter="data", which older Pythons lack.
        if name.is_absolute() or ".." in name.parts or m.name.startswith(("/", "\\")):
            raise DownloadError(f"{archive}: unsafe path {m.name!r} in archive; refusing to extract")
        if not (m.isfile() or m.isdir()):
            raise DownloadError(
                f"{archive}: member {m.name!r} is a link or device, which LibriSpeech never has; "
                "refusing to extract"
            )
        if not name.parts or name.parts[0] != "LibriSpeech":
            raise DownloadError(f"{archive}: member {m.name!r} is outside LibriSpeech/; refusing")
    return members


def _extract(archive: Path, cache_dir: Path, subset: str) -> None:
    staging = cache_dir / f".extract-{subset}"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    try:
        try:
            with tarfile.open(archive, "r:gz") as tar:
                members = _safe_members(tar, archive)
                if hasattr(tarfile, "data_filter"):
                    tar.extractall(staging, members=members, filter="data")
                else:  # pragma: no cover - Python < 3.10.12 / 3.11.4
                    tar.extractall(staging, members=members)
        except (tarfile.TarError, EOFError, OSError) as exc:
            raise DownloadError(f"{archive}: cannot extract ({one_line(exc)})") from exc
        src = staging / "LibriSpeech" / subset
        if not src.is_dir():
            raise DownloadError(f"{archive}: has no LibriSpeech/{subset}/ folder")
        # Extract aside and move into place, so an interrupted extraction never looks complete.
        dest_parent = cache_dir / "LibriSpeech"
        dest_parent.mkdir(parents=True, exist_ok=True)
        dest = dest_parent / subset
        if dest.exists():
            shutil.rmtree(dest)
        src.rename(dest)
        for extra in (staging / "LibriSpeech").iterdir():  # README, LICENSE, SPEAKERS ...
            if not (dest_parent / extra.name).exists():
                extra.rename(dest_parent / extra.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def download_subset(
    subset: str,
    cache_dir: str | os.PathLike[str] | None = None,
    *,
    progress: bool = True,
    archive: ArchiveInfo | None = None,
    keep_archive: bool = False,
) -> Path:
    """Download and extract `subset` into `cache_dir` (default `default_cache_dir()`).

    Returns the data root (`cache_dir`, holding `LibriSpeech/<subset>/`). Idempotent: a subset
    already extracted and marked complete is returned without touching the network. The archive
    streams to `<subset>.tar.gz.part`, resumes from it with a Range request, is checked against
    the published size/MD5/SHA-256 before extraction (deleted on mismatch) and extracted
    refusing absolute paths, `..` and links. `archive` overrides URL and checksums (tests,
    mirrors).
    """
    _check_subset(subset)
    info = archive if archive is not None else ARCHIVES[subset]
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    subset_dir = root / "LibriSpeech" / subset
    marker = subset_dir / _COMPLETE_MARKER
    if marker.is_file():
        return root

    final = root / f"{subset}.tar.gz"
    part = root / f"{subset}.tar.gz.part"
    sha256: str | None = None
    if final.exists():
        try:
            sha256 = _verify(final, info)  # left by an interrupted extraction; re-check is cheap
        except ChecksumError:
            final.unlink()
    if sha256 is None:
        fetch_resumable(info.url, part, info.size, f"{subset}.tar.gz", progress,
                        offline_hint="use --data-dir or QBENCH_DATA_DIR with a local copy instead")
        try:
            sha256 = _verify(part, info)
        except ChecksumError:
            part.unlink(missing_ok=True)
            raise
        part.replace(final)

    _extract(final, root, subset)
    # The marker records which bytes the tree came from, so a run can cite them.
    marker.write_text(f"{info.url}\nsha256 {sha256}\n", encoding="utf-8")
    if not keep_archive:
        final.unlink(missing_ok=True)
    return root
