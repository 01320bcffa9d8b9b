"""LibriSpeech discovery, listing, digest and download (download against a loopback server)."""

from __future__ import annotations

import csv
import hashlib
import io
import re
import socket
import tarfile
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

import qbench.data.librispeech as ls
from qbench.data.librispeech import (
    ARCHIVES,
    STANDARD_SUBSETS,
    ArchiveInfo,
    ChecksumError,
    DataNotFoundError,
    DownloadError,
    Utterance,
    download_subset,
    find_data_dir,
    list_utterances,
    utterance_digest,
)

# ---------------------------------------------------------------------------------------------
# real shared data
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shared_root() -> Path:
    try:
        root = find_data_dir(None)
    except DataNotFoundError as exc:
        pytest.skip(f"real LibriSpeech sample not available: {exc}")
    if not (root / "PROVENANCE.tsv").is_file():
        pytest.skip(f"{root} is not the shared LibriSpeech sample (no PROVENANCE.tsv)")
    return root


@pytest.fixture(scope="module")
def provenance(shared_root: Path) -> list[dict[str, str]]:
    with (shared_root / "PROVENANCE.tsv").open(newline="") as fh:
        return list(csv.DictReader(fh, delimiter="\t"))


@pytest.fixture(scope="module")
def test_clean(shared_root: Path) -> list[Utterance]:
    return list_utterances(shared_root, "test-clean")


def test_test_clean_has_1000_utterances_over_40_speakers(test_clean: list[Utterance]) -> None:
    assert len(test_clean) == 1000
    assert len({u.speaker for u in test_clean}) == 40
    assert all(u.subset == "test-clean" and u.path.is_file() for u in test_clean)


def test_dev_clean_has_44(shared_root: Path) -> None:
    utts = list_utterances(shared_root, "dev-clean")
    assert len(utts) == 44
    assert all(u.subset == "dev-clean" for u in utts)


def test_listing_matches_provenance(
    test_clean: list[Utterance], provenance: list[dict[str, str]]
) -> None:
    # PROVENANCE.tsv was written independently of this code: same ids, same digest.
    prov_ids = [r["utt_id"] for r in provenance if r["subset"] == "test-clean"]
    ids = [u.id for u in test_clean]
    assert set(ids) == set(prov_ids)
    assert utterance_digest(ids) == utterance_digest(prov_ids)
    durations = {r["utt_id"]: float(r["duration_s"]) for r in provenance}
    for u in test_clean[:5] + test_clean[-5:]:
        assert u.duration == pytest.approx(durations[u.id], abs=1e-3)


def test_sorted_order_and_limit(shared_root: Path, test_clean: list[Utterance]) -> None:
    ids = [u.id for u in test_clean]
    assert ids == sorted(ids)
    assert len(set(ids)) == len(ids)
    first = list_utterances(shared_root, "test-clean", limit=7)
    assert [u.id for u in first] == ids[:7]
    assert first[0].id == "1089-134686-0000"
    assert len(list_utterances(shared_root, "test-clean", limit=5000)) == 1000


def test_transcripts_are_the_official_upper_case_lines(test_clean: list[Utterance]) -> None:
    for u in test_clean:
        assert re.fullmatch(r"[A-Z']+( [A-Z']+)*", u.transcript), u.id
    for u in test_clean[::97]:
        trans = u.path.parent / f"{u.speaker}-{u.chapter}.trans.txt"
        lines = trans.read_text(encoding="utf-8").splitlines()
        assert f"{u.id} {u.transcript}" in lines


def test_digest_stable_and_sensitive(test_clean: list[Utterance]) -> None:
    ids = [u.id for u in test_clean]
    d = utterance_digest(ids)
    assert re.fullmatch(r"[0-9a-f]{64}", d)
    assert utterance_digest(reversed(ids)) == d  # order of the input does not matter
    assert utterance_digest(ids[:-1]) != d
    assert utterance_digest(ids[:999] + ["9999-99999-9999"]) != d
    expected = hashlib.sha256("\n".join(sorted(ids)).encode()).hexdigest()
    assert d == expected


def test_data_dir_may_be_librispeech_folder_itself(shared_root: Path) -> None:
    assert find_data_dir(shared_root / "LibriSpeech") == shared_root.resolve()
    utts = list_utterances(shared_root / "LibriSpeech", "dev-clean", limit=2)
    assert len(utts) == 2


