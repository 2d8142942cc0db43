"""Files: where the data sets live, atomic writes, JSON results and safe loading of tensors.

Everything here depends on torch and the standard library only, so that the data readers, the
applications, the benchmarks and the command line write and read files the same way.
"""

from __future__ import annotations

import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, List, Optional, Union

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
    "remove_stale_temp_files",
    "safe_load",
]

PathLike = Union[str, "os.PathLike[str]"]

DATA_ENV = "TORCHFPI_DATA"

_FETCH_INTO = " (`torchfpi data fetch NAME --root {root}` creates it with a data set; see docs/data.md)"


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
            raise DataError(f"--data-root: directory '{root}' does not exist{_FETCH_INTO.format(root=root)}")
        return root
    env = os.environ.get(DATA_ENV)
    if env:
        root = Path(env).expanduser()
        if not root.is_dir():
            raise DataError(f"${DATA_ENV}: directory '{root}' does not exist{_FETCH_INTO.format(root=root)}")
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


def _umask() -> int:
    """The process's file-mode creation mask, read without changing it where the OS allows."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):  # pragma: no cover - not Linux
        pass
    mask = os.umask(0o022)  # pragma: no cover - elsewhere: read it by setting it back at once
    os.umask(mask)  # pragma: no cover
    return mask  # pragma: no cover


#: Temporary files of :func:`atomic_write_bytes`: ``.<name>.<pid>.<random>.tmp`` next to the target.
_TEMP_RE = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.[A-Za-z0-9_]+\.tmp$")
#: The same without the process id, as torchfpi 0.1 wrote them.
_OLD_TEMP_RE = re.compile(r"^\.(?P<name>.+)\.[A-Za-z0-9_]{8}\.tmp$")


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically: temporary file in the same folder, fsync, rename.

    The file gets the permissions of a plain ``open(path, "w")`` (``0o666`` less the umask), not
    the ``0o600`` of a temporary file. The temporary file is ``.<name>.<pid>.<random>.tmp``; one
    left behind by a killed process is removed by :func:`remove_stale_temp_files`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=str(path.parent))
    try:
        with os.fdopen(fd, "wb") as fh:
            if hasattr(os, "fchmod"):
                os.fchmod(fh.fileno(), 0o666 & ~_umask())
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):  # someone else's process, or no way to tell: keep the file
        return True
    return True


def remove_stale_temp_files(folder: PathLike, min_age_s: float = 60.0) -> List[Path]:
    """Delete the temporary files that :func:`atomic_write_bytes` left in ``folder`` when killed.

    A temporary file ``.<name>.<pid>.<random>.tmp`` is stale when process ``pid`` no longer runs
    on this machine; one without a process id (older versions) when it is older than
    ``min_age_s`` seconds. Files of running writers and every other file are left alone. The
    training commands call this on their output folder when they start.

    Returns:
        The files removed (an empty list when ``folder`` does not exist).
    """
    folder = Path(folder)
    removed: List[Path] = []
    try:
        entries = list(folder.iterdir())
    except OSError:
        return removed
    now = time.time()
    for entry in entries:
        m = _TEMP_RE.match(entry.name)
        if m is not None:
            stale = not _pid_alive(int(m.group("pid")))
        elif _OLD_TEMP_RE.match(entry.name):
            try:
                stale = now - entry.stat().st_mtime > min_age_s
            except OSError:
                continue
        else:
            continue
        if stale and entry.is_file():
            try:
                entry.unlink()
                removed.append(entry)
            except OSError:  # pragma: no cover - removed meanwhile, or read-only folder
                pass
    return removed


def _numpy_array_globals() -> List[Any]:
    """What unpickling a plain numeric numpy array needs (torchfpi 0.1 stored numpy's RNG state so)."""
    try:
        import numpy as np
    except ImportError:  # pragma: no cover
        return []
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # pragma: no cover - numpy < 2
        from numpy.core.multiarray import _reconstruct  # type: ignore[no-redef]
    kinds = [type(np.dtype(t)) for t in ("bool", "uint8", "uint32", "int32", "int64", "float32", "float64")]
    return [_reconstruct, np.ndarray, np.dtype, *kinds]


def safe_load(path: PathLike, what: str = "torchfpi file", map_location: Any = "cpu",
              numpy_arrays: bool = False) -> Any:
    """``torch.load(path, weights_only=True)``: tensors and plain data only, never code.

    A file whose pickle names any other Python object (a crafted file that would run code on
    load, or a file of another program) is refused before anything of it runs.

    Args:
        path: the file.
        what: what the file should be, for the message (``"checkpoint"``, ``"denoiser weights"``).
        map_location: as for :func:`torch.load`.
        numpy_arrays: also accept plain numeric numpy arrays (no object arrays): checkpoints of
            torchfpi 0.1 hold numpy's random state as one.

    Raises:
        FileNotFoundError: if ``path`` does not exist.
        DataError: if ``path`` is a directory, is not a torch file, or holds objects other than
            tensors and plain data; the one-line message says which.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(2, "No such file or directory", str(path))
    if path.is_dir():
        raise DataError(f"'{path}' is a directory, expected a {what} file")
    with open(path, "rb") as fh:
        head = fh.read(4)
    if not head:
        raise DataError(f"'{path}' is not a {what} file: the file is empty")
    if head != b"PK\x03\x04" and head[:1] != b"\x80":  # torch.save's zip, or its legacy pickle
        raise DataError(f"'{path}' is not a {what} file: not written by torch.save")
    try:
        if numpy_arrays:
            with torch.serialization.safe_globals(_numpy_array_globals()):
                return torch.load(path, map_location=map_location, weights_only=True)
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch.load raises pickle, zip, EOF and runtime errors on a bad file
        text = str(exc)
        if "Weights only load failed" in text or "weights_only" in text:
            found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text) or re.search(
                r"Unsupported operand[^\n]*", text)
            detail = f" ({found.group(1) if found.lastindex else found.group(0)})" if found else ""
            raise DataError(
                f"'{path}' is not a {what} file: it holds Python objects other than tensors and "
                f"plain data{detail}; refused unread, since loading them could run code"
            ) from exc
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
        first = lines[0][:100] if lines else ""
        raise DataError(f"'{path}' is not a {what} file: cannot read it ({type(exc).__name__}"
                        f"{': ' + first if first else ''})") from exc


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
