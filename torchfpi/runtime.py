"""Run-time helpers shared by the applications, the benchmarks and the command line.

Optional imports that name their extra, the device choice, seeding and random-state capture, and a
description of the machine for results files.
"""

from __future__ import annotations

import os
import platform
import random
import subprocess
from pathlib import Path
from typing import Any, Dict

import torch

from torchfpi.errors import MissingExtraError, UsageError

__all__ = [
    "finite_or_raise",
    "machine_info",
    "require",
    "resolve_device",
    "rng_state",
    "seed_everything",
    "set_rng_state",
]


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
    """Capture every random number generator state a training run uses.

    Only tensors and plain Python data (tuples, ints, floats, strings), so that a checkpoint
    holding it loads with ``torch.load(..., weights_only=True)``: numpy's state array is stored as
    an int64 tensor.
    """
    state: Dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np

        name, keys, pos, has_gauss, cached = np.random.get_state()
        state["numpy"] = (str(name), torch.from_numpy(np.asarray(keys, dtype=np.int64).copy()), int(pos),
                          int(has_gauss), float(cached))
    except ImportError:  # pragma: no cover
        pass
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured (also numpy states stored as numpy arrays)."""
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        import numpy as np

        name, keys, pos, has_gauss, cached = state["numpy"]
        if isinstance(keys, torch.Tensor):
            keys = keys.numpy()
        np.random.set_state((name, np.asarray(keys, dtype=np.uint32), int(pos), int(has_gauss), float(cached)))


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
