"""Shared plumbing of the training commands: data roots, devices, seeds, atomic files, machine info.

Everything here is deliberately small and dependency-free (torch and the standard library), so
that every application trains, checkpoints and reports the same way.
"""

from __future__ import annotations

import json
import os
import platform
import random
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Dict, Optional, Union

import torch

PathLike = Union[str, "os.PathLike[str]"]

DATA_ENV = "TORCHFPI_DATA"


class UsageError(ValueError):
    """A wrong or contradictory user argument. The CLI prints it in one line and exits with 2."""


class DataError(RuntimeError):
    """A missing, truncated or malformed data file. The CLI prints it and exits with 1."""


class MissingExtraError(ImportError):
    """A third-party package of an extra is not installed; the message names the extra."""


def require(module: str, extra: str = "apps") -> Any:
    """Import ``module`` or raise :class:`MissingExtraError` naming the extra that provides it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise MissingExtraError(
            f"this command needs the Python package '{module}', which is part of the "
            f"'{extra}' extra: install it with  pip install 'torchfpi[{extra}]'"
        ) from exc


def data_root(explicit: Optional[PathLike] = None) -> Path:
    """Resolve the data root: ``explicit``, else ``$TORCHFPI_DATA``, else ``../shared/data``.

    The fallback is searched relative to the current directory and to the source checkout.

    Raises:
        DataError: if the chosen directory does not exist (the message names where it looked).
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
    here = Path(__file__).resolve().parents[2]
    candidates = [Path.cwd() / ".." / "shared" / "data", here / ".." / "shared" / "data"]
    for cand in candidates:
        if cand.is_dir():
            return cand.resolve()
    raise DataError(
        "no data root found: pass --data-root DIR or set "
        f"${DATA_ENV} (looked for ../shared/data next to the working directory and the checkout)"
    )


def resolve_device(name: str = "auto") -> torch.device:
    """``"auto"`` picks CUDA when available, else CPU; anything else must be a valid device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as exc:
        raise UsageError(f"--device: expected 'auto', 'cpu' or 'cuda[:N]', got '{name}'") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device: '{name}' was asked for but CUDA is not available here")
    return dev


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, torch (and numpy when present); return a CPU generator seeded the same way."""
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % (2**32))
    except ImportError:  # pragma: no cover
        pass
    gen = torch.Generator()
    gen.manual_seed(seed)
    return gen


def rng_state() -> Dict[str, Any]:
    """Capture every random number generator state a training run uses."""
    state: Dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np

        state["numpy"] = np.random.get_state()
    except ImportError:  # pragma: no cover
        pass
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured."""
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        import numpy as np

        np.random.set_state(state["numpy"])


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
    import io

    buf = io.BytesIO()
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


def machine_info() -> Dict[str, Any]:
    """Describe the machine and software, for results files."""
    info: Dict[str, Any] = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    try:
        model = [
            ln.split(":", 1)[1].strip()
            for ln in Path("/proc/cpuinfo").read_text().splitlines()
            if ln.startswith("model name")
        ]
        if model:
            info["cpu_model"] = model[0]
    except OSError:  # pragma: no cover
        pass
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).resolve().parent,
            timeout=5,
        ).stdout.strip()
        if commit:
            info["commit"] = commit
    except (OSError, subprocess.SubprocessError):  # pragma: no cover
        pass
    return info


def finite_or_raise(value: torch.Tensor, what: str) -> None:
    """Raise ``FloatingPointError`` naming ``what`` if ``value`` holds NaN or Inf."""
    if not torch.isfinite(value).all():
        raise FloatingPointError(f"{what} is not finite ({value.detach().flatten()[:4].tolist()})")
