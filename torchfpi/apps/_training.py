"""Training safety shared by the ``torchfpi train`` commands: a NaN/Inf guard and safe checkpoints.

- :class:`NonFiniteGuard` looks at the loss and the gradients after ``backward`` and before the
  optimiser step. A non-finite value skips the step (policy ``"skip"``, gradients zeroed) or stops
  training with a clear message (policy ``"stop"``, or after too many consecutive skips). In a
  data-parallel run the decision is reduced over the processes, so every rank skips together.
- :func:`save_checkpoint` refuses to write a state whose model weights, optimiser state or
  metrics hold NaN or Inf: the last good checkpoint is never replaced by a bad one.
- :func:`load_checkpoint` turns an unreadable or incomplete file into a one-line
  :class:`~torchfpi.errors.DataError` (exit code 1) that names the fix.

A checkpoint is a dict holding at least ``model``, ``optimizer``, ``rng`` (see
:func:`torchfpi.runtime.rng_state`) and ``step``; applications add ``scheduler``, ``epoch``,
their generators and history. It is written atomically (temporary file, fsync, rename).
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional, Sequence

import torch

from torchfpi.apps._distributed import DistContext
from torchfpi.errors import DataError, UsageError
from torchfpi.io import PathLike, atomic_torch_save, safe_load

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

    Replace ``loss.backward()`` by :meth:`backward` (or call :meth:`check` after it) and take
    the optimiser step only when it returns True.

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
        >>> guard.backward((w * float("nan")).sum(), [w], step=1), guard.skipped, w.grad
        (False, 1, None)
        >>> guard.backward((w * 2).sum(), [w], step=2), w.grad
        (True, tensor([2.]))
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

    def backward(self, loss: torch.Tensor, parameters: Iterable[torch.nn.Parameter], step: int) -> bool:
        """``loss.backward()`` guarded: True when the loss and every gradient are finite (take the
        optimiser step); False when the step must be skipped (gradients cleared).

        A non-finite loss is caught before the backward pass (the decision is reduced over the
        processes first, so that no rank enters DDP's gradient reduction alone). In a
        single-process run, a backward fixed-point solve that fails on NaN/Inf
        (:class:`~torchfpi.FixedPointError`) also counts as a non-finite step.

        Raises:
            NonFiniteError: with policy ``"stop"``, or after ``max_consecutive`` skips in a row.
        """
        from torchfpi.errors import FixedPointError

        params = list(parameters)
        what = "" if bool(torch.isfinite(loss.detach()).all()) else f"the loss is {float(loss.detach().flatten()[0])}"
        what = self._reduce(what, "another process met a non-finite loss")
        if what:
            return self._skip(what, params, step)
        try:
            loss.backward()
        except (FixedPointError, FloatingPointError) as exc:
            if self.ctx.distributed:  # the other ranks are inside the gradient reduction
                raise
            return self._skip(f"the backward pass failed ({str(exc).splitlines()[0][:120]})", params, step)
        return self.check(loss, params, step)

    def check(self, loss: torch.Tensor, parameters: Iterable[torch.nn.Parameter], step: int) -> bool:
        """After ``loss.backward()``: True when ``loss`` and every gradient are finite; False to skip.

        Raises:
            NonFiniteError: with policy ``"stop"``, or after ``max_consecutive`` skips in a row.
        """
        params: Sequence[torch.nn.Parameter] = [p for p in parameters if p.grad is not None]
        what = ""
        if not bool(torch.isfinite(loss.detach()).all()):
            what = f"the loss is {float(loss.detach().flatten()[0])}"
        else:
            for p in params:
                if p.grad is not None and not bool(torch.isfinite(p.grad).all()):
                    what = "a gradient holds NaN/Inf"
                    break
        what = self._reduce(what, "another process met a non-finite loss or gradient")
        if not what:
            self.consecutive = 0
            return True
        return self._skip(what, params, step)

    def _reduce(self, what: str, elsewhere: str) -> str:
        """Make the verdict common to every process (a no-op in a single process)."""
        if not self.ctx.distributed:
            return what
        flag = self.ctx.all_reduce_sum(torch.tensor([1.0 if what else 0.0], dtype=torch.float64))
        return what or (elsewhere if float(flag) > 0 else "")

    def _skip(self, what: str, params: Sequence[torch.nn.Parameter], step: int) -> bool:
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
                    map_location: Any = "cpu", app: Optional[str] = None) -> dict:
    """Read a checkpoint written by :func:`save_checkpoint`.

    ``app`` names the training command (``"denoise"``, ``"flow"``, ``"flow fpi_nn"``,
    ``"multilabel"``); a checkpoint that records another one (its ``"app"`` entry) is refused.

    The file is read with ``weights_only=True`` (:func:`torchfpi.io.safe_load`): tensors and plain
    data only, so a crafted file cannot run code.

    Raises:
        FileNotFoundError: if ``path`` does not exist.
        DataError: if the file cannot be read, holds objects other than tensors and plain data, or
            lacks a ``required`` key (the message says to delete it or to train without
            ``--resume``).
    """
    path = Path(path)
    try:
        # numpy arrays: a checkpoint of torchfpi 0.1 stored numpy's random state as one
        state = safe_load(path, "training checkpoint", map_location, numpy_arrays=True)
    except DataError as exc:
        raise DataError(f"checkpoint {exc}: delete it or train without --resume") from exc
    if not isinstance(state, dict):
        raise DataError(f"checkpoint '{path}' is not a training checkpoint (it holds a {type(state).__name__}): "
                        "delete it or train without --resume")
    if app is not None and state.get("app", app) != app:
        raise DataError(f"checkpoint '{path}' is a checkpoint of 'torchfpi train {state['app']}', not of "
                        f"'torchfpi train {app}': delete it or train without --resume")
    missing = [k for k in required if k not in state]
    if missing:
        kind = ""
        if "meta" in state or {"kind", "state_dict"} <= set(state) or "flow_config" in state:
            kind = "it holds exported weights, not a checkpoint; "
        raise DataError(
            f"checkpoint '{path}' is not a training checkpoint of this command ({kind}missing {missing}): "
            "delete it or train without --resume"
        )
    return state


@contextlib.contextmanager
def restoring(path: PathLike) -> Iterator[None]:
    """Turn a checkpoint that does not fit the model, optimiser or generators into a one-line
    :class:`~torchfpi.errors.DataError` (another architecture, another run, a damaged entry).

    Example:
        >>> with restoring("ck.pt"):  # doctest: +ELLIPSIS
        ...     torch.nn.Linear(2, 2).load_state_dict({"weight": torch.ones(3, 3)}, strict=False)
        Traceback (most recent call last):
        ...
        torchfpi.errors.DataError: checkpoint 'ck.pt' does not fit this run (RuntimeError: ...): delete it ...
    """
    try:
        yield
    except (DataError, UsageError):
        raise
    except (RuntimeError, ValueError, KeyError, TypeError, IndexError, AttributeError) as exc:
        raise DataError(f"checkpoint '{path}' does not fit this run ({describe_exception(exc)}): delete it "
                        "or train without --resume") from exc


__all__ = ["describe_exception", "NonFiniteError", "NonFiniteGuard", "first_nonfinite", "save_checkpoint",
           "load_checkpoint", "restoring"]
