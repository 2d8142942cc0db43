"""FPI layers inside DistributedDataParallel: 2 gloo processes == 1 process on the global batch."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

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


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    ctx = D.setup(torch.device("cpu"))
    try:
        params = _train(ctx)
        if ctx.is_main:
            torch.save(params, out)
    finally:
        D.teardown(ctx)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_processes_match_single_process(tmp_path):
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available")
    single = _train(D.DistContext())
    out = str(tmp_path / "params.pt")
    mp.spawn(_worker, args=(2, _free_port(), out), nprocs=2, join=True)
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
