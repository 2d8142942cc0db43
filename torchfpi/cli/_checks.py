"""Argument checks shared by the commands: numbers, seeds and output paths, before any work.

Every check raises :class:`~torchfpi.errors.UsageError` (exit 2) naming the flag, what was expected
and what came. The output checks look at the file system only (nothing is created): the target is
not a folder (or not a file, for folders), no part of its path is a file, and the nearest folder
that exists accepts a new file (probed with a temporary file that is removed at once), so that a
run never trains for an hour and then fails to write its result.
"""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path
from typing import Iterable, Optional

from torchfpi.errors import UsageError

#: Seeds: what torch, numpy and Python all accept.
MAX_SEED = 2**63 - 1


def positive_int(value: Optional[int], flag: str, maximum: Optional[int] = None) -> None:
    """``value`` is None or an integer ``>= 1`` (and ``<= maximum``)."""
    if value is None:
        return
    if value < 1:
        raise UsageError(f"{flag}: expected a positive integer, got {value}")
    if maximum is not None and value > maximum:
        raise UsageError(f"{flag}: expected at most {maximum}, got {value}")


def nonnegative_int(value: Optional[int], flag: str) -> None:
    """``value`` is None or an integer ``>= 0``."""
    if value is not None and value < 0:
        raise UsageError(f"{flag}: expected an integer >= 0, got {value}")


def positive_number(value: Optional[float], flag: str, maximum: Optional[float] = None) -> None:
    """``value`` is None or a finite number ``> 0`` (and ``<= maximum``)."""
    if value is None:
        return
    if not (math.isfinite(value) and value > 0):
        raise UsageError(f"{flag}: expected a positive number, got {value:g}")
    if maximum is not None and value > maximum:
        raise UsageError(f"{flag}: expected at most {maximum:g}, got {value:g}")


def seed(value: int, flag: str = "--seed") -> None:
    """A seed every generator accepts: ``0 <= value < 2**63``."""
    if not 0 <= value <= MAX_SEED:
        raise UsageError(f"{flag}: expected an integer in [0, 2**63), got {value}")


def _nearest_existing(path: Path) -> Path:
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return probe


def _writable(folder: Path, flag: str, target: Path) -> None:
    """Create and remove a temporary file in ``folder`` (the only sure test, also for root)."""
    try:
        fd, name = tempfile.mkstemp(prefix=".torchfpi-probe.", suffix=".tmp", dir=str(folder))
    except OSError as exc:
        raise UsageError(f"{flag}: cannot write '{target}': no new file can be created in '{folder}' "
                         f"({exc.strerror or exc})") from None
    os.close(fd)
    os.unlink(name)


def output_file(path: str, flag: str, suffixes: Optional[Iterable[str]] = None) -> Path:
    """Check that ``path`` can be written as a file; return it as a :class:`~pathlib.Path`.

    Args:
        path: the output file (it may not exist yet, nor its folders).
        flag: the flag that gave it, for messages.
        suffixes: accepted extensions (lower case, with the dot); None: any.
    """
    if not str(path) or str(path).endswith(("/", os.sep)):
        raise UsageError(f"{flag}: '{path}' names a folder, expected a file name")
    target = Path(path).expanduser()
    if suffixes is not None:
        allowed = tuple(suffixes)
        if target.suffix.lower() not in allowed:
            raise UsageError(f"{flag}: expected a file name ending in {' or '.join(allowed)}, got '{path}'")
    if target.is_dir():
        raise UsageError(f"{flag}: '{target}' is a folder, expected a file name")
    if target.exists() and not target.is_file():
        raise UsageError(f"{flag}: '{target}' exists and is not a regular file")
    base = _nearest_existing(target.parent)
    if not base.is_dir():
        raise UsageError(f"{flag}: '{base}' is a file, so '{target}' cannot be created")
    _writable(base, flag, target)
    return target


def output_dir(path: str, flag: str) -> Path:
    """Check that ``path`` is, or can be created as, a folder that accepts files; return it."""
    if not str(path):
        raise UsageError(f"{flag}: expected a folder name, got ''")
    target = Path(path).expanduser()
    if target.exists() and not target.is_dir():
        raise UsageError(f"{flag}: '{target}' is a file, expected a folder")
    base = _nearest_existing(target)
    if not base.is_dir():
        raise UsageError(f"{flag}: '{base}' is a file, so the folder '{target}' cannot be created")
    _writable(base, flag, target)
    return target


def image_suffixes() -> tuple:
    """File extensions Pillow can write a grey 8-bit image to (``.png`` first)."""
    from PIL import Image

    Image.init()
    exts = {ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.SAVE}
    lossless = [e for e in (".png", ".tif", ".tiff", ".bmp", ".pgm") if e in exts]
    return tuple(lossless or [".png"])


__all__ = ["MAX_SEED", "image_suffixes", "nonnegative_int", "output_dir", "output_file", "positive_int",
           "positive_number", "seed"]
