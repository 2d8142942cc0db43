"""Training safety shared by the ``torchfpi train`` commands: a NaN/Inf guard and safe checkpoints.

- :class:`NonFiniteGuard` looks at the loss and the gradients after ``backward`` and before the
  optimiser step. A non-finite value skips the step (policy ``"skip"``, gradients zeroed) or stops
  training with a clear message (policy ``"stop"``, or after too many consecutive skips). In a
  data-parallel run the decision is reduced over the processes, so every rank skips together.
- :func:`save_checkpoint` refuses to write a state whose model weights, optimiser state or
  metrics hold NaN or Inf: the last good checkpoint is never replaced by a bad one.
- :func:`load_checkpoint` turns an unreadable or incomplete file into a one-line
  :class:`~torchfpi.apps._common.DataError` (exit code 1) that names the fix.

A checkpoint is a dict holding at least ``model``, ``optimizer``, ``rng`` (see
:func:`torchfpi.apps._common.rng_state`) and ``step``; applications add ``scheduler``, ``epoch``,
their generators and history. It is written atomically (temporary file, fsync, rename).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import torch

from torchfpi.apps._common import DataError, PathLike, UsageError, atomic_torch_save
from torchfpi.apps._distributed import DistContext

POLICIES = ("skip", "stop")


def describe_exception(exc: BaseException, limit: int = 80) -> str:
    """``"Type: first line of the message"``, cut to ``limit`` characters, for one-line errors.

    Example:
        >>> describe_exception(ValueError("bad value\\nmore detail"))
        'ValueError: bad value'
    """
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    text = lines[0] if lines else ""
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class NonFiniteError(FloatingPointError):
    """Training met NaN/Inf and stopped (the CLI prints it in one line and exits with 1)."""


def first_nonfinite(obj: Any, name: str = "") -> Optional[str]:
    """Name of the first floating value in ``obj`` (nested dicts, lists, tensors) that is NaN/Inf.

    Returns ``None`` when every floating tensor and Python float is finite.

    Example:
        >>> first_nonfinite({"w": torch.ones(2), "m": {"loss": float("nan")}})
        'm.loss'
    """
    if isinstance(obj, torch.Tensor):
        if obj.is_floating_point() or obj.is_complex():
            return None if bool(torch.isfinite(obj).all()) else (name or "tensor")
        return None
    if isinstance(obj, float):
        return None if math.isfinite(obj) else (name or "value")
    if isinstance(obj, Mapping):
        for key, value in obj.items():
            found = first_nonfinite(value, f"{name}.{key}" if name else str(key))
            if found:
                return found
        return None
    if isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            found = first_nonfinite(value, f"{name}[{i}]")
            if found:
                return found
    return None


class NonFiniteGuard:
    """Catch a NaN or Inf loss or gradient before it reaches the weights.

    Call :meth:`check` after ``loss.backward()`` and take the optimiser step only when it
    returns True.

    Args:
        policy: ``"skip"``: skip the step (gradients zeroed) and go on; ``"stop"``: raise
            :class:`NonFiniteError` at the first non-finite value.
        max_consecutive: with ``"skip"``, stop after this many skipped steps in a row (the run is
            diverging, not hitting a rare bad batch).
        ctx: the data-parallel context; the decision is reduced over the processes.
        log: where to report a skipped step (``print`` by default; rank 0 only).

    Example:
        >>> w = torch.nn.Parameter(torch.ones(1))
        >>> guard = NonFiniteGuard(log=lambda msg: None)
        >>> (w * float("nan")).sum().backward()
        >>> guard.check(w.sum() * float("nan"), [w], step=1), guard.skipped
        (False, 1)
    """

    def __init__(self, policy: str = "skip", max_consecutive: int = 10,
                 ctx: Optional[DistContext] = None, log: Optional[Callable[[str], None]] = None) -> None:
        if policy not in POLICIES:
            raise UsageError(f"--on-nonfinite: expected one of {POLICIES}, got '{policy}'")
        if max_consecutive < 1:
            raise UsageError(f"max_consecutive: expected >= 1, got {max_consecutive}")
        self.policy = policy
        self.max_consecutive = max_consecutive
        self.ctx = ctx or DistContext()
        self.log = log if log is not None else print
        self.skipped = 0
        self.consecutive = 0

    def check(self, loss: torch.Tensor, parameters: Iterable[torch.nn.Parameter], step: int) -> bool:
        """True when ``loss`` and every gradient are finite (take the step); False to skip it.

        Raises:
            NonFiniteError: with policy ``"stop"``, or after ``max_consecutive`` skips in a row.
        """
        params: Sequence[torch.nn.Parameter] = [p for p in parameters if p.grad is not None]
        what = ""
        if not bool(torch.isfinite(loss.detach()).all()):
            what = f"the loss is {float(loss.detach().flatten()[0])}"
        else:
            for p in params:
                if not bool(torch.isfinite(p.grad).all()):
                    what = "a gradient holds NaN/Inf"
                    break
        flag = torch.tensor([1.0 if what else 0.0], dtype=torch.float64)
        if self.ctx.distributed:
            flag = self.ctx.all_reduce_sum(flag)
            if float(flag) > 0 and not what:
                what = "another process met a non-finite loss or gradient"
        if float(flag) == 0:
            self.consecutive = 0
            return True
        self.skipped += 1
        self.consecutive += 1
        for p in params:
            p.grad = None
        if self.policy == "stop" or self.consecutive >= self.max_consecutive:
            why = "" if self.policy == "stop" else f" ({self.consecutive} non-finite steps in a row)"
            raise NonFiniteError(
                f"training stopped at step {step}: {what}{why}; the last good checkpoint is kept: "
                "lower --lr, or resume from it with --resume"
            )
        if self.ctx.is_main:
            self.log(f"step {step}: {what}: step skipped ({self.skipped} skipped so far)")
        return False


def save_checkpoint(state: Mapping[str, Any], path: PathLike, ctx: Optional[DistContext] = None,
                    check: Sequence[str] = ("model", "optimizer", "metrics")) -> bool:
    """Write ``state`` to ``path`` atomically, on the main process only, if it is finite.

    Args:
        state: the checkpoint dict (``model``, ``optimizer``, ``scheduler``, ``rng``, ``epoch``,
            ``step``, ...).
        path: the checkpoint file.
        ctx: data-parallel context; other ranks return False without writing.
        check: keys of ``state`` that must be free of NaN/Inf.

    Returns:
        True when the file was written.

    Raises:
        NonFiniteError: if a checked entry holds NaN/Inf; the existing file is left untouched.
    """
    if ctx is not None and not ctx.is_main:
        return False
    for key in check:
        bad = first_nonfinite(state.get(key), key)
        if bad:
            raise NonFiniteError(
                f"not writing checkpoint '{path}': {bad} is NaN or Inf; the previous checkpoint "
                "is kept (lower --lr, or resume from it with --resume)"
            )
    atomic_torch_save(dict(state), path)
    return True


def load_checkpoint(path: PathLike, required: Sequence[str] = ("model", "optimizer", "step"),
                    map_location: Any = "cpu") -> dict:
    """Read a checkpoint written by :func:`save_checkpoint`.

    Raises:
        FileNotFoundError: if ``path`` does not exist.
        DataError: if the file cannot be read or lacks a ``required`` key (the message says to
            delete it or to train without ``--resume``).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(2, "No such file or directory", str(path))
    try:
        state = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as exc:  # torch.load raises pickle, zip and runtime errors on a bad file
        raise DataError(
            f"checkpoint '{path}' is unreadable ({describe_exception(exc)}): "
            "delete it or train without --resume"
        ) from exc
    missing = [k for k in required if not isinstance(state, dict) or k not in state]
    if missing:
        raise DataError(
            f"checkpoint '{path}' is not a training checkpoint (missing {missing}): "
            "delete it or train without --resume"
        )
    return state


__all__ = ["describe_exception", "NonFiniteError", "NonFiniteGuard", "first_nonfinite", "save_checkpoint", "load_checkpoint"]
