"""The data sets ``torchfpi data`` knows: what each is, where it comes from, and every file's sha256.

A data set is a folder (or two) of the data root's layout, the files the package's manifest
(``_embedded/manifest.tsv``: path, bytes, sha256) lists under it, and the public places those files
come from. Nothing here touches the network: :mod:`torchfpi.data._fetch` downloads, this module
describes and checks. It depends on the standard library and :mod:`torchfpi.io` only.
"""

from __future__ import annotations

import functools
import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from torchfpi.errors import DataError, UsageError
from torchfpi.io import DATA_ENV, PathLike, default_data_root

__all__ = [
    "DATASETS",
    "DOCS_PAGE",
    "MANIFEST_FILE",
    "MIRROR_ENV",
    "Archive",
    "DatasetInfo",
    "DatasetStatus",
    "FileEntry",
    "dataset_files",
    "dataset_names",
    "dataset_status",
    "fetch_hint",
    "get_dataset",
    "hint_for_path",
    "manifest",
    "resolve_root",
]

#: The manifest shipped in the package: one line ``path<TAB>bytes<TAB>sha256`` per file.
MANIFEST_FILE = Path(__file__).resolve().parent / "_embedded" / "manifest.tsv"
#: Where the data sets are described for users (sources, licences, layout).
DOCS_PAGE = "docs/data.md"
#: Environment variable naming a mirror that replaces the base of every download URL.
MIRROR_ENV = "TORCHFPI_DATA_MIRROR"


@dataclass(frozen=True)
class FileEntry:
    """One file of the manifest: ``path`` relative to the data root ('/'-separated), size, sha256."""

    path: str
    size: int
    sha256: str


@dataclass(frozen=True)
class Archive:
    """A zip archive of the publisher that holds some of a data set's files.

    Attributes:
        url: where the publisher serves it.
        provides: the layout folder of the files taken from it (e.g. ``flow/middlebury/other-data``).
        base: the layout folder its member names are relative to (e.g. ``flow/middlebury``): member
            ``other-data/Venus/frame10.png`` becomes ``flow/middlebury/other-data/Venus/frame10.png``.
        fallbacks: other URLs of the same archive, tried in turn when ``url`` fails.
    """

    url: str
    provides: str
    base: str
    fallbacks: Tuple[str, ...] = ()


@dataclass(frozen=True)
class DatasetInfo:
    """What a data set is and where its files come from.

    Attributes:
        name: the name ``torchfpi data`` uses (``bibtex``, ``bsd68``, ...).
        title: a short human name.
        description: one or two sentences: what it is and what torchfpi uses it for.
        licence: the terms the publisher states (or that none is stated).
        citation: the paper(s) to cite.
        homepage: the publisher's page for the data set.
        folders: the layout folders below the data root that hold its files.
        file_url: for sets downloaded file by file, the URL folder of the files (a file's URL is
            ``file_url + "/" + its name``); ``None`` for sets that come in archives.
        archives: for sets that come in zip archives, the archives.
        fallback_file_urls: other URL folders serving the same files, tried in turn for a file
            whose download from ``file_url`` fails (every file is verified whatever its origin).
    """

    name: str
    title: str
    description: str
    licence: str
    citation: str
    homepage: str
    folders: Tuple[str, ...]
    file_url: Optional[str] = None
    archives: Tuple[Archive, ...] = field(default=())
    fallback_file_urls: Tuple[str, ...] = field(default=())

    @property
    def files(self) -> Tuple[FileEntry, ...]:
        """The manifest's entries of this data set."""
        return dataset_files(self)

    @property
    def size(self) -> int:
        """Total bytes of the data set's files once laid out."""
        return sum(f.size for f in self.files)


