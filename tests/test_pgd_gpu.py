"""The cuda and triton bodies of the PGD ops on a GPU, against the torch reference (skipped
without a GPU): fresh random cases, CIFAR and ImageNet sizes in every dtype and layout, per-sample
eps, in place, random starts, determinism, no host sync in a loop of steps, a second GPU, more
than 2^31 elements, opcheck of every op, Inductor, and the attacks (torchattacks' images, the CUDA
graph against eager, the fast mode's robust accuracy).

The ten-step equality tests run with deterministic algorithms (cuDNN and cuBLAS included): a
pass must not be luck. Their models avoid the layers that have no deterministic CUDA backward
(adaptive average pooling): torch then raises instead of running a non-deterministic kernel."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import given
from torch import nn

from benchmarks import baselines
from pyadvk.attacks import PGD, PGDL2
from pyadvk.ops import pgd as pgd_ops
from pyadvk.ops import pgd_step, pgd_step_, random_init
from tests.utils import assert_matches_reference, per_sample, pgd_inputs, pgd_step_args, pgd_step_cases

# cuBLAS picks deterministic GEMM workspaces only when this is set before its first use
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

pytestmark = pytest.mark.gpu
GPU_BACKENDS = ["cuda", "triton"]
SIZES = [(128, 3, 32, 32), (256, 3, 224, 224), (3, 3, 223, 221)]
TWO_GPUS = torch.cuda.is_available() and torch.cuda.device_count() >= 2


@pytest.fixture
def deterministic():
    """Deterministic algorithms (errors for ops without one), cuDNN deterministic, no autotuning."""
    before = (
        torch.are_deterministic_algorithms_enabled(),
        torch.backends.cudnn.deterministic,
        torch.backends.cudnn.benchmark,
    )
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    yield
    torch.use_deterministic_algorithms(before[0])
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = before[1], before[2]


def gpu_inputs(shape, dtype, seed, device="cuda"):
    """[x_adv, x_orig, grad] as pgd_inputs draws them, drawn on the GPU (large sizes)."""
    gen = torch.Generator(device).manual_seed(seed)
    x_orig = torch.rand(shape, generator=gen, device=device)
    x_adv = (x_orig + 0.1 * (2 * torch.rand(shape, generator=gen, device=device) - 1)).clamp_(0, 1)
    grad = torch.randn(shape, generator=gen, device=device)
    grad[torch.rand(shape, generator=gen, device=device) < 0.05] = 0.0
    return [t.to(dtype) for t in (x_adv, x_orig, grad)]


def step_kw(norm, batch, per_sample_eps, device="cuda"):
    eps, alpha = (0.03, 0.01) if norm == "linf" else (0.5, 0.1)
    if per_sample_eps:
        eps, alpha = per_sample(eps, batch, 3, device), per_sample(alpha, batch, 4, device)
    return dict(eps=eps, alpha=alpha, norm=norm)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@given(**pgd_step_cases)
def test_step_matches_reference_on_gpu(backend, **case):
    (x_adv, x_orig, grad), kw = pgd_step_args(**case, device="cuda")
    ref = pgd_step(x_adv, x_orig, grad, backend="torch", **kw)
    assert_matches_reference(pgd_step(x_adv, x_orig, grad, backend=backend, **kw), ref, what=backend)
    pgd_step_(x_adv, x_orig, grad, backend=backend, **kw)
    assert_matches_reference(x_adv, ref, what=f"{backend} in place")


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("norm", pgd_ops.NORMS)
@pytest.mark.parametrize("per_sample_eps", [False, True])
@pytest.mark.parametrize("shape", SIZES)
def test_large_shapes(backend, dtype, norm, per_sample_eps, shape):
    """Out of place and in place, contiguous and channels_last (kept), at CIFAR and ImageNet sizes."""
    x_adv, x_orig, grad = gpu_inputs(shape, dtype, 0)
    kw = step_kw(norm, shape[0], per_sample_eps)
    ref = pgd_step(x_adv, x_orig, grad, backend="torch", **kw)
    assert_matches_reference(pgd_step(x_adv, x_orig, grad, backend=backend, **kw), ref, what=f"{backend} {shape}")
    cl = [t.contiguous(memory_format=torch.channels_last) for t in (x_adv, x_orig, grad)]
    out = pgd_step(*cl, backend=backend, **kw)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert_matches_reference(out.contiguous(), ref, what=f"{backend} {shape} channels_last")
    returned = pgd_step_(cl[0], cl[1], cl[2], backend=backend, **kw)
    assert returned is cl[0] and cl[0].is_contiguous(memory_format=torch.channels_last)
    assert_matches_reference(cl[0].contiguous(), ref, what=f"{backend} {shape} channels_last in place")


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("norm", pgd_ops.NORMS)
@pytest.mark.parametrize("shape", [(8, 3, 32, 32), (512, 3, 32, 32), (256, 3, 224, 224)])
def test_random_init_on_gpu(backend, norm, shape):
    x = torch.rand(shape, device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    for eps in (0.1, per_sample(0.1, shape[0], 5, "cuda")):
        ref = random_init(x, eps=eps, norm=norm, generator=torch.Generator("cuda").manual_seed(0), backend="torch")
        out = random_init(x, eps=eps, norm=norm, generator=torch.Generator("cuda").manual_seed(0), backend=backend)
        assert_matches_reference(out, ref, what=f"{backend} random_init {shape}")


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("norm", pgd_ops.NORMS)
def test_bodies_are_deterministic(backend, norm):
    """The same inputs give the same bits on a second run (the l2 norms' partial sums too)."""
    x_adv, x_orig, grad = gpu_inputs((256, 3, 224, 224), torch.float32, 8)
    kw = step_kw(norm, 256, True)
    first = pgd_step(x_adv, x_orig, grad, backend=backend, **kw)
    assert torch.equal(pgd_step(x_adv, x_orig, grad, backend=backend, **kw), first)
    starts = [
        random_init(x_orig, eps=0.1, norm=norm, generator=torch.Generator("cuda").manual_seed(2), backend=backend)
        for _ in range(2)
    ]
    assert torch.equal(starts[0], starts[1])


def _loop(backend, norm, x, x_orig, grads, kw):
    gen = torch.Generator("cuda").manual_seed(3)
    x.copy_(random_init(x, eps=kw["eps"], norm=norm, generator=gen, backend=backend, check_values=False))
    for g in grads:
        pgd_step_(x, x_orig, g, backend=backend, check_values=False, **kw)
    return x


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("norm", pgd_ops.NORMS)
@pytest.mark.parametrize("per_sample_eps", [False, True])
def test_loop_of_steps_does_not_sync(backend, norm, per_sample_eps):
    """A random start and five steps (check_values=False) under set_sync_debug_mode("error")."""
    x_adv, x_orig, _ = gpu_inputs((64, 3, 32, 32), torch.float32, 6)
    grads = [torch.randn_like(x_adv) for _ in range(5)]
    kw = step_kw(norm, 64, per_sample_eps)
    expected = _loop("torch", norm, x_adv.clone(), x_orig, grads, kw)
    _loop(backend, norm, x_adv.clone(), x_orig, grads, kw)  # warm-up (compiles Triton)
    torch.cuda.synchronize()
    got = x_adv.clone()
    torch.cuda.set_sync_debug_mode("error")
    try:
        _loop(backend, norm, got, x_orig, grads, kw)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert_matches_reference(got, expected, what=f"{backend} five steps")


@pytest.mark.skipif(not TWO_GPUS, reason="needs two GPUs")
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("norm", pgd_ops.NORMS)
def test_tensors_on_the_second_gpu(backend, norm):
    """Tensors on cuda:1 while cuda:0 is current: every body launches on the tensors' device."""
    x_adv, x_orig, grad = gpu_inputs((16, 3, 32, 32), torch.float32, 9, device="cuda:1")
    kw = step_kw(norm, 16, True, device="cuda:1")
    ref = pgd_step(x_adv, x_orig, grad, backend="torch", **kw)
    with torch.cuda.device(0):
        out = pgd_step(x_adv, x_orig, grad, backend=backend, **kw)
        pgd_step_(x_adv, x_orig, grad, backend=backend, **kw)
        gen = torch.Generator("cuda:1").manual_seed(0)
        start = random_init(x_orig, eps=0.1, norm=norm, generator=gen, backend=backend)
    assert out.device == x_adv.device == start.device
    assert_matches_reference(out, ref, what=f"{backend} on cuda:1")
    assert_matches_reference(x_adv, ref, what=f"{backend} in place on cuda:1")
    gen = torch.Generator("cuda:1").manual_seed(0)
    assert_matches_reference(start, random_init(x_orig, eps=0.1, norm=norm, generator=gen, backend="torch"))


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("norm", pgd_ops.NORMS)
def test_more_than_2_31_elements(backend, norm):
    """Two float16 samples of 2^30 + 3 values: the second sample's offsets pass 2^31 (int64
    indexing). Each sample is compared with the torch body run on that sample alone."""
    n = 2**30 + 3
    free, _ = torch.cuda.mem_get_info()
    if free < 64 * 2**30:
        pytest.skip(f"needs ~64 GiB of free GPU memory, {free / 2**30:.0f} GiB free")
    x_adv, x_orig, grad = gpu_inputs((2, n), torch.float16, 10)
    kw = step_kw(norm, 2, True)
    out = pgd_step(x_adv, x_orig, grad, backend=backend, **kw)
    for i in (0, 1):
        part = {**kw, "eps": kw["eps"][i : i + 1], "alpha": kw["alpha"][i : i + 1]}
        ref = pgd_step(x_adv[i : i + 1], x_orig[i : i + 1], grad[i : i + 1], backend="torch", **part)
        assert_matches_reference(out[i : i + 1], ref, what=f"{backend} sample {i} of 2 x (2^30 + 3)")
        del ref
    pgd_step_(x_adv, x_orig, grad, backend=backend, **kw)
    assert torch.equal(x_adv, out)
    del x_adv, x_orig, grad, out
    torch.cuda.empty_cache()


@pytest.mark.parametrize("norm", pgd_ops.NORMS)
@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("suffix", ["", "_triton"])
def test_opcheck_gpu_ops(norm, inplace, suffix):
    x_adv, x_orig, grad = pgd_inputs((3, 2, 5, 5), torch.float32, 11, device="cuda")
    op = getattr(torch.ops.pyadvk, f"pgd_step_{norm}{suffix}{'_' if inplace else ''}").default
    torch.library.opcheck(op, (x_adv, x_orig, grad, 0.05, 0.01, None, None, 0.0, 1.0))
    per = torch.rand(3, device="cuda")
    torch.library.opcheck(op, (x_adv, x_orig, grad, 0.0, 0.0, per, per + 0.1, 0.0, 1.0))


@pytest.mark.parametrize("suffix", ["", "_triton"])
def test_opcheck_random_init_gpu(suffix):
    x = torch.rand(2, 3, 4, 4, device="cuda")
    op = getattr(torch.ops.pyadvk, f"random_init_linf{suffix}").default
    torch.library.opcheck(op, (x, torch.rand_like(x), 0.1, None, 0.0, 1.0))


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_inductor_compiles_the_step(backend):
    x_adv, x_orig, grad = pgd_inputs((16, 3, 32, 32), torch.float32, 2, device="cuda")

    def step(x_adv, x_orig, grad):
        pgd_step_(x_adv, x_orig, grad, eps=0.03, alpha=0.01, backend=backend)
        return pgd_step(x_adv, x_orig, grad, eps=0.5, alpha=0.1, norm="l2", backend=backend)

    expected_adv = x_adv.clone()
    expected = step(expected_adv, x_orig, grad)
    got_adv = x_adv.clone()
    got = torch.compile(step, fullgraph=True)(got_adv, x_orig, grad)
    torch.testing.assert_close(got_adv, expected_adv, rtol=0, atol=1e-6)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def small_cnn(batch_norm: bool = False) -> nn.Module:
    """Conv, (BatchNorm,) ReLU, Linear on 16x16 images: every layer has a deterministic backward."""
    torch.manual_seed(0)
    layers = [nn.Conv2d(3, 8, 3, padding=1)] + ([nn.BatchNorm2d(8)] if batch_norm else [])
    layers += [nn.ReLU(), nn.Flatten(), nn.Linear(8 * 16 * 16, 10)]
    return nn.Sequential(*layers).cuda().eval()


def _batch(n=32, seed=0):
    gen = torch.Generator("cuda").manual_seed(seed)
    return torch.rand(n, 3, 16, 16, device="cuda", generator=gen), torch.randint(
        0, 10, (n,), device="cuda", generator=gen
    )


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("cls, norm, eps, alpha", [(PGD, "linf", 8 / 255, 2 / 255), (PGDL2, "l2", 0.5, 0.1)])
def test_attacks_match_torchattacks_on_gpu(deterministic, backend, cls, norm, eps, alpha):
    model = small_cnn()
    images, labels = _batch()
    ours = cls(model, eps=eps, alpha=alpha, steps=10, random_start=False, backend=backend)(images, labels)
    theirs = baselines.torchattacks_pgd(model, images, labels, eps=eps, alpha=alpha, steps=10, norm=norm)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=2e-6)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_attack_runs_twice_the_same(deterministic, backend):
    """Same seed, model and images: the same adversarial images, bit for bit."""
    model = small_cnn(batch_norm=True)
    images, labels = _batch(64, 1)
    runs = [
        PGD(model, steps=10, backend=backend, generator=torch.Generator("cuda").manual_seed(4))(images, labels)
        for _ in range(2)
    ]
    assert torch.equal(runs[0], runs[1])