def test_shared_subset_absent_says_download(shared_root: Path) -> None:
    if (shared_root / "LibriSpeech" / "test-other").exists():
        pytest.skip("this copy has test-other")
    with pytest.raises(DataNotFoundError, match=r"qbench download test-other"):
        list_utterances(shared_root, "test-other")


# ---------------------------------------------------------------------------------------------
# synthetic layouts
# ---------------------------------------------------------------------------------------------


def _write_flac(path: Path, n: int = 1600) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, (0.1 * np.sin(np.arange(n) / 5.0)).astype(np.float32), 16000, subtype="PCM_16")


def _make_chapter(
    root: Path,
    subset: str,
    spk: str,
    chap: str,
    lines: dict[str, str],
    flacs: list[str] | None = None,
) -> None:
    d = root / "LibriSpeech" / subset / spk / chap
    d.mkdir(parents=True, exist_ok=True)
    (d / f"{spk}-{chap}.trans.txt").write_text(
        "".join(f"{k} {v}\n" for k, v in lines.items()), encoding="utf-8"
    )
    for utt in lines if flacs is None else flacs:
        _write_flac(d / f"{utt}.flac")


def test_partial_subset(tmp_path: Path) -> None:
    _make_chapter(
        tmp_path,
        "test-other",
        "22",
        "100",
        {"22-100-0001": "B", "22-100-0000": "A", "22-100-0002": "MISSING FLAC"},
        flacs=["22-100-0000", "22-100-0001", "22-100-0009"],  # 0009 has no transcript line
    )
    _make_chapter(tmp_path, "test-other", "1001", "7", {"1001-7-0000": "C"})
    utts = list_utterances(tmp_path, "test-other")
    # string order of ids: "1001-..." < "22-..."
    assert [u.id for u in utts] == ["1001-7-0000", "22-100-0000", "22-100-0001"]
    assert [u.transcript for u in utts] == ["C", "A", "B"]
    assert utts[1].path == tmp_path / "LibriSpeech/test-other/22/100/22-100-0000.flac"
    assert utts[1].duration == pytest.approx(0.1)
    assert [u.id for u in list_utterances(tmp_path, "test-other", limit=1)] == ["1001-7-0000"]


def test_unknown_subset_lists_standard_ones(tmp_path: Path) -> None:
    with pytest.raises(ValueError) as exc:
        list_utterances(tmp_path, "test-dirty")
    for s in STANDARD_SUBSETS:
        assert s in str(exc.value)


def test_absent_subset_folder(tmp_path: Path) -> None:
    _make_chapter(tmp_path, "dev-clean", "1", "2", {"1-2-0000": "X"})
    with pytest.raises(DataNotFoundError) as exc:
        list_utterances(tmp_path, "dev-other")
    msg = str(exc.value)
    assert "qbench download dev-other" in msg and "\n" not in msg


def test_subset_with_no_complete_utterance(tmp_path: Path) -> None:
    _make_chapter(tmp_path, "dev-clean", "1", "2", {"1-2-0000": "X"}, flacs=[])
    with pytest.raises(DataNotFoundError):
        list_utterances(tmp_path, "dev-clean")


