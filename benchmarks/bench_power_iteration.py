"""Spectral norms of every Linear + Conv layer of a CIFAR ResNet-18 (pyadvk.models.resnet18):

* ``reshaped``: reshaped-kernel matrices, 1 power iteration, one batched
  :func:`pyadvk.ops.power_iteration` call (each body) vs a per-layer loop of the ops
  torch.nn.utils.parametrizations.spectral_norm runs (``mv``, normalize, ``mv``, normalize, then
  ``σ = vdot(u, mv(W, v))``);
* ``true-power``: true convolution operator norms on the layers' CIFAR input sizes, 1
  warm-started iteration (``spectral_norms(method="power", n_iters=1)``), next to one
  forward+backward of the network at batch 128 (16 with ``--quick``);
* ``gram``: the certified Gram bound (6 steps) for every layer, with the ratio bound / true norm
  per layer (true norm: 200 power iterations) in ``extra_info``;
* ``penalty``: ``LipschitzPenalty`` forward+backward (1 iteration; reshaped and power) next to a
  training step (forward, backward, SGD step) at batch 128 (16 with ``--quick``).

Run: ``pyadvk bench --ops power_iteration`` (or ``pytest benchmarks/bench_power_iteration.py
--benchmark-json=out.json``, then ``python benchmarks/summarize.py out.json``). The Gram bound
takes minutes on a 2-core CPU; ``--quick`` skips it.
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

from benchmarks.conftest import DEVICE, QUICK, call_times, impls, record, run_benchmark, sizes, sync
from pyadvk import models
from pyadvk.lipschitz import LipschitzPenalty, SpectralNormState, spectral_norms
from pyadvk.lipschitz import model as lip_model
from pyadvk.ops import power_iteration as power_iteration_op
from pyadvk.ops.power_iteration import POWER_ITERATION

INPUT = (3, 32, 32)
BATCH = 16 if QUICK else 128  # a batch-128 ResNet-18 step takes ~4 s on a 2-core CPU
SIZES = {"cifar-resnet18": INPUT}
SIZE = "cifar-resnet18"
pytestmark = pytest.mark.skipif(SIZE not in sizes(SIZES), reason="size not selected")


@functools.cache
def network():
    torch.manual_seed(0)
    net = models.resnet18().to(DEVICE)
    # trained-like BatchNorm statistics are irrelevant to the layer norms; eval for the bound
    return net


def layer_weights():
    return [(n, m.weight.detach()) for n, m in lip_model.layers_of(network())]


def torch_loop(mats, us, vs):
    """One step of torch.nn.utils.parametrizations.spectral_norm's power method per layer, plus
    its σ = vdot(u, mv(W, v)), layer after layer."""
    sigmas = []
    for i, w in enumerate(mats):
        us[i] = F.normalize(torch.mv(w, vs[i]), dim=0, eps=1e-12, out=us[i])
        vs[i] = F.normalize(torch.mv(w.H, us[i]), dim=0, eps=1e-12, out=vs[i])
        sigmas.append(torch.vdot(us[i], torch.mv(w, vs[i])))
    return sigmas


@functools.cache
def forward_backward_seconds() -> float:
    """Median seconds of one forward+backward of the network at BATCH (the yardstick)."""
    net = network().train()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(BATCH, *INPUT, generator=gen).to(DEVICE)
    y = torch.randint(0, 10, (BATCH,), generator=gen).to(DEVICE)
    return sorted(call_times(lambda: _fwd_bwd(net, x, y), repeats=3, warmup=1))[1]


def _vs_fwd_bwd(times) -> str:
    median = sorted(times)[len(times) // 2]
    return f"{100 * median / forward_backward_seconds():.1f}% of a batch-{BATCH} forward+backward"


@pytest.mark.parametrize("impl", impls(["loop", "torch", "cpp", "triton", "cuda"]))
def test_reshaped_norms(benchmark, impl):
    if impl != "loop":
        why = POWER_ITERATION.reason(impl, DEVICE.type)
        if why or (impl == "triton" and DEVICE.type == "cpu"):
            pytest.skip(why or "the Triton interpreter is not benchmarked")
    mats = [w.reshape(w.shape[0], -1) for _, w in layer_weights()]
    gen = torch.Generator().manual_seed(0)
    us = [torch.randn(m.shape[0], generator=gen).to(DEVICE) for m in mats]
    if impl == "loop":
        vs = [torch.randn(m.shape[1], generator=gen).to(DEVICE) for m in mats]

        def run():
            torch_loop(mats, us, vs)
    else:
        state = {"us": us}

        def run():
            _, state["us"], _ = power_iteration_op(mats, state["us"], 1, backend=impl)

    times = run_benchmark(benchmark, run, min_rounds=30)
    nbytes = sum(m.numel() * m.element_size() for m in mats)
    # one iteration reads every weight twice (W v, then Wᵀ u): the traffic floor
    record(
        benchmark,
        times,
        op="spectral_norms",
        case="reshaped, 1 iter",
        size=SIZE,
        shape=[len(mats), sum(m.numel() for m in mats)],
        impl=impl,
        bytes_moved=2 * nbytes,
        layers=len(mats),
    )


def _fwd_bwd(net, x, y):
    net.zero_grad(set_to_none=True)
    F.cross_entropy(net(x), y).backward()


def test_forward_backward(benchmark):
    net = network().train()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(BATCH, *INPUT, generator=gen).to(DEVICE)
    y = torch.randint(0, 10, (BATCH,), generator=gen).to(DEVICE)

    times = run_benchmark(benchmark, lambda: _fwd_bwd(net, x, y), min_rounds=3)
    record(
        benchmark,
        times,
        op="network",
        case="forward+backward",
        size=SIZE,
        shape=(BATCH, *INPUT),
        impl="torch",
        batch=BATCH,
    )


def test_training_step(benchmark):
    net = network().train()
    opt = torch.optim.SGD(net.parameters(), lr=0.0)  # lr 0: the weights stay as they are
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(BATCH, *INPUT, generator=gen).to(DEVICE)
    y = torch.randint(0, 10, (BATCH,), generator=gen).to(DEVICE)

    def run():
        _fwd_bwd(net, x, y)
        opt.step()

    times = run_benchmark(benchmark, run, min_rounds=3)
    record(
        benchmark,
        times,
        op="network",
        case="training step",
        size=SIZE,
        shape=(BATCH, *INPUT),
        impl="torch",
        batch=BATCH,
    )


def test_true_norms_one_iteration(benchmark):
    net = network()
    state = SpectralNormState(torch.Generator().manual_seed(0))
    spectral_norms(net, INPUT, "power", 5, state=state)  # warm

    times = run_benchmark(benchmark, lambda: spectral_norms(net, INPUT, "power", 1, state=state), min_rounds=5)
    record(
        benchmark,
        times,
        op="conv_operator_norms",
        case="true, 1 warm iter",
        size=SIZE,
        shape=INPUT,
        impl="power",
        note_cost=_vs_fwd_bwd(times),
    )


@functools.cache
def true_norms():
    state = SpectralNormState(torch.Generator().manual_seed(0))
    return {n: float(s) for n, s in spectral_norms(network(), INPUT, "power", 200, state=state).items()}


@pytest.mark.skipif(QUICK, reason="the Gram bound of a whole ResNet-18 takes minutes on a CPU")
def test_gram_bound(benchmark):
    net = network()
    out = {}

    def run():
        out.update(spectral_norms(net, INPUT, "gram", 6))
        sync()

    benchmark.pedantic(run, rounds=2, iterations=1, warmup_rounds=0)
    times = list(benchmark.stats.stats.data)
    exact = true_norms()
    reshaped = spectral_norms(net, None, "reshaped", 200)
    ratios = {n: float(out[n]) / exact[n] for n in exact}
    record(
        benchmark,
        times,
        op="conv_operator_norms",
        case="gram bound, 6 steps",
        size=SIZE,
        shape=INPUT,
        impl="gram",
        ratio_bound_over_true=ratios,
        true_norm=exact,
        gram_bound={n: float(s) for n, s in out.items()},
        reshaped_norm={n: float(s) for n, s in reshaped.items()},
        note_bound_over_true=f"{min(ratios.values()):.3f}–{max(ratios.values()):.3f}",
    )


@pytest.mark.parametrize("method", ["reshaped", "power"])
def test_penalty(benchmark, method):
    net = network().train()
    pen = LipschitzPenalty(net, INPUT, kind="hinge", target=1.0, n_iters=1, method=method, init_iters=5)

    times = run_benchmark(benchmark, lambda: pen().backward(), min_rounds=5)
    record(
        benchmark,
        times,
        op="lipschitz_penalty",
        case="fwd+bwd, 1 iter",
        size=SIZE,
        shape=INPUT,
        impl=method,
        note_cost=_vs_fwd_bwd(times),
    )