@pytest.mark.parametrize("norm", pgd_ops.NORMS)
@pytest.mark.parametrize("decay", [0.0, 1.0])
def test_cuda_graph_attack_equals_eager(deterministic, norm, decay):
    """The CUDA-graph attack replays exactly the eager steps (same images, same step count),
    also on later calls that replay the graph captured by the first one."""
    model = small_cnn(batch_norm=True)
    kw = dict(
        eps=8 / 255 if norm == "linf" else 0.5,
        alpha=2 / 255 if norm == "linf" else 0.1,
        steps=7,
        random_start=False,
        norm=norm,
        decay=decay,
    )
    graphed = PGD(model, cuda_graph=True, **kw)
    for seed in range(3):
        images, labels = _batch(32, seed)
        eager = PGD(model, **kw)(images, labels)
        torch.testing.assert_close(graphed(images, labels), eager, rtol=0, atol=1e-6)


@pytest.mark.parametrize("cuda_graph", [False, True])
def test_attack_steps_do_not_sync(monkeypatch, cuda_graph):
    """After the first step (which checks the logits against the labels, one sync) the steps of a
    PGD call run without a host sync; with cuda_graph=True, on a call that replays."""
    model = small_cnn(batch_norm=True)
    images, labels = _batch(64, 2)
    attack = PGD(model, steps=6, cuda_graph=cuda_graph)
    attack(images, labels)  # warm-up; captures the graph
    step = PGD._step

    def checked(self, *args, first=False):
        step(self, *args, first=first)
        if first:
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")

    monkeypatch.setattr(PGD, "_step", checked)
    try:
        out = attack(*_batch(64, 3))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(out).all()


