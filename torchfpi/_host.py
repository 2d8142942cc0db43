"""Host-side arithmetic of the loop's bookkeeping: numpy when present, torch otherwise.

The loop reads the residual norms of a whole window in one device-to-host transfer; everything
it then decides per sample runs here, on small ``(B,)`` or ``(w, B)`` arrays. Tests replace
:data:`_HOST` (``torchfpi._host._HOST``) to run the torch-only fallback or to count host reads.
"""

from __future__ import annotations

import math
from typing import Any, Callable, List, Optional

import torch
from torch import Tensor

try:  # numpy makes the per-sample bookkeeping ~5x cheaper; torch alone works too
    import numpy as _np
except ImportError:  # pragma: no cover - numpy is an optional companion of torch
    _np = None  # type: ignore[assignment]


_NUMPY_DTYPES = (
    {torch.float32: _np.float32, torch.float64: _np.float64, torch.float16: _np.float16} if _np is not None else {}
)


class _HostOps:
    """The array operations of the bookkeeping, on host (CPU) float64 arrays.

    numpy arrays when numpy is importable (each small op costs ~1 us instead of torch's ~5 us),
    else CPU tensors with the same semantics. :meth:`host` is the only device-to-host read of
    the loop (once per window; tests count its calls).
    """

    def __init__(self) -> None:
        self.np = _np is not None

    def host(self, t: Tensor) -> Any:
        t = t.detach()
        if self.np and t.device.type == "cpu" and t.dtype in _NUMPY_DTYPES:
            return t.numpy().astype(_np.float64, copy=False)  # the cast in numpy: no dispatch
        h = t.to("cpu", torch.float64)
        return h.numpy() if self.np else h

    def full(self, n: int, value: float, kind: str) -> Any:
        if self.np:
            return _np.full(n, value, dtype={"f": _np.float64, "i": _np.int64, "b": bool}[kind])
        dt = {"f": torch.float64, "i": torch.int64, "b": torch.bool}[kind]
        return torch.full((n,), value, dtype=dt)

    def fmin(self, a: Any, b: Any) -> Any:
        return _np.fmin(a, b) if self.np else torch.fmin(a, torch.as_tensor(b, dtype=a.dtype))

    def fmax(self, a: Any, b: Any) -> Any:
        return _np.fmax(a, b) if self.np else torch.fmax(a, torch.as_tensor(b, dtype=a.dtype))

    def fmin_all(self, a: Any) -> float:
        """The smallest entry, NaN ignored (NaN if every entry is NaN)."""
        if self.np:
            return float(_np.fmin.reduce(a, axis=None, initial=math.inf))
        return float(torch.where(torch.isnan(a), math.inf, a).min()) if a.numel() else math.inf

    def where(self, m: Any, a: Any, b: Any) -> Any:
        if self.np:
            return _np.where(m, a, b)
        return torch.where(m, torch.as_tensor(a), torch.as_tensor(b))

    def isfinite(self, a: Any) -> Any:
        return _np.isfinite(a) if self.np else torch.isfinite(a)

    def nonzero(self, m: Any) -> Any:
        return _np.flatnonzero(m) if self.np else m.nonzero().squeeze(1)

    def bincount(self, a: Any) -> Any:
        """Occurrences of each value ``0..max`` of a non-negative integer array."""
        return _np.bincount(a) if self.np else torch.bincount(a.long())

    def unique(self, a: Any) -> List[int]:
        return [int(v) for v in (_np.unique(a) if self.np else torch.unique(a))]

    def cat0(self, a: Any, b: Any) -> Any:
        return _np.concatenate((a, b), axis=0) if self.np else torch.cat((a, b), dim=0)

    def cummin0(self, a: Any) -> Any:
        """Running minimum along axis 0, NaN ignored (NaN only where every earlier value is)."""
        if self.np:
            return _np.fmin.accumulate(a, axis=0)  # fmin: NaN never warns
        out = a.clone()
        for j in range(1, out.shape[0]):
            out[j] = torch.fmin(out[j - 1], out[j])
        return out

    def argmax0(self, a: Any) -> Any:
        return a.argmax(axis=0) if self.np else a.to(torch.int8).argmax(dim=0)

    def argmin0(self, a: Any) -> Any:
        return a.argmin(axis=0) if self.np else a.argmin(dim=0)

    def take0(self, a: Any, j: Any) -> Any:
        """``a[j[i], i]`` for each column ``i``."""
        cols = _np.arange(a.shape[1]) if self.np else torch.arange(a.shape[1])
        return a[j, cols]

    def torch(self, a: Any, device: torch.device, dtype: Optional[torch.dtype] = None) -> Tensor:
        if self.np:
            np_dtype = _NUMPY_DTYPES.get(dtype) if dtype is not None else None
            if np_dtype is not None:  # the cast on the host: cheaper than a torch call
                a = a.astype(np_dtype, copy=False)
            t = torch.from_numpy(_np.ascontiguousarray(a))
        else:
            t = a
        if device.type == "cpu" and (dtype is None or dtype == t.dtype):
            return t  # no dispatch for a no-op move
        return t.to(device=device, dtype=dtype) if dtype is not None else t.to(device)


_HOST = _HostOps()


def _gather_rows(image: Callable[[int], Tensor], js: Any, device: torch.device, lo: int, hi: int) -> Tensor:
    """Row ``i`` of image ``js[i]`` for every row, ``lo <= js <= hi`` (``image(j)`` gives the
    window's image ``j``): a copy of the image most rows take, then the rows of each other
    iteration copied in, in increasing order (one gather per iteration: less memory traffic
    than stacking the images)."""
    H = _HOST
    counts = H.bincount(js - lo)
    base = lo + int(counts.argmax())
    out = image(base).clone()
    for j in range(lo, hi + 1):
        if j != base and counts[j - lo]:
            rows_dev = H.torch(H.nonzero(js == j), device)
            out.index_copy_(0, rows_dev, image(j).index_select(0, rows_dev))
    return out
