"""Optional CUDA-graph capture of a block of forward FPI iterations (``cuda_graph=True``).

On a GPU a small map is bound by kernel launches, not arithmetic: every iteration launches f's
kernels plus the norms the loop needs. :class:`GraphBlock` captures ``block`` iterations of
``z <- (1 - damping) z + damping f(z)``, with the norms ``||f(z) - z||`` and ``||f(z)||`` of each,
into one ``torch.cuda.CUDAGraph`` on static buffers; the loop then replays it once per window
and hands the window to the same per-sample bookkeeping as the eager loop (one host read per
window). Results are those of the eager loop: the per-sample stop, best image and trace logic
is shared, only the order in which kernels are launched changes.

What the map must allow (CUDA graphs' own rules): no host synchronisation inside ``f``
(``.item()``, ``bool(tensor)``, printing a tensor, data-dependent shapes), no CPU tensors
created per call, the same kernels at every call. The tensors ``f`` reads (inputs, parameters,
captured tensors) are read from their memory at each replay, so they must not be replaced during
the solve (they are not: one solve captures its own graph). Capture is tried once per solve;
if it fails, the solve warns once and runs the eager loop (same results, eager speed).

Costs: one capture per solve (about ``block`` eager iterations of Python time, no GPU work) and
``block`` images kept in static memory; worth it for solves of many iterations of a small map.
Unmeasured on a GPU so far: ``scripts/gpu_check.py`` times it against the eager loop.
"""

from __future__ import annotations

from typing import Any, Callable, List, Optional, Tuple

import torch
from torch import Tensor

GRAPH_BLOCK = 8
"""Iterations captured in one graph (and read by the host once per replay)."""


class NotCapturable(RuntimeError):
    """The map could not be captured in a CUDA graph (the message says why)."""


class GraphBlock:
    """``block`` forward FPI iterations of ``call`` captured once, replayed per window.

    Args:
        call: the map on full-batch flat states, ``call(z) -> f(z)`` (``(B, N)``).
        z0: ``(B, N)`` CUDA tensor, the shape, dtype and device of every iterate.
        damping: FPI's step weight.
        relative: also record ``||f(z)||`` (the relative residual's denominator).
        block: iterations per replay.

    Raises:
        NotCapturable: capture failed (the map synchronises with the host, or CUDA refused).
    """

    def __init__(self, call: Callable[[Tensor], Tensor], z0: Tensor, damping: float, relative: bool,
                 block: int = GRAPH_BLOCK) -> None:
        self._buffers(z0, damping, relative, block)
        self.graph: Any = torch.cuda.CUDAGraph()
        side = torch.cuda.Stream(device=z0.device)
        side.wait_stream(torch.cuda.current_stream(z0.device))
        try:
            with torch.cuda.stream(side):
                call(self.z_in)  # warm-up: lazy initialisations happen outside the capture
            torch.cuda.current_stream(z0.device).wait_stream(side)
            with torch.cuda.graph(self.graph):
                self._body(call)
        except Exception as err:  # noqa: BLE001 - any capture failure means: run eagerly
            torch.cuda.synchronize(z0.device)
            raise NotCapturable(f"{type(err).__name__}: {err}") from err

    def _buffers(self, z0: Tensor, damping: float, relative: bool, block: int) -> None:
        """The static memory the graph reads and writes."""
        self.block = block
        self.damping = damping
        self.relative = relative
        shape = tuple(z0.shape)
        self.z_in = torch.empty_like(z0)
        self.z_in.copy_(z0)
        self.iterates = torch.empty((block,) + shape, dtype=z0.dtype, device=z0.device)
        self.images = torch.empty((block,) + shape, dtype=z0.dtype, device=z0.device)
        self.norms = torch.empty((2 * block, shape[0]), dtype=z0.dtype, device=z0.device)
        self.z_out = torch.empty_like(z0)

    def _body(self, call: Callable[[Tensor], Tensor]) -> None:
        """The captured work: ``block`` iterations from ``z_in`` into the static buffers."""
        z = self.z_in
        b = self.block
        for j in range(b):
            fz = call(z)
            self.iterates[j].copy_(z)
            self.images[j].copy_(fz)
            diff = fz - z
            torch.linalg.vector_norm(diff, dim=1, out=self.norms[j])
            if self.relative:
                torch.linalg.vector_norm(fz, dim=1, out=self.norms[b + j])
            z = fz if self.damping == 1.0 else torch.lerp(z, fz, self.damping)
        self.z_out.copy_(z)

    def run(self, z: Tensor) -> Tuple[List[Tensor], List[Tensor], List[Tensor], Optional[List[Tensor]], Tensor]:
        """Replay from ``z``: ``(iterates, images, a rows, n rows or None, next iterate)``, copies
        the caller owns (the static buffers are overwritten by the next replay)."""
        self.z_in.copy_(z)
        self.graph.replay()
        its, ims = self.iterates.clone(), self.images.clone()
        norms = self.norms.clone()
        b = self.block
        a = list(norms[:b].unbind(0))
        n = list(norms[b:].unbind(0)) if self.relative else None
        return list(its.unbind(0)), list(ims.unbind(0)), a, n, self.z_out.clone()


def check_graph_options(solver: Any, compact: bool, records_forward: bool) -> None:
    """Raise ``ValueError`` for option combinations ``cuda_graph=True`` does not support."""
    from torchfpi._solvers import FPI

    if not isinstance(solver, FPI):
        raise ValueError(
            f"cuda_graph=True captures plain or damped FPI only (solver='fpi' or torchfpi.FPI(...)), "
            f"got solver {type(solver).__name__}; use cuda_graph=False with this solver"
        )
    if compact:
        raise ValueError("cuda_graph=True needs compact=False: a captured graph has fixed shapes")
    if records_forward:
        raise ValueError("cuda_graph=True cannot record the forward iterations (backward='unroll'); "
                         "use an implicit backward such as 'fpi'")


def check_graph_device(z: Tensor) -> None:
    """Raise ``ValueError`` unless ``z`` is a CUDA tensor and CUDA graphs are available."""
    if z.device.type != "cuda":
        raise ValueError(
            f"cuda_graph=True needs the state on a CUDA device, got z0 on {z.device}; "
            "move z0 and the inputs to the GPU or use cuda_graph=False"
        )
