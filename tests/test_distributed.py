"""FPI layers inside DistributedDataParallel: 2 gloo processes == 1 process on the global batch."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import torchfpi
from torchfpi.apps import _distributed as D

STEPS = 3
GLOBAL_BATCH = 8


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    feat = torch.nn.Linear(5, 6)
    layer = torchfpi.FPINN(torchfpi.MLPUpdate(4, 6, hidden=8, activation="tanh", spectral_norm=False),
                           tol=1e-12, max_iter=500)
    return torch.nn.Sequential(feat, layer).double()


def _data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(STEPS * GLOBAL_BATCH, 5, generator=g, dtype=torch.float64), torch.randn(
        STEPS * GLOBAL_BATCH, 4, generator=g, dtype=torch.float64
    )


def _train(ctx: D.DistContext) -> torch.Tensor:
    model = D.wrap(_model(), ctx)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = _data()
    for step in range(STEPS):
        rows = torch.arange(step * GLOBAL_BATCH, (step + 1) * GLOBAL_BATCH)[ctx.rank :: ctx.world_size]
        loss = ((model(x[rows]) - y[rows]) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return torch.cat([p.detach().flatten() for p in D.unwrap(model).parameters()])


def _worker(out: str) -> None:
    """One torchrun process (``python -m torch.distributed.run ... tests/test_distributed.py OUT``)."""
    torch.set_num_threads(1)
    with D.session(torch.device("cpu")) as ctx:
        params = _train(ctx)
        if ctx.is_main:
            torch.save(params, out)


def test_two_gloo_processes_match_single_process(tmp_path):
    # Launched the documented way, by torchrun: its agent hosts the rendezvous store, so no
    # worker's exit can pull the store from under a peer that is still leaving the group
    # (with mp.spawn, rank 0 hosts it, and a peer aborted at exit once in CI).
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available")
    single = _train(D.DistContext())
    out = str(tmp_path / "params.pt")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__, out]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    multi = torch.load(out)
    torch.testing.assert_close(multi, single, rtol=0, atol=1e-6)
    assert not torch.equal(single, torch.cat([p.detach().flatten() for p in _model().parameters()]))


def test_shard_is_a_partition_in_the_same_order():
    parts = [D.DistContext(rank=r, world_size=3).shard(10, epoch=2, seed=5) for r in range(3)]
    full = D.DistContext().shard(10, epoch=2, seed=5)
    assert sorted(torch.cat(parts).tolist()) == list(range(10))
    assert parts[0].tolist() == full[0::3].tolist()


def test_single_process_context_is_inert():
    ctx = D.setup(None)
    assert not ctx.distributed and ctx.is_main
    assert ctx.reduce_mean({"a": 2.0}) == {"a": 2.0}
    t = torch.ones(2)
    assert ctx.all_reduce_sum(t) is t


if __name__ == "__main__":
    _worker(sys.argv[1])