# Pinned commits of the publishers' repositories; their default branch is the fallback (the files
# are verified against the manifest whichever serves them).
_MULAN = "https://raw.githubusercontent.com/tsoumakas/mulan/43f6389095ad/data/multi-label"
_MULAN_HEAD = "https://raw.githubusercontent.com/tsoumakas/mulan/master/data/multi-label"
_DNCNN = "https://raw.githubusercontent.com/cszn/DnCNN/e93b27812d3ff523a3a79d19e5e50d233d7a8d0a"
_DNCNN_HEAD = "https://raw.githubusercontent.com/cszn/DnCNN/master"
_MIDDLEBURY = "https://vision.middlebury.edu/flow/data/comp/zip"
_MIDDLEBURY_HTTP = "http://vision.middlebury.edu/flow/data/comp/zip"

#: The data sets, by name, in the order ``torchfpi data list`` shows them.
DATASETS: Dict[str, DatasetInfo] = {
    "bibtex": DatasetInfo(
        name="bibtex",
        title="Bibtex (MULAN multi-label)",
        description="7395 BibTeX entries of the BibSonomy tagging system as 1836 binary word "
        "features and 159 tags (4880 train, 2515 test), sparse ARFF with its MULAN label header. "
        "The package embeds a copy (used when the files are absent); the files let tests check it.",
        licence="no licence is stated; distributed by the MULAN project for research use (cite the paper)",
        citation="I. Katakis, G. Tsoumakas, I. Vlahavas, \"Multilabel Text Classification for "
        "Automated Tag Suggestion\", Proc. ECML/PKDD 2008 Discovery Challenge, Antwerp, 2008",
        homepage="http://mulan.sourceforge.net/datasets-mlc.html",
        folders=("multilabel/bibtex",),
        file_url=f"{_MULAN}/bibtex",
        fallback_file_urls=(f"{_MULAN_HEAD}/bibtex",),
    ),
    "delicious": DatasetInfo(
        name="delicious",
        title="Delicious (MULAN multi-label)",
        description="16105 web pages bookmarked on del.icio.us as 500 binary word features and "
        "983 tags (12920 train, 3185 test), sparse ARFF with its MULAN label header.",
        licence="no licence is stated; distributed by the MULAN project for research use (cite the paper)",
        citation="G. Tsoumakas, I. Katakis, I. Vlahavas, \"Effective and Efficient Multilabel "
        "Classification in Domains with Large Number of Labels\", Proc. ECML/PKDD 2008 Workshop on "
        "Mining Multidimensional Data (MMD'08), Antwerp, 2008",
        homepage="http://mulan.sourceforge.net/datasets-mlc.html",
        folders=("multilabel/delicious",),
        file_url=f"{_MULAN}/delicious",
        fallback_file_urls=(f"{_MULAN_HEAD}/delicious",),
    ),
    "train400": DatasetInfo(
        name="train400",
        title="Train400 (grey 180x180 training images)",
        description="400 grey 180x180 crops of Berkeley Segmentation Dataset images, the standard "
        "training set of TNRD and DnCNN; torchfpi trains its denoisers on them (and takes flow "
        "training textures from them).",
        licence="Berkeley Segmentation Dataset images: free for non-commercial research and "
        "educational purposes (BSDS terms)",
        citation="Y. Chen, T. Pock, \"Trainable Nonlinear Reaction Diffusion\", IEEE TPAMI 39(6), "
        "2017; K. Zhang et al., \"Beyond a Gaussian Denoiser: Residual Learning of Deep CNN for "
        "Image Denoising\", IEEE TIP 26(7), 2017; D. Martin et al., \"A Database of Human "
        "Segmented Natural Images...\", ICCV 2001",
        homepage="https://github.com/cszn/DnCNN",
        folders=("denoise/Train400",),
        file_url=f"{_DNCNN}/TrainingCodes/DnCNN_TrainingCodes_v1.0/data/Train400",
        fallback_file_urls=(f"{_DNCNN_HEAD}/TrainingCodes/DnCNN_TrainingCodes_v1.0/data/Train400",),
    ),
    "bsd68": DatasetInfo(
        name="bsd68",
        title="BSD68 (grey denoising test images)",
        description="68 grey 481x321 (or 321x481) Berkeley Segmentation Dataset test images, the "
        "standard denoising benchmark (mean PSNR at sigma 15, 25, 50).",
        licence="Berkeley Segmentation Dataset images: free for non-commercial research and "
        "educational purposes (BSDS terms)",
        citation="S. Roth, M. J. Black, \"Fields of Experts\", IJCV 82(2), 2009; D. Martin et al., "
        "\"A Database of Human Segmented Natural Images...\", ICCV 2001",
        homepage="https://github.com/cszn/DnCNN",
        folders=("denoise/BSD68",),
        file_url=f"{_DNCNN}/testsets/BSD68",
        fallback_file_urls=(f"{_DNCNN_HEAD}/testsets/BSD68",),
    ),
    "middlebury": DatasetInfo(
        name="middlebury",
        title="Middlebury optical flow, \"other\" sequences",
        description="12 colour frame pairs (frame10.png, frame11.png) of the Middlebury flow "
        "benchmark's public \"other\" sequences and the ground-truth flow (flow10.flo) of 8 of them.",
        licence="no licence is stated; made freely available on the web by the authors for research "
        "(cite the paper)",
        citation="S. Baker, D. Scharstein, J. P. Lewis, S. Roth, M. J. Black, R. Szeliski, \"A "
        "Database and Evaluation Methodology for Optical Flow\", IJCV 92(1), 2011",
        homepage="https://vision.middlebury.edu/flow/data/",
        folders=("flow/middlebury/other-data", "flow/middlebury/other-gt-flow"),
        archives=tuple(
            Archive(f"{_MIDDLEBURY}/{zip_name}", f"flow/middlebury/{folder}", "flow/middlebury",
                    fallbacks=(f"{_MIDDLEBURY_HTTP}/{zip_name}",))
            for zip_name, folder in (("other-color-twoframes.zip", "other-data"),
                                     ("other-gt-flow.zip", "other-gt-flow"))
        ),
    ),
}