def test_fast_mode_robust_accuracy_close_to_fp32():
    """The fast mode (bf16 autocast, channels_last, CUDA graph) against exact fp32 PGD-10 on a
    trained ResNet-18: robust accuracy within 0.5 points on 1,792 images (9 images), at an eps
    where the robust accuracy is neither near 0 nor near 1, so that images can flip either way."""
    from pyadvk import data, models

    torch.manual_seed(0)
    train = data.digits(size=16, split="train", channels=3)
    test = data.digits(size=16, split="test", channels=3)
    images = torch.cat([train.tensors[0], test.tensors[0]])[:1792].cuda()
    labels = torch.cat([train.tensors[1], test.tensors[1]])[:1792].cuda()
    model = models.resnet18(num_classes=10).cuda()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x_train, y_train = (t.cuda() for t in train.tensors)
    gen = torch.Generator("cuda").manual_seed(0)
    for _ in range(3):
        order = torch.randperm(len(y_train), device="cuda", generator=gen)
        for i in range(0, len(order), 128):
            batch = order[i : i + 128]
            loss = nn.functional.cross_entropy(model(x_train[batch]), y_train[batch])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    fast_model = models.resnet18(num_classes=10).cuda().eval()
    fast_model.load_state_dict(model.state_dict())
    fast_model = fast_model.to(memory_format=torch.channels_last)
    # the smallest eps of the ladder at which exact PGD-10 breaks a fifth of a first batch (a
    # standard-trained digits model: 2/255 left 96% of 512 training images standing on a CPU run)
    for eps in (2 / 255, 4 / 255, 8 / 255, 16 / 255, 32 / 255):
        kw = dict(eps=eps, alpha=eps / 4, steps=10, random_start=False)
        x, y = images[:512], labels[:512]
        with torch.no_grad():
            if (model(PGD(model, **kw)(x, y)).argmax(1) == y).float().mean() < 0.8:
                break
    exact_attack = PGD(model, **kw)
    fast_attack = PGD(fast_model, channels_last=True, autocast=torch.bfloat16, cuda_graph=True, **kw)
    correct_exact = correct_fast = correct_clean = 0
    for i in range(0, len(labels), 512):  # batches of 512, as the benchmark; the graph is reused
        x, y = images[i : i + 512], labels[i : i + 512]
        exact, fast = exact_attack(x, y), fast_attack(x, y)
        with torch.no_grad():
            correct_clean += int((model(x).argmax(1) == y).sum())
            correct_exact += int((model(exact).argmax(1) == y).sum())
            correct_fast += int((model(fast).argmax(1) == y).sum())
    n = len(labels)
    assert correct_clean / n > 0.9, f"the model did not train: clean accuracy {correct_clean / n:.3f}"
    assert 0.1 < correct_exact / n < 0.9, f"robust accuracy {correct_exact / n:.3f}: the comparison says little"
    assert abs(correct_exact - correct_fast) <= 0.005 * n, (correct_exact, correct_fast, n)
