"""Peak training memory of implicit FPI_GD against the unrolled energy, at equal iteration counts.

Each measurement runs in a fresh subprocess: the peak resident set size (``ru_maxrss``) after a few
training steps minus the resident size just before the first step (model, data and imports
already loaded), so only what the forward/backward of a training step allocates is counted. On
CPU PyTorch allocates with ``malloc``, so this is the real peak. Both models use the same energy,
the same batch, and the unrolled model runs exactly as many gradient steps as FPI_GD's forward
solve (which is fixed here with ``tol=1e-30`` so both do ``iterations`` steps).
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from typing import Any, Dict


def _rss_kib() -> int:
    with open("/proc/self/statm") as fh:
        pages = int(fh.read().split()[1])
    import os

    return pages * os.sysconf("SC_PAGE_SIZE") // 1024


def _child(spec: Dict[str, Any]) -> Dict[str, Any]:
    import torch

    from torchfpi.apps.denoise.energy import FoEEnergy
    from torchfpi.apps.denoise.models import FPIGDDenoiser, UnrolledDenoiser

    torch.set_num_threads(1)
    torch.manual_seed(0)
    n = int(spec["iterations"])
    energy = FoEEnergy(**spec.get("energy", {}))
    if spec.get("weights"):
        from torchfpi.apps._weights import read_weights

        state = read_weights(spec["weights"], "denoise", "torchfpi denoiser weights")["state_dict"]
        energy.load_state_dict({k[len("energy."):]: v for k, v in state.items() if k.startswith("energy.")})
    model: Any
    if spec["kind"] == "fpi_gd":
        model = FPIGDDenoiser(energy, tol=float(spec.get("tol") or 1e-30), max_iter=n)
    else:
        model = UnrolledDenoiser(energy, steps=n)
    b, c = int(spec["batch_size"]), int(spec["crop"])
    if spec.get("images"):  # real crops: the first 16 images of the folder
        from torchfpi.apps.denoise.train import random_batch, to_tensor
        from torchfpi.data.images import load_folder

        imgs = to_tensor(load_folder(spec["images"], limit=16))
        clean, noisy = random_batch(imgs, b, c, 25.0, torch.Generator().manual_seed(0))
    else:
        clean = torch.rand(b, 1, c, c)
        noisy = clean + 0.1 * torch.randn(b, 1, c, c)
    opt = torch.optim.SGD(model.parameters(), lr=1e-6)
    before = _rss_kib()
    t0 = time.perf_counter()
    for _ in range(int(spec.get("steps", 2))):
        loss = ((model(noisy) - clean) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    sec = (time.perf_counter() - t0) / int(spec.get("steps", 2))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return {"peak_step_mib": (peak - before) / 1024.0, "seconds_per_step": sec,
            "forward_iterations": model.last_info.iterations,
            "backward_iterations": model.last_info.backward_iterations()
            if spec["kind"] == "fpi_gd" else None}


def measure_training_memory(
    kind: str, iterations: int, batch_size: int = 8, crop: int = 64, steps: int = 2,
    energy: Dict[str, Any] | None = None, weights: str | None = None, tol: float | None = None,
    images: str | None = None,
) -> Dict[str, Any]:
    """Peak extra memory (MiB) and time of a training step of ``kind`` in a fresh subprocess.

    Args:
        kind: ``"fpi_gd"`` (implicit gradient) or ``"unrolled"`` (backprop through all steps).
        iterations: forward iterations of FPI_GD, and gradient steps of the unrolled model.
        weights: optional weights file whose energy is loaded (else the initial energy).
        tol: optional forward/backward tolerance of FPI_GD (then ``iterations`` is a limit).
        images: optional folder of PNGs to crop the batch from (noise sigma 25), else random
            images.
    """
    if kind not in ("fpi_gd", "unrolled"):
        raise ValueError(f"kind: expected 'fpi_gd' or 'unrolled', got '{kind}'")
    spec = {"kind": kind, "iterations": iterations, "batch_size": batch_size, "crop": crop,
            "steps": steps, "energy": energy or {}, "weights": weights, "tol": tol,
            "images": images}
    code = ("import json,sys; from torchfpi.apps.denoise.memory import _child; "
            "print(json.dumps(_child(json.loads(sys.argv[1]))))")
    out = subprocess.run([sys.executable, "-c", code, json.dumps(spec)], capture_output=True,
                         text=True, check=True)
    res = json.loads(out.stdout.strip().splitlines()[-1])
    res.update({"kind": kind, "iterations": iterations, "batch_size": batch_size, "crop": crop})
    return res