@functools.lru_cache(maxsize=4)
def _read_manifest(path: str) -> Dict[str, FileEntry]:
    entries: Dict[str, FileEntry] = {}
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise DataError(f"the data manifest '{path}' is missing from the package ({exc.strerror})") from exc
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line.startswith("#"):
            continue
        parts = line.split("\t")
        if len(parts) != 3 or not parts[1].isdigit() or len(parts[2]) != 64:
            raise DataError(f"'{path}' line {number}: expected 'path<TAB>bytes<TAB>sha256', got {line!r}")
        entries[parts[0]] = FileEntry(parts[0], int(parts[1]), parts[2].lower())
    return entries


def manifest() -> Dict[str, FileEntry]:
    """Every file the data sets lay out, by path relative to the data root (from the package's manifest)."""
    return _read_manifest(str(MANIFEST_FILE))


def dataset_files(info: DatasetInfo) -> Tuple[FileEntry, ...]:
    """The manifest's entries under ``info``'s folders, sorted by path."""
    prefixes = tuple(folder.rstrip("/") + "/" for folder in info.folders)
    return tuple(sorted((e for p, e in manifest().items() if p.startswith(prefixes)), key=lambda e: e.path))


def dataset_names() -> List[str]:
    """The names ``torchfpi data fetch`` accepts (besides ``all``), in display order."""
    return list(DATASETS)


def get_dataset(name: str) -> DatasetInfo:
    """The data set called ``name``.

    Raises:
        UsageError: unknown name; the message lists the valid ones.
    """
    try:
        return DATASETS[name]
    except KeyError:
        raise UsageError(
            f"unknown data set '{name}': expected one of {', '.join(dataset_names())} (or 'all')"
        ) from None


