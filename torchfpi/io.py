"""Files: where the data sets live, atomic writes, JSON results and safe loading of tensors.

Everything here depends on torch and the standard library only, so that the data readers, the
applications, the benchmarks and the command line write and read files the same way.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Optional, Union

import torch

from torchfpi.errors import DataError

__all__ = [
    "DATA_ENV",
    "PathLike",
    "atomic_torch_save",
    "atomic_write_bytes",
    "atomic_write_json",
    "data_root",
    "default_data_root",
    "read_json",
]

PathLike = Union[str, "os.PathLike[str]"]

DATA_ENV = "TORCHFPI_DATA"


def default_data_root() -> Path:
    """The per-user cache folder for data sets, after the platform's convention.

    Linux and other Unix: ``$XDG_CACHE_HOME/torchfpi`` (default ``~/.cache/torchfpi``); macOS:
    ``~/Library/Caches/torchfpi``; Windows: ``%LOCALAPPDATA%\\torchfpi\\Cache``. The folder may not
    exist yet: ``torchfpi data fetch`` creates it.
    """
    home = Path.home()
    if sys.platform == "win32":  # pragma: no cover - platform dependent
        base = os.environ.get("LOCALAPPDATA")
        return (Path(base) if base else home / "AppData" / "Local") / "torchfpi" / "Cache"
    if sys.platform == "darwin":  # pragma: no cover - platform dependent
        return home / "Library" / "Caches" / "torchfpi"
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else home / ".cache") / "torchfpi"


def data_root(explicit: Optional[PathLike] = None) -> Path:
    """Resolve the data root: ``explicit`` (``--data-root``), else ``$TORCHFPI_DATA``, else the cache.

    The layout below the root is ``multilabel/<name>/``, ``denoise/{Train400,BSD68}/`` and
    ``flow/middlebury/...``; ``torchfpi data fetch`` lays it out.

    Raises:
        DataError: if ``explicit`` or ``$TORCHFPI_DATA`` names a folder that does not exist. The
            default cache folder is returned even when it does not exist yet; readers then say
            which ``torchfpi data fetch NAME`` brings the missing data set.
    """
    if explicit is not None:
        root = Path(explicit).expanduser()
        if not root.is_dir():
            raise DataError(f"--data-root: directory '{root}' does not exist")
        return root
    env = os.environ.get(DATA_ENV)
    if env:
        root = Path(env).expanduser()
        if not root.is_dir():
            raise DataError(f"${DATA_ENV}: directory '{root}' does not exist")
        return root
    return default_data_root()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. Windows
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically: temporary file in the same folder, fsync, rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=str(path.parent))
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_torch_save(obj: Any, path: PathLike) -> None:
    """``torch.save`` made atomic (temporary file, fsync, rename): a crash never leaves half a file."""
    import io as _bytes_io

    buf = _bytes_io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def atomic_write_json(obj: Any, path: PathLike) -> None:
    """Write JSON atomically, pretty-printed, with a trailing newline."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def read_json(path: PathLike, default: Any = None) -> Any:
    """Read a JSON file, or return ``default`` if it does not exist."""
    path = Path(path)
    if not path.exists():
        return default
    return json.loads(path.read_text())
