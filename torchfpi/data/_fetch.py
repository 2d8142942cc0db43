"""Download a data set from its public sources into the data root, verified and atomic.

The downloading itself is :mod:`pooch`'s (HTTP(S)/FTP, a temporary file renamed only when
complete, optional progress bar). What this module adds is the data set's shape:

1. Files already present and matching the manifest are left alone; if every file is, nothing
   is downloaded.
2. Everything else is downloaded into ``<root>/.torchfpi-partial/<name>/`` (single files under
   their layout path, archives under ``archives/``); what a previous, interrupted run completed
   there is reused once it matches the manifest again.
3. Every file to be installed is checked against the manifest's size and sha256.
4. Only then are they moved into the layout: a layout folder that does not exist yet is renamed
   into place in one step, otherwise file by file. The partial folder is then removed.

An interrupted or failed download therefore never leaves a half data set in the layout, and
running the same command again completes it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

from torchfpi.data._registry import (
    DOCS_PAGE,
    MIRROR_ENV,
    Archive,
    DatasetInfo,
    FileEntry,
    dataset_status,
    file_matches,
    get_dataset,
    resolve_root,
)
from torchfpi.errors import DataError, UsageError
from torchfpi.io import PathLike

__all__ = ["PARTIAL_DIR", "FetchResult", "candidate_urls", "fetch_dataset", "source_urls"]

#: Folder under the data root where downloads wait until they are verified.
PARTIAL_DIR = ".torchfpi-partial"
#: Seconds to wait for a server to answer or to send the next bytes.
TIMEOUT = 60.0
_REMOTE_SCHEMES = ("http://", "https://", "ftp://", "sftp://", "doi:")


@dataclass(frozen=True)
class FetchResult:
    """What :func:`fetch_dataset` did.

    Attributes:
        name: the data set.
        root: the data root it lies under.
        installed: number of files moved into the layout (0 when all were already present).
        downloaded: bytes downloaded by this call (files and archives).
    """

    name: str
    root: Path
    installed: int
    downloaded: int

    @property
    def already_present(self) -> bool:
        return self.installed == 0


def _mirror_url(mirror: str, name: str, url: str) -> str:
    return f"{mirror.rstrip('/')}/{name}/{PurePosixPath(url).name}"


def candidate_urls(name: str, mirror: Optional[str] = None) -> Dict[str, List[str]]:
    """Like :func:`source_urls`, with the publishers' fallback URLs after each primary one.

    With a mirror there is one URL each: the mirror's.
    """
    info = get_dataset(name)
    primary = source_urls(name, mirror)
    if mirror:
        return {key: [url] for key, url in primary.items()}
    out: Dict[str, List[str]] = {}
    for key, url in primary.items():
        if key in {a.provides for a in info.archives}:
            archive = next(a for a in info.archives if a.provides == key)
            out[key] = [url, *archive.fallbacks]
        else:
            file_name = PurePosixPath(key).name
            out[key] = [url, *(f"{base.rstrip('/')}/{file_name}" for base in info.fallback_file_urls)]
    return out


def source_urls(name: str, mirror: Optional[str] = None) -> Dict[str, str]:
    """Every download of a data set: its URL by what it provides (a layout path or an archive's folder).

    Args:
        name: a data set name.
        mirror: a base URL (or local folder) replacing the publishers': a file or archive
            ``.../NAME.ext`` of data set ``SET`` is then looked for at ``MIRROR/SET/NAME.ext``.
    """
    info = get_dataset(name)
    urls: Dict[str, str] = {}
    if info.file_url is not None:
        for entry in info.files:
            url = f"{info.file_url.rstrip('/')}/{PurePosixPath(entry.path).name}"
            urls[entry.path] = _mirror_url(mirror, name, url) if mirror else url
    for archive in info.archives:
        urls[archive.provides] = _mirror_url(mirror, name, archive.url) if mirror else archive.url
    return urls


def _is_remote(url: str) -> bool:
    return url.lower().startswith(_REMOTE_SCHEMES)


def _local_path(url: str) -> Path:
    return Path(url[len("file://"):] if url.startswith("file://") else url).expanduser()


def _copy_downloader(url: str, output_file: Any, pooch: Any = None) -> None:
    """A pooch downloader for a mirror that is a local folder (``file://`` or a plain path)."""
    source = _local_path(url)
    if not source.is_file():
        raise FileNotFoundError(2, "No such file in the mirror folder", str(source))
    if hasattr(output_file, "write"):
        with open(source, "rb") as fh:
            shutil.copyfileobj(fh, output_file)
    else:
        shutil.copyfile(source, output_file)


def _describe_network_error(exc: BaseException) -> str:
    """A short reason for a failed download (requests' messages run over several clauses)."""
    import requests

    text = str(exc)
    if isinstance(exc, requests.exceptions.HTTPError) and exc.response is not None:
        return f"HTTP {exc.response.status_code} {exc.response.reason or ''}".strip()
    if isinstance(exc, requests.exceptions.Timeout):
        return f"no answer within {TIMEOUT:g} s"
    if isinstance(exc, requests.exceptions.ChunkedEncodingError) or "IncompleteRead" in text \
            or "Connection broken" in text or "RemoteDisconnected" in text:
        return "the connection closed before the end of the file"
    if "refused" in text.lower():
        return "connection refused"
    if "resolve" in text.lower() or "Name or service not known" in text or "getaddrinfo" in text:
        return "the host name could not be resolved (offline?)"
    return type(exc).__name__


@contextlib.contextmanager
def _quiet_pooch(pooch: Any) -> Iterator[None]:
    """pooch logs every download at INFO level (on its own logger); we print our own lines."""
    logger: logging.Logger = pooch.get_logger()
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


class _Downloader:
    """Fetch one URL to one file with pooch; every failure becomes a one-line :class:`DataError`."""

    def __init__(self, name: str, progress: bool) -> None:
        from torchfpi.runtime import require

        self.pooch = require("pooch", extra="data")
        self.name = name
        self.progress = progress and _has_tqdm()
        self.downloaded = 0

    def __call__(self, urls: List[str], dest: Path, sha256: Optional[str], show_bar: bool) -> str:
        """Download the first of ``urls`` that works (and matches ``sha256``); return that URL.

        The fallbacks are tried only when the first URL fails. If all fail, one line names each
        URL with what went wrong (a checksum mismatch, or why the download failed).
        """
        failures: List[Tuple[str, _Failure]] = []
        for url in urls:
            try:
                self._one(url, dest, sha256, show_bar)
                return url
            except _Failure as exc:
                failures.append((url, exc))
        if len(failures) == 1 and failures[0][1].checksum:
            raise DataError(f"{self.name}: checksum mismatch: {urls[0]} does not match the package's "
                            f"manifest (sha256 {sha256}); nothing was installed")
        tried = "; ".join(f"{url}: {exc.reason}" for url, exc in failures)
        what = f"cannot download {dest.name}: {tried}" if len(failures) > 1 else f"cannot download {tried}"
        retry = "" if all(exc.checksum for _, exc in failures) else \
            " (run the command again to resume, or use --mirror URL)"
        raise DataError(f"{self.name}: {what}; nothing was installed{retry}")

    def _one(self, url: str, dest: Path, sha256: Optional[str], show_bar: bool) -> None:
        import requests

        bar = self.progress and show_bar
        downloader: Callable[..., Any]
        if url.lower().startswith(("http://", "https://")):
            downloader = self.pooch.HTTPDownloader(progressbar=bar, timeout=TIMEOUT)
        elif _is_remote(url):  # ftp://, sftp://, doi:
            downloader = self.pooch.downloaders.choose_downloader(url, progressbar=bar)
        else:
            downloader = _copy_downloader
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            with _quiet_pooch(self.pooch):
                self.pooch.retrieve(
                    url, known_hash=f"sha256:{sha256}" if sha256 else None, fname=dest.name,
                    path=str(dest.parent), downloader=downloader,
                )
        except requests.exceptions.RequestException as exc:
            if exc.response is not None:  # pooch leaves a refused response (HTTP 404, ...) open
                exc.response.close()
            raise _Failure(_describe_network_error(exc)) from exc
        except ValueError as exc:  # pooch: the file's hash differs from the manifest's
            if "hash" not in str(exc).lower():
                raise
            raise _Failure("checksum mismatch (the file differs from the package's manifest)",
                           checksum=True) from exc
        except FileNotFoundError as exc:  # local mirror folder
            raise _Failure("not in the mirror folder") from exc
        except (OSError, EOFError) as exc:  # ftplib and the other protocols' errors
            raise _Failure(str(exc).splitlines()[0] if str(exc).strip() else type(exc).__name__) from exc
        self.downloaded += dest.stat().st_size


class _Failure(Exception):
    """One URL's failed download: a short reason, and whether the bytes were wrong (checksum)."""

    def __init__(self, reason: str, checksum: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.checksum = checksum


def _has_tqdm() -> bool:
    try:
        import tqdm  # noqa: F401
    except ImportError:  # pragma: no cover - depends on the environment
        return False
    return True


def _extract(archive_path: Path, archive: Archive, wanted: List[FileEntry], tree: Path,
             name: str, url: str) -> None:
    """Copy the ``wanted`` members of a zip into ``tree`` under their layout paths.

    Members are found by their path relative to ``archive.base``, also below one leading folder
    (some archives wrap everything in one). Names from the archive are never used as output
    paths, so a hostile archive cannot write outside ``tree``.
    """
    prefix = archive.base.rstrip("/") + "/"
    try:
        with zipfile.ZipFile(archive_path) as zf:
            members: Dict[str, zipfile.ZipInfo] = {}
            for info in zf.infolist():
                if not info.is_dir():
                    members.setdefault(info.filename.replace("\\", "/").lstrip("/"), info)
            for entry in wanted:
                rel = entry.path[len(prefix):]
                member = members.get(rel) or next(
                    (m for key, m in members.items() if key.endswith("/" + rel) and key.count("/") == rel.count("/") + 1),
                    None,
                )
                if member is None:
                    continue  # reported as missing by the verification
                out = tree / entry.path
                out.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(member) as src, open(out, "wb") as dst:
                    shutil.copyfileobj(src, dst)
    except (zipfile.BadZipFile, EOFError, zipfile.LargeZipFile) as exc:
        archive_path.unlink(missing_ok=True)
        raise DataError(
            f"{name}: {url} is not a readable zip archive ({exc}); it was "
            "deleted and nothing was installed (run the command again to download it anew)"
        ) from exc


def _install(ready: Path, root: Path, info: DatasetInfo, todo: List[FileEntry]) -> int:
    """Move the verified files of ``ready`` into the layout under ``root``; return how many."""
    moved = 0
    todo_paths = {e.path for e in todo}
    for folder in info.folders:
        src_folder, dst_folder = ready / folder, root / folder
        if not src_folder.exists():
            continue
        if not dst_folder.exists():
            dst_folder.parent.mkdir(parents=True, exist_ok=True)
            os.replace(src_folder, dst_folder)  # the whole folder appears at once
            moved += sum(1 for p in todo_paths if p.startswith(folder.rstrip("/") + "/"))
            continue
        for path in sorted(p for p in todo_paths if p.startswith(folder.rstrip("/") + "/")):
            dst = root / path
            dst.parent.mkdir(parents=True, exist_ok=True)
            if dst.is_dir():
                raise DataError(f"'{dst}' is a directory where the data set '{info.name}' has a file")
            os.replace(ready / path, dst)
            moved += 1
    return moved


def fetch_dataset(
    name: str,
    root: Optional[PathLike] = None,
    *,
    mirror: Optional[str] = None,
    progress: bool = True,
    log: Optional[Callable[[str], None]] = None,
) -> FetchResult:
    """Download a data set from its public sources into the data root and verify every file.

    Files already present and valid are kept; the others are downloaded into a partial folder,
    checked against the package's sha256 manifest and only then moved into the layout, so an
    interrupted or corrupt download never leaves a half data set, and a rerun completes it.

    Args:
        name: ``"bibtex"``, ``"delicious"``, ``"train400"``, ``"bsd68"`` or ``"middlebury"``.
        root: the data root (default: ``$TORCHFPI_DATA``, else the per-user cache); created if needed.
        mirror: a base URL (or a local folder) that replaces the publishers': the file or archive
            ``NAME.ext`` of data set ``SET`` is looked for at ``MIRROR/SET/NAME.ext``. Default:
            ``$TORCHFPI_DATA_MIRROR`` when set.
        progress: show a progress bar (needs ``tqdm``).
        log: where to write one line per step (default: nothing).

    Returns:
        A :class:`FetchResult`.

    Raises:
        UsageError: unknown ``name``.
        DataError: a download failed (offline, refused, interrupted, HTTP error), a file differs from
            the manifest, or the root cannot be written. Nothing half-done is left in the layout.
        MissingExtraError: ``pooch`` is not installed.

    Example:
        >>> from torchfpi.data import fetch_dataset
        >>> fetch_dataset("bsd68", "/tmp/torchfpi-data")  # doctest: +SKIP
        FetchResult(name='bsd68', root=PosixPath('/tmp/torchfpi-data'), installed=68, downloaded=6450605)
    """
    info = get_dataset(name)
    say = log or (lambda line: None)
    base = resolve_root(root)
    if mirror is None:
        mirror = os.environ.get(MIRROR_ENV) or None
    if mirror is not None and not mirror.strip():
        raise UsageError("--mirror: expected a URL or a folder, got an empty string")
    try:
        base.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"data root '{base}': cannot create it ({exc.strerror or exc})") from exc
    status = dataset_status(name, base)
    if status.ok:
        say(f"{name}: already present under {base} ({status.total} files verified)")
        return FetchResult(name, base, 0, 0)
    todo = [e for e in info.files if e.path in set(status.missing) | set(status.corrupt)]
    candidates = candidate_urls(name, mirror)
    urls = {key: options[0] for key, options in candidates.items()}
    download = _Downloader(name, progress)
    partial = base / PARTIAL_DIR / name
    files_dir, archives_dir, tree = partial / "files", partial / "archives", partial / "tree"
    try:
        if tree.exists():
            shutil.rmtree(tree)  # rebuilt from the downloads below
        say(f"{name}: downloading {len(todo)} of {status.total} files into {base}")
        # 1. single files (kept in files/ across runs until installed; reused when they match)
        singles = [e for e in todo if e.path in urls]
        bar = _file_bar(name, len(singles), progress and download.progress and len(singles) > 1)
        try:
            for entry in singles:
                dest = files_dir / entry.path
                if not file_matches(dest, entry):
                    dest.unlink(missing_ok=True)
                    download(candidates[entry.path], dest, entry.sha256, show_bar=len(singles) == 1)
                bar(1)
        finally:
            bar(0, close=True)
        # 2. archives: downloaded whole, the wanted members extracted into tree/
        for archive in info.archives:
            wanted = [e for e in todo if e.path.startswith(archive.provides.rstrip("/") + "/")]
            if not wanted:
                continue
            url = urls[archive.provides]
            dest = archives_dir / PurePosixPath(url).name
            if not dest.is_file():
                say(f"{name}: {url}")
                url = download(candidates[archive.provides], dest, None, show_bar=True)
            _extract(dest, archive, wanted, tree, name, url)
        # 3. verify everything that is to be installed, gather it in ready/
        ready = partial / "ready"
        if ready.exists():
            shutil.rmtree(ready)
        for entry in todo:
            src = files_dir / entry.path if entry.path in urls else tree / entry.path
            if not src.is_file():
                _archive_of(info, entry, archives_dir, urls).unlink(missing_ok=True)
                raise DataError(
                    f"{name}: '{entry.path}' is not in the archive from {_source_of(info, entry, urls)}; "
                    f"the archive was deleted and nothing was installed (has the publisher changed it? "
                    f"see {DOCS_PAGE})"
                )
            if not file_matches(src, entry):
                culprit = src if entry.path in urls else _archive_of(info, entry, archives_dir, urls)
                culprit.unlink(missing_ok=True)
                raise DataError(
                    f"{name}: checksum mismatch for '{entry.path}' (expected "
                    f"{entry.size} bytes, sha256 {entry.sha256[:12]}...); the download was deleted "
                    "and nothing was installed"
                )
            (ready / entry.path).parent.mkdir(parents=True, exist_ok=True)
            os.replace(src, ready / entry.path)
        # 4. into the layout
        installed = _install(ready, base, info, todo)
    except OSError as exc:
        _tidy(partial, keep_downloads=True)
        raise DataError(f"{name}: {exc.strerror or exc}: '{exc.filename}'") from exc
    except BaseException:
        _tidy(partial, keep_downloads=True)  # what was completely downloaded serves the rerun
        raise
    _tidy(partial, keep_downloads=False)
    say(f"{name}: {installed} files installed and verified under {base} "
        f"({download.downloaded / 1e6:.1f} MB downloaded)")
    return FetchResult(name, base, installed, download.downloaded)


def _tidy(partial: Path, keep_downloads: bool) -> None:
    """Remove the partial folder (or only its empty remains); then its parent when empty."""
    if keep_downloads and partial.exists():
        for sub in ("tree", "ready"):
            shutil.rmtree(partial / sub, ignore_errors=True)
        if any(p.is_file() for p in partial.rglob("*")):
            return
    shutil.rmtree(partial, ignore_errors=True)
    with contextlib.suppress(OSError):
        partial.parent.rmdir()  # only when no other data set is half-way


def _source_of(info: DatasetInfo, entry: FileEntry, urls: Dict[str, str]) -> str:
    for archive in info.archives:
        if entry.path.startswith(archive.provides.rstrip("/") + "/"):
            return urls[archive.provides]
    return urls.get(entry.path, "?")


def _archive_of(info: DatasetInfo, entry: FileEntry, archives_dir: Path, urls: Dict[str, str]) -> Path:
    for archive in info.archives:
        if entry.path.startswith(archive.provides.rstrip("/") + "/"):
            return archives_dir / PurePosixPath(urls[archive.provides]).name
    return archives_dir / "unknown"  # pragma: no cover - every non-single file comes from an archive


def _file_bar(name: str, total: int, enabled: bool) -> Callable[..., None]:
    """A files-count progress bar for data sets downloaded file by file (no-op when disabled)."""
    if not enabled:
        return lambda n=1, close=False: None
    from tqdm import tqdm

    bar = tqdm(total=total, desc=name, unit="file", file=sys.stderr, leave=True)

    def step(n: int = 1, close: bool = False) -> None:
        if n:
            bar.update(n)
        if close:
            bar.close()

    return step