def resolve_root(explicit: Optional[PathLike] = None) -> Path:
    """The data root ``torchfpi data`` works on: ``explicit``, else ``$TORCHFPI_DATA``, else the cache.

    The same order as :func:`torchfpi.io.data_root`, but the folder need not exist yet (``fetch``
    creates it; ``check`` reports what is missing).
    """
    if explicit is not None:
        return Path(explicit).expanduser()
    env = os.environ.get(DATA_ENV)
    return Path(env).expanduser() if env else default_data_root()


def fetch_hint(name: str) -> str:
    """``"fetch it with `torchfpi data fetch NAME` (see docs/data.md)"``: the end of every "not found"."""
    return f"fetch it with `torchfpi data fetch {name}` (see {DOCS_PAGE})"


def hint_for_path(path: PathLike) -> str:
    """``"; " + fetch_hint(NAME)`` when ``path`` lies in a data set's layout folder, else ``""``.

    Lets a reader that is handed a path (an image folder, a ``.flo`` file) say which data set a
    missing file belongs to without knowing the data sets itself.
    """
    text = "/" + Path(path).as_posix().strip("/") + "/"
    for info in DATASETS.values():
        for folder in info.folders:
            if f"/{folder.strip('/')}/" in text:
                return "; " + fetch_hint(info.name)
    return ""


def sha256_file(path: PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def file_matches(path: Path, entry: FileEntry) -> bool:
    """True when ``path`` is a regular file with ``entry``'s size and sha256."""
    try:
        if not path.is_file() or path.stat().st_size != entry.size:
            return False
        return sha256_file(path) == entry.sha256
    except OSError:
        return False


@dataclass(frozen=True)
class DatasetStatus:
    """What ``torchfpi data check`` found of one data set under a root.

    Attributes:
        name: the data set.
        root: the data root looked at.
        total: files the manifest lists for it.
        missing: layout paths that do not exist.
        corrupt: layout paths that exist but differ from the manifest (size or sha256).
    """

    name: str
    root: Path
    total: int
    missing: Tuple[str, ...]
    corrupt: Tuple[str, ...]

    @property
    def state(self) -> str:
        """``"present"`` (every file valid), ``"corrupt"`` (some file differs) or ``"missing"``."""
        if self.corrupt:
            return "corrupt"
        return "missing" if self.missing else "present"

    @property
    def ok(self) -> bool:
        return self.state == "present"

    def describe(self, note: str = "") -> str:
        """One line: the state and, when not present, what is wrong, ``note`` and how to mend it."""
        if self.ok:
            return f"present ({self.total} files verified)"
        note = f" ({note})" if note else ""
        if len(self.missing) == self.total:
            return f"missing{note}; {fetch_hint(self.name)}"
        parts = []
        if self.corrupt:
            parts.append(f"{len(self.corrupt)} of {self.total} files differ from the manifest "
                         f"(first: {self.corrupt[0]})")
        if self.missing:
            parts.append(f"{len(self.missing)} of {self.total} files missing (first: {self.missing[0]})")
        return f"{self.state}{note}: {'; '.join(parts)}; {fetch_hint(self.name)}"


def dataset_status(name: str, root: Optional[PathLike] = None, *, verify: bool = True) -> DatasetStatus:
    """Check one data set's files under ``root`` against the manifest.

    Args:
        name: a data set name (see :data:`DATASETS`).
        root: the data root (default: :func:`resolve_root`'s order); it need not exist.
        verify: compare each file's sha256 (default); ``False`` compares sizes only (fast).

    Raises:
        UsageError: unknown ``name``.
    """
    info = get_dataset(name)
    base = resolve_root(root)
    missing: List[str] = []
    corrupt: List[str] = []
    files = info.files
    for entry in files:
        path = base / entry.path
        if not path.exists():
            missing.append(entry.path)
        elif not (file_matches(path, entry) if verify else _size_matches(path, entry)):
            corrupt.append(entry.path)
    return DatasetStatus(name, base, len(files), tuple(missing), tuple(corrupt))


def _size_matches(path: Path, entry: FileEntry) -> bool:
    try:
        return path.is_file() and path.stat().st_size == entry.size
    except OSError:
        return False