def test_malformed_transcript_line_names_file(tmp_path: Path) -> None:
    _make_chapter(tmp_path, "dev-clean", "1", "2", {"1-2-0000": "X"})
    trans = tmp_path / "LibriSpeech/dev-clean/1/2/1-2.trans.txt"
    trans.write_text("1-2-0000 X\n3-4-0001 WRONG CHAPTER\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"1-2\.trans\.txt:2"):
        list_utterances(tmp_path, "dev-clean")


def test_bad_limit(tmp_path: Path) -> None:
    _make_chapter(tmp_path, "dev-clean", "1", "2", {"1-2-0000": "X"})
    with pytest.raises(ValueError):
        list_utterances(tmp_path, "dev-clean", limit=0)


# ---------------------------------------------------------------------------------------------
# find_data_dir resolution order
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No env, an empty cache, and a package location with no shared data above it."""
    monkeypatch.delenv("QBENCH_DATA_DIR", raising=False)
    monkeypatch.setenv("QBENCH_CACHE_DIR", str(tmp_path / "cache"))
    nowhere = tmp_path / "pkg" / "site" / "qbench"
    nowhere.mkdir(parents=True)
    monkeypatch.setattr(ls, "_PACKAGE_DIR", nowhere)
    plain = tmp_path / "plain"
    plain.mkdir()
    monkeypatch.chdir(plain)
    return tmp_path


def _data_root(p: Path, subset: str = "test-clean") -> Path:
    (p / "LibriSpeech" / subset).mkdir(parents=True)
    return p


def test_nothing_found_names_all_three_options(isolated: Path) -> None:
    with pytest.raises(DataNotFoundError) as exc:
        find_data_dir(None)
    msg = str(exc.value)
    assert "\n" not in msg
    assert "--data-dir" in msg and "QBENCH_DATA_DIR" in msg
    assert "../shared/librispeech" in msg
    assert "qbench download" in msg
    with pytest.raises(DataNotFoundError, match="qbench download test-other"):
        find_data_dir(None, subset="test-other")


def test_resolution_order(isolated: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    t = isolated
    explicit = _data_root(t / "explicit")
    env = _data_root(t / "env")
    # a workspace beside `plain` (the cwd the fixture set), so `plain` sees no shared data
    shared = _data_root(t / "ws" / "shared" / "librispeech")
    checkout = t / "ws" / "checkout" / "sub"
    checkout.mkdir(parents=True)
    cache = _data_root(t / "cache")

    monkeypatch.chdir(checkout)
    monkeypatch.setenv("QBENCH_DATA_DIR", str(env))
    assert find_data_dir(explicit) == explicit.resolve()
    assert find_data_dir(str(explicit / "LibriSpeech")) == explicit.resolve()
    assert find_data_dir(None) == env.resolve()
    monkeypatch.delenv("QBENCH_DATA_DIR")
    # from ws/checkout/sub: ws/checkout/../shared is found
    assert find_data_dir(None) == shared
    monkeypatch.chdir(t / "plain")
    assert find_data_dir(None) == cache.resolve()


def test_shared_found_from_package_location(isolated: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    shared = _data_root(isolated / "work" / "shared" / "librispeech")
    pkg = isolated / "work" / "main" / "qbench"
    pkg.mkdir(parents=True)
    monkeypatch.setattr(ls, "_PACKAGE_DIR", pkg)
    assert find_data_dir(None) == shared


def test_cwd_is_searched_before_package_location(
    isolated: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from_cwd = _data_root(isolated / "a" / "shared" / "librispeech")
    from_pkg = _data_root(isolated / "b" / "shared" / "librispeech")
    (isolated / "a" / "co").mkdir()
    (isolated / "b" / "main" / "qbench").mkdir(parents=True)
    monkeypatch.setattr(ls, "_PACKAGE_DIR", isolated / "b" / "main" / "qbench")
    monkeypatch.chdir(isolated / "a" / "co")
    assert find_data_dir(None) == from_cwd
    monkeypatch.chdir(isolated / "plain")
    assert find_data_dir(None) == from_pkg


def test_cache_requires_the_subset(isolated: Path) -> None:
    _data_root(isolated / "cache", "dev-clean")
    assert find_data_dir(None, subset="dev-clean") == (isolated / "cache").resolve()
    with pytest.raises(DataNotFoundError):
        find_data_dir(None, subset="test-other")


def test_cache_wins_over_shared_lacking_the_subset(
    isolated: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shared = _data_root(isolated / "shared" / "librispeech", "test-clean")
    cache = _data_root(isolated / "cache", "test-other")
    (isolated / "co").mkdir()
    monkeypatch.chdir(isolated / "co")
    assert find_data_dir(None) == shared
    assert find_data_dir(None, subset="test-clean") == shared
    assert find_data_dir(None, subset="test-other") == cache.resolve()


def test_explicit_or_env_without_data_is_an_error(
    isolated: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _data_root(isolated / "cache")  # would be found, but a named dir must not be ignored
    empty = isolated / "empty"
    empty.mkdir()
    with pytest.raises(DataNotFoundError, match="--data-dir"):
        find_data_dir(empty)
    monkeypatch.setenv("QBENCH_DATA_DIR", str(isolated / "missing"))
    with pytest.raises(DataNotFoundError, match="QBENCH_DATA_DIR"):
        find_data_dir(None)


# ---------------------------------------------------------------------------------------------
# download against a loopback HTTP server
# ---------------------------------------------------------------------------------------------


def test_official_archive_table() -> None:
    assert set(ARCHIVES) == set(STANDARD_SUBSETS)
    for subset, info in ARCHIVES.items():
        assert info.url == f"https://www.openslr.org/resources/12/{subset}.tar.gz"
        assert info.size is not None and 300_000_000 < info.size < 400_000_000
        assert info.md5 is not None and re.fullmatch(r"[0-9a-f]{32}", info.md5)
        assert info.sha256 is not None and re.fullmatch(r"[0-9a-f]{64}", info.sha256)
    assert ARCHIVES["test-clean"].md5 == "32fa31d27d2e1cad72775fee3f4849a9"
    assert ARCHIVES["test-clean"].size == 346663984


def _build_archive(tmp_path: Path, subset: str = "test-other", extra: list[tuple[str, bytes]] = ()) -> bytes:
    src = tmp_path / "src"
    _make_chapter(src, subset, "7", "11", {"7-11-0000": "HELLO", "7-11-0001": "WORLD"})
    (src / "LibriSpeech" / "README.TXT").write_text("readme\n")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        tar.add(src / "LibriSpeech", arcname="LibriSpeech")
        for name, data in extra:
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tar.addfile(ti, io.BytesIO(data))
    return buf.getvalue()


def _info(url: str, data: bytes, **over: object) -> ArchiveInfo:
    fields = dict(
        url=url,
        size=len(data),
        md5=hashlib.md5(data).hexdigest(),
        sha256=hashlib.sha256(data).hexdigest(),
    )
    fields.update(over)
    return ArchiveInfo(**fields)  # type: ignore[arg-type]


def test_download_extract_and_idempotent(tmp_path: Path, server_factory) -> None:
    data = _build_archive(tmp_path)
    srv = server_factory(data)
    cache = tmp_path / "cache"
    root = download_subset("test-other", cache, progress=True, archive=_info(srv.url, data))
    assert root == cache
    utts = list_utterances(root, "test-other")
    assert [(u.id, u.transcript) for u in utts] == [("7-11-0000", "HELLO"), ("7-11-0001", "WORLD")]
    assert (cache / "LibriSpeech" / "README.TXT").read_text() == "readme\n"
    assert not (cache / "test-other.tar.gz").exists()
    assert not (cache / "test-other.tar.gz.part").exists()
    marker = (cache / "LibriSpeech/test-other/.qbench-complete").read_text()
    assert hashlib.sha256(data).hexdigest() in marker
    assert srv.requests == [None]
    # second call: no network at all
    assert download_subset("test-other", cache, progress=False, archive=_info(srv.url, data)) == cache
    assert srv.requests == [None]


def test_download_resumes_from_part(tmp_path: Path, server_factory) -> None:
    data = _build_archive(tmp_path)
    srv = server_factory(data)
    cache = tmp_path / "cache"
    cache.mkdir()
    half = len(data) // 2
    (cache / "test-other.tar.gz.part").write_bytes(data[:half])
    download_subset("test-other", cache, progress=False, archive=_info(srv.url, data))
    assert srv.requests == [f"bytes={half}-"]
    assert len(list_utterances(cache, "test-other")) == 2


def test_download_restarts_when_server_ignores_range(tmp_path: Path, server_factory) -> None:
    data = _build_archive(tmp_path)
    srv = server_factory(data, honour_range=False)
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "test-other.tar.gz.part").write_bytes(data[:100])
    download_subset("test-other", cache, progress=False, archive=_info(srv.url, data))
    assert srv.requests == ["bytes=100-"]  # asked to resume, got 200 and rewrote the file
    assert len(list_utterances(cache, "test-other")) == 2


def test_complete_part_is_not_refetched(tmp_path: Path, server_factory) -> None:
    data = _build_archive(tmp_path)
    srv = server_factory(data)
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "test-other.tar.gz.part").write_bytes(data)
    download_subset("test-other", cache, progress=False, archive=_info(srv.url, data))
    assert srv.requests == []
    assert len(list_utterances(cache, "test-other")) == 2


def test_complete_part_with_unknown_size_gets_416(tmp_path: Path, server_factory) -> None:
    data = _build_archive(tmp_path)
    srv = server_factory(data)
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "test-other.tar.gz.part").write_bytes(data)
    download_subset("test-other", cache, progress=False, archive=_info(srv.url, data, size=None))
    assert srv.requests == [f"bytes={len(data)}-"]  # answered 416: nothing more to fetch
    assert len(list_utterances(cache, "test-other")) == 2


def test_checksum_mismatch_deletes_and_does_not_extract(tmp_path: Path, server_factory) -> None:
    data = _build_archive(tmp_path)
    srv = server_factory(data)
    cache = tmp_path / "cache"
    bad = _info(srv.url, data, md5="0" * 32)
    with pytest.raises(ChecksumError) as exc:
        download_subset("test-other", cache, progress=False, archive=bad)
    msg = str(exc.value)
    assert "MD5" in msg and "0" * 32 in msg and "\n" not in msg
    assert not (cache / "test-other.tar.gz.part").exists()
    assert not (cache / "test-other.tar.gz").exists()
    assert not (cache / "LibriSpeech" / "test-other").exists()
    with pytest.raises(ChecksumError, match="SHA-256"):
        download_subset("test-other", cache, progress=False, archive=_info(srv.url, data, sha256="f" * 64))


def test_size_mismatch(tmp_path: Path, server_factory) -> None:
    data = _build_archive(tmp_path)
    srv = server_factory(data)
    with pytest.raises(ChecksumError, match="size"):
        download_subset(
            "test-other", tmp_path / "c", progress=False, archive=_info(srv.url, data, size=len(data) + 5)
        )
    assert not (tmp_path / "c" / "test-other.tar.gz.part").exists()


@pytest.mark.parametrize("evil", ["../escape.txt", "/tmp/qbench-abs-escape.txt", "LibriSpeech/../../x"])
def test_unsafe_archive_is_refused(tmp_path: Path, server_factory, evil: str) -> None:
    data = _build_archive(tmp_path, extra=[(evil, b"pwned")])
    srv = server_factory(data)
    cache = tmp_path / "deep" / "cache"
    with pytest.raises(DownloadError) as exc:
        download_subset("test-other", cache, progress=False, archive=_info(srv.url, data))
    # (the tmp dir's own name contains "unsafe", so match the whole phrase)
    assert f"unsafe path {evil!r}" in str(exc.value)
    assert not (tmp_path / "deep" / "escape.txt").exists()
    assert not (cache / "LibriSpeech" / "test-other" / ".qbench-complete").exists()


def test_offline_is_one_line(tmp_path: Path, no_proxy: None) -> None:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now: connection refused, as when offline
    info = ArchiveInfo(url=f"http://127.0.0.1:{port}/x.tar.gz", size=10, md5=None, sha256=None)
    with pytest.raises(DownloadError) as exc:
        download_subset("dev-other", tmp_path, progress=False, archive=info)
    msg = str(exc.value)
    assert "\n" not in msg and f"127.0.0.1:{port}" in msg and "offline" in msg


def test_http_error(tmp_path: Path, server_factory) -> None:
    srv = server_factory(b"")
    info = ArchiveInfo(url=srv.url.replace("archive", "nope"), size=None, md5=None, sha256=None)
    with pytest.raises(DownloadError, match="HTTP 404"):
        download_subset("dev-other", tmp_path, progress=False, archive=info)


def test_download_rejects_unknown_subset(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="test-clean"):
        download_subset("train-clean-100", tmp_path, progress=False)


def test_non_utf8_transcript_names_the_file_and_line(tmp_path: Path) -> None:
    _make_chapter(tmp_path, "dev-clean", "1", "2", {"1-2-0000": "X"})
    trans = tmp_path / "LibriSpeech/dev-clean/1/2/1-2.trans.txt"
    trans.write_bytes(b"1-2-0000 X\n1-2-0001 CAF\xe9\n")  # latin-1, not UTF-8
    with pytest.raises(ls.DataError) as exc:
        list_utterances(tmp_path, "dev-clean")
    msg = str(exc.value)
    assert msg.startswith(f"{trans}:2: not UTF-8") and "0xe9" in msg and "\n" not in msg


def test_skipped_files_are_counted_with_one_example(tmp_path: Path) -> None:
    _make_chapter(tmp_path, "test-other", "22", "100", {"22-100-0000": "A", "22-100-0001": "NO FLAC", "22-100-0002": "NOR"},
                  flacs=["22-100-0000", "22-100-0008", "22-100-0009"])
    utts = list_utterances(tmp_path, "test-other")
    assert [u.id for u in utts] == ["22-100-0000"]
    chapter = tmp_path / "LibriSpeech/test-other/22/100"
    assert utts.skipped.audio_without_transcript == (chapter / "22-100-0008.flac", chapter / "22-100-0009.flac")
    assert [uid for uid, _ in utts.skipped.transcripts_without_audio] == ["22-100-0001", "22-100-0002"]
    assert utts.skipped.warning == (
        f"skipped 2 flac file(s) without a transcript line (e.g. {chapter / '22-100-0008.flac'}) and 2 transcript "
        f"line(s) without a flac file (e.g. 22-100-0001 in {chapter / '22-100.trans.txt'})")
    assert list_utterances(tmp_path, "test-other", limit=1).skipped == utts.skipped


def test_the_shared_sample_skips_nothing(test_clean: list[Utterance]) -> None:
    assert test_clean.skipped.warning is None
