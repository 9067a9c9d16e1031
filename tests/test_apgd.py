"""APGD and APGD-T: against Algorithm 1 written out per image, the checkpoint schedule, the exact
robust accuracy of a linear model, PGD on a trained model, the options and bad input."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pyadvk.attacks.apgd import APGD, APGDT, checkpoints, dlr_loss, dlr_loss_targeted
from pyadvk.attacks.pgd import PGD
from pyadvk.ops import apgd as apgd_ops
from pyadvk.ops import random_init
from tests.conftest import available

BACKENDS = available(apgd_ops.APGD_STEP, "cpu")


def small_cnn(seed=0, classes=10):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(8 * 4 * 4, classes)
    ).eval()


def batch(model, n=8, seed=1, wrong=1):
    """Images in [0, 1] and labels: the model's own predictions, with the first ``wrong`` changed."""
    gen = torch.Generator().manual_seed(seed)
    images = torch.rand(n, 3, 8, 8, generator=gen)
    with torch.no_grad():
        labels = model(images).argmax(1)
    labels[:wrong] = (labels[:wrong] + 1) % 10
    return images, labels


def norms(delta: torch.Tensor, norm: str) -> torch.Tensor:
    flat = delta.reshape(len(delta), -1)
    return flat.abs().amax(1) if norm == "linf" else flat.norm(dim=1)


def assert_in_ball_and_box(adv, images, eps, norm, lower=0.0, upper=1.0):
    assert adv.shape == images.shape and adv.dtype == images.dtype
    eps = torch.as_tensor(eps, dtype=torch.float32).expand(len(images))
    assert (norms((adv - images).float(), norm) <= eps * (1 + 1e-6) + 1e-7).all()
    assert adv.min() >= lower and adv.max() <= upper


# ---------------------------------------------------------------------------------------------
# Algorithm 1, one image at a time with Python scalars: the oracle for the vectorized bookkeeping.


def paper_checkpoints(steps):
    p = [0.0, 0.22]
    while True:
        nxt = p[-1] + max(p[-1] - p[-2] - 0.03, 0.06)
        if round(nxt, 9) > 1:
            break
        p.append(nxt)
    return sorted({math.ceil(round(q * steps, 9)) for q in p})


def project(v, x0, eps, norm):
    if norm == "linf":
        return torch.minimum(torch.maximum(v, x0 - eps), x0 + eps).clamp(0, 1)
    d = v - x0
    n = d.double().norm()
    if n > eps:
        d = d * float(eps / n)
    return (x0 + d).clamp(0, 1)


def direction(g, norm):
    if norm == "linf":
        return g.sign()
    n = g.double().norm()
    return (g.double() / n).float() if n > 0 else torch.zeros_like(g)


def algorithm1(model, objective, x0, labels, eps, norm, steps, rho, start):
    """One APGD run per image; returns (points, found, best objective, halvings): the last
    misclassified iterate where one was, else the best point; and how many times eta was halved
    by condition (1), and by condition (2) alone."""

    def evaluate(x):
        x = x.clone().requires_grad_(True)
        logits = model(x)
        loss = objective(logits)
        (g,) = torch.autograd.grad(loss.sum(), x)
        return loss.tolist(), (logits.argmax(1) != labels).tolist(), g

    marks = paper_checkpoints(steps)
    window = {w: w - v for v, w in zip(marks, marks[1:]) if w < steps}
    n = len(x0)
    x, x_prev = start.clone(), start.clone()
    f, wrong, g = evaluate(x)
    eta = [2 * eps] * n
    f_max, x_max, g_max = list(f), x.clone(), g.clone()
    found, x_found = list(wrong), x.clone()
    count, reduced, f_max_last, halvings = [0] * n, [False] * n, list(f), [0, 0]
    for k in range(steps):
        a = 1.0 if k == 0 else 0.75
        new = torch.empty_like(x)
        for b in range(n):
            z = project(x[b] + torch.tensor(eta[b]) * direction(g[b], norm), x0[b], eps, norm)
            new[b] = project(x[b] + a * (z - x[b]) + (1 - a) * (x[b] - x_prev[b]), x0[b], eps, norm)
        x_prev, x = x, new
        f_new, wrong, g = evaluate(x)
        for b in range(n):
            count[b] += f_new[b] > f[b]
            f[b] = f_new[b]
            if f[b] > f_max[b]:
                f_max[b], x_max[b], g_max[b] = f[b], x[b], g[b]
            if wrong[b]:
                found[b], x_found[b] = True, x[b]
        if k + 1 in window:
            for b in range(n):
                few_increases = count[b] < rho * window[k + 1]
                stalled = few_increases or (not reduced[b] and f_max[b] <= f_max_last[b])
                if stalled:
                    eta[b] /= 2
                    x[b], g[b], f[b] = x_max[b], g_max[b], f_max[b]
                    halvings[0 if few_increases else 1] += 1
                reduced[b], f_max_last[b], count[b] = stalled, f_max[b], 0
    points = torch.stack([x_found[b] if found[b] else x_max[b] for b in range(n)])
    return points, found, f_max, halvings


def reference_apgd(model, images, labels, *, norm, eps, steps, loss, rho=0.75, seed=0, restarts=1, targets=(None,)):
    """APGD/APGD-T around ``algorithm1``: clean-misclassified images untouched, each later run only
    on images no earlier run broke, starts drawn from one generator seeded with ``seed``."""
    with torch.no_grad():
        todo = model(images).argmax(1) == labels
    adv, gen, halvings = images.clone(), torch.Generator().manual_seed(seed), [0, 0]
    best = torch.full((len(images),), -math.inf)
    for target in targets:
        for _ in range(restarts):
            idx = todo.nonzero().squeeze(1)
            if not len(idx):
                return adv, halvings
            x0, y = images[idx], labels[idx]
            t = None if target is None else target[idx]
            start = random_init(x0, eps=eps, norm=norm, generator=gen, backend="torch")
            objectives = {
                "ce": lambda z, y=y: F.cross_entropy(z, y, reduction="none"),
                "dlr": lambda z, y=y: dlr_loss(z, y),
                "dlr-t": lambda z, y=y, t=t: dlr_loss_targeted(z, y, t),
            }
            points, found, f, n = algorithm1(model, objectives[loss], x0, y, eps, norm, steps, rho, start)
            halvings = [h + m for h, m in zip(halvings, n)]
            for j, i in enumerate(idx.tolist()):
                if found[j] or f[j] > best[i]:
                    adv[i], best[i] = points[j], math.inf if found[j] else f[j]
                todo[i] = not found[j]
    return adv, halvings


def test_checkpoints_are_the_papers():
    assert checkpoints(100) == [0, 22, 41, 57, 70, 80, 87, 93, 99]
    for steps in (1, 2, 5, 12, 37, 100, 1000):
        w = checkpoints(steps)
        assert w == paper_checkpoints(steps), steps
        assert w[0] == 0 and w == sorted(set(w)) and w[-1] <= steps


@pytest.mark.parametrize(
    "norm, eps, loss, steps, rho",
    [
        # steps=12: checkpoints 3, 5, 7, 9, 10, 11 (most iterations end at one); rho=0.5 makes
        # rho * window an integer (the condition is "fewer than", not "at most")
        ("linf", 1 / 32, "ce", 12, 0.75),
        ("linf", 1 / 32, "dlr", 12, 0.5),
        ("l2", 0.125, "ce", 12, 0.5),
        ("l2", 0.125, "dlr", 12, 0.75),
        ("linf", 1 / 128, "ce", 40, 0.75),
    ],
)
def test_apgd_matches_algorithm_1(norm, eps, loss, steps, rho, one_thread):
    model = small_cnn()
    images, labels = batch(model)
    ours = APGD(model, norm=norm, eps=eps, steps=steps, loss=loss, rho=rho, seed=3, backend="torch")(images, labels)
    ref, halvings = reference_apgd(model, images, labels, norm=norm, eps=eps, steps=steps, loss=loss, rho=rho, seed=3)
    assert halvings[0] > 0 and (rho == 0.75 or halvings[1] > 0)  # both conditions were exercised
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-6)
    assert torch.equal(ours[0], images[0])  # misclassified unperturbed: returned as is


def test_restarts_and_apgdt_match_algorithm_1(one_thread):
    model = small_cnn()
    images, labels = batch(model, n=6)
    ours = APGD(model, norm="linf", eps=1 / 64, steps=10, restarts=2, seed=5, backend="torch")(images, labels)
    ref, _ = reference_apgd(model, images, labels, norm="linf", eps=1 / 64, steps=10, loss="ce", restarts=2, seed=5)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-6)

    with torch.no_grad():
        others = model(images).scatter(1, labels[:, None], -math.inf)
    order = others.argsort(1, descending=True)
    kw = dict(norm="l2", eps=1 / 8, steps=10, seed=2)
    ours = APGDT(model, n_target_classes=3, backend="torch", **kw)(images, labels)
    ref, _ = reference_apgd(model, images, labels, loss="dlr-t", targets=[order[:, i] for i in range(3)], **kw)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("norm, eps", [("linf", 1 / 32), ("l2", 1 / 8)])
def test_every_body_of_the_step(backend, norm, eps, one_thread):
    # The comparisons with Algorithm 1 pin the torch body (the definition of the step); the other
    # bodies match it to rounding, which a few sign steps do not amplify on this model.
    model = small_cnn()
    images, labels = batch(model)
    ours = APGD(model, norm=norm, eps=eps, steps=4, backend=backend)(images, labels)
    assert_in_ball_and_box(ours, images, eps, norm)
    torch.testing.assert_close(ours, APGD(model, norm=norm, eps=eps, steps=4, backend="torch")(images, labels))


# ---------------------------------------------------------------------------------------------
# Closed form: a linear model on inputs in [0.3, 0.7], where the box is never active.


def linear_case(norm, n=64, classes=5, seed=0):
    """A linear model, images it classifies as their labels, the exact distance of each to the
    nearest boundary (``min_j (z_y - z_j) / ||w_y - w_j||_q``, q the dual norm) and an eps
    half-way between the two middle distances, so half the images are exactly robust."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, classes)).eval()
    images = 0.3 + 0.4 * torch.rand(n, 3, 8, 8)
    with torch.no_grad():
        logits = model(images)
    labels = logits.argmax(1)
    w = model[1].weight.detach()
    dw = w[None] - w[labels][:, None]  # (n, C, D): w_j - w_y
    gap = logits.gather(1, labels[:, None]) - logits  # z_y - z_j
    dist = gap / (dw.abs().sum(-1) if norm == "linf" else dw.norm(dim=-1))
    dist = dist.scatter(1, labels[:, None], math.inf)
    nearest, j = dist.min(1)
    # the minimal perturbations stay inside [0, 1]: the box never binds
    u = dw[torch.arange(n), j]
    delta = nearest[:, None] * (u.sign() if norm == "linf" else u / u.norm(dim=1, keepdim=True))
    assert ((images.reshape(n, -1) + delta).abs() <= 1).all() and ((images.reshape(n, -1) + delta) >= 0).all()
    middle = nearest.sort().values[n // 2 - 1 : n // 2 + 1]
    eps = float(middle.mean())
    return model, images, labels, eps, int((nearest > eps).sum())


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_linear_model_exact_robust_accuracy(norm, one_thread):
    model, images, labels, eps, exact = linear_case(norm)
    assert exact == 32

    def robust(attack):
        adv = attack(images, labels)
        assert_in_ball_and_box(adv, images, eps, norm)
        with torch.no_grad():
            return int((model(adv).argmax(1) == labels).sum())

    # APGD-T tries every other class with the targeted DLR loss: it finds every boundary in reach.
    assert robust(APGDT(model, norm=norm, eps=eps, n_target_classes=4)) == exact
    # No attack inside the ball can do better than the exact value; DLR reaches it here (measured
    # 0 images over), cross-entropy is weaker on this 5-class model (measured 3 (linf) and 4 (l2)
    # of 64 over the exact 32, the same as PGD-100 with a tenth of eps per step): its gradient
    # weighs all classes by their softmax instead of pointing at the nearest boundary.
    dlr = robust(APGD(model, norm=norm, eps=eps, loss="dlr"))
    ce = robust(APGD(model, norm=norm, eps=eps, loss="ce"))
    assert exact <= dlr <= exact + 1
    assert exact <= ce <= exact + 5


# ---------------------------------------------------------------------------------------------
# Stronger than PGD on a trained model.


@pytest.mark.slow
def test_apgd_no_weaker_than_pgd20_on_adversarially_trained_digits(one_thread):
    from pyadvk.data import digits

    train, test = digits(8, "train").tensors, digits(8, "test").tensors
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    train_attack = PGD(model, eps=0.1, alpha=0.04, steps=3)
    for epoch in range(30):  # 5 clean epochs, then PGD-3 adversarial training (about 3 s)
        for i in range(0, len(train[0]), 128):
            images, labels = train[0][i : i + 128], train[1][i : i + 128]
            images = train_attack(images, labels) if epoch >= 5 else images
            opt.zero_grad()
            F.cross_entropy(model(images), labels).backward()
            opt.step()
    model.eval()
    images, labels = test[0][:200], test[1][:200]

    def correct(x):
        with torch.no_grad():
            return model(x).argmax(1) == labels

    eps = 0.15
    start = torch.Generator().manual_seed(0)
    pgd = correct(PGD(model, eps=eps, alpha=eps / 4, steps=20, generator=start)(images, labels))
    ce = correct(APGD(model, norm="linf", eps=eps)(images, labels))
    dlr = correct(APGD(model, norm="linf", eps=eps, loss="dlr")(images, labels))
    targeted = correct(APGDT(model, norm="linf", eps=eps)(images, labels))
    results = dict(clean=correct(images), pgd=pgd, ce=ce, dlr=dlr, t=targeted)
    acc = {k: float(v.float().mean()) for k, v in results.items()}
    worst = float((ce & dlr & targeted).float().mean())
    print(acc, worst)
    # measured: clean 0.96, PGD-20 0.540, APGD-CE 0.525, APGD-DLR 0.560, APGD-T 0.505
    assert acc["clean"] > 0.9 and 0.2 < acc["pgd"] < 0.8  # an eps where the comparison means something
    assert acc["ce"] <= acc["pgd"] and acc["t"] < acc["pgd"] and worst < acc["pgd"]


# ---------------------------------------------------------------------------------------------
# The losses.


def test_dlr_losses_by_hand():
    logits = torch.tensor([[4.0, 1.0, 3.0, 0.0, -2.0], [1.0, 5.0, 2.0, 0.5, 0.0]])
    labels = torch.tensor([0, 0])
    # row 0: y = 0 is the top class, the best other is 3.0; sorted 4, 3, 1, 0
    # row 1: y = 0 (z_y = 1) is misclassified, the best other is 5.0; sorted 5, 2, 1, 0.5
    expected = torch.tensor([-(4.0 - 3.0) / (4.0 - 1.0), -(1.0 - 5.0) / (5.0 - 1.0)])
    torch.testing.assert_close(dlr_loss(logits, labels), expected, rtol=0, atol=1e-7)
    targets = torch.tensor([4, 2])
    expected_t = torch.tensor([-(4.0 + 2.0) / (4.0 - (1.0 + 0.0) / 2), -(1.0 - 2.0) / (5.0 - (1.0 + 0.5) / 2)])
    torch.testing.assert_close(dlr_loss_targeted(logits, labels, targets), expected_t, rtol=0, atol=1e-7)


def test_dlr_sign_and_invariance():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(50, 10, generator=gen)
    labels = torch.randint(0, 10, (50,), generator=gen)
    targets = (labels + 1 + torch.randint(0, 9, (50,), generator=gen)) % 10
    loss = dlr_loss(logits, labels)
    assert torch.equal(loss > 0, logits.argmax(1) != labels)
    torch.testing.assert_close(dlr_loss(3.0 * logits - 7.0, labels), loss, rtol=1e-5, atol=1e-6)
    loss_t = dlr_loss_targeted(logits, labels, targets)
    z_t, z_y = logits.gather(1, targets[:, None]).squeeze(1), logits.gather(1, labels[:, None]).squeeze(1)
    assert torch.equal(loss_t > 0, z_t > z_y)
    torch.testing.assert_close(dlr_loss_targeted(2.0 * logits + 1.0, labels, targets), loss_t, rtol=1e-5, atol=1e-6)
    assert dlr_loss(logits.half(), labels).dtype == torch.float32


def test_dlr_bad_input():
    logits, labels = torch.randn(4, 10), torch.zeros(4, dtype=torch.int64)
    with pytest.raises(ValueError, match="at least 3 classes"):
        dlr_loss(torch.randn(4, 2), labels)
    with pytest.raises(ValueError, match="at least 4 classes"):
        dlr_loss_targeted(torch.randn(4, 3), labels, labels)
    with pytest.raises(ValueError, match=r"labels must have shape \(4,\)"):
        dlr_loss(logits, labels[:3])
    with pytest.raises(TypeError, match="targets must be an int64 tensor"):
        dlr_loss_targeted(logits, labels, labels.float())
    with pytest.raises(ValueError, match=r"logits must have shape \(B, C\)"):
        dlr_loss(logits[None], labels)


# ---------------------------------------------------------------------------------------------
# Invariants and options.


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_results_in_ball_and_box_per_image_eps(norm, one_thread):
    model = small_cnn()
    images, labels = batch(model, n=6)
    eps = torch.tensor([0.1, 0.0, 0.01, 0.05, 0.2, 1.0]) * (1 if norm == "linf" else 4)
    adv = APGD(model, norm=norm, eps=eps, steps=10, loss="dlr")(images, labels)
    assert_in_ball_and_box(adv, images, eps, norm)
    assert torch.equal(adv[:2], images[:2])  # misclassified unperturbed; eps = 0
    # another input range
    shifted = APGDT(lambda x: model(x + 1.0), norm=norm, eps=eps, steps=10, n_target_classes=2, lower=-1.0, upper=0.0)
    adv = shifted(images - 1.0, labels)
    assert_in_ball_and_box(adv, images - 1.0, eps, norm, lower=-1.0, upper=0.0)


def test_mode_and_parameter_grads_untouched(one_thread):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(192, 32), nn.Dropout(0.1), nn.ReLU(), nn.Linear(32, 10))
    images, labels = torch.rand(5, 3, 8, 8), torch.arange(5)
    for training in (True, False):
        model.train(training)
        for attack in (APGD(model, eps=0.03, steps=5, eot_iter=2), APGDT(model, eps=0.03, steps=5, n_target_classes=2)):
            adv = attack(images, labels)
            assert_in_ball_and_box(adv, images, 0.03, "linf")
            assert model.training is training
            assert all(p.grad is None for p in model.parameters())
            assert not adv.requires_grad


@pytest.mark.parametrize("cls", [APGD, APGDT])
def test_seeded_and_reproducible(cls, one_thread):
    model = small_cnn()
    images, labels = batch(model, n=6, wrong=0)
    kw = dict(norm="l2", eps=0.5, steps=8) | ({"n_target_classes": 2} if cls is APGDT else {})
    first = cls(model, seed=4, **kw)(images, labels)
    assert torch.equal(cls(model, seed=4, **kw)(images, labels), first)
    assert not torch.equal(cls(model, seed=5, **kw)(images, labels), first)


def test_restarts_attack_only_the_images_still_standing(one_thread):
    model = small_cnn()
    sizes = []

    def counted(x):
        sizes.append(len(x))
        return model(x)

    images, labels = batch(model, n=16, wrong=0)
    kw = dict(norm="l2", eps=0.2, steps=1, seed=1)  # one step: the random start matters
    one = APGD(model, restarts=1, **kw)(images, labels)
    five = APGD(counted, restarts=5, **kw)(images, labels)
    with torch.no_grad():
        broken_one, broken_five = model(one).argmax(1) != labels, model(five).argmax(1) != labels
    assert (broken_five >= broken_one).all() and broken_five.sum() > broken_one.sum()  # measured 13 -> 14 of 16
    # the first run is the same: its successes come back unchanged
    assert torch.equal(five[broken_one], one[broken_one])
    # clean pass, then per run (steps + 1) evaluations of the images no run has broken yet
    runs = sizes[1:]
    assert sizes[0] == 16 and runs[:2] == [16, 16] and runs[2] == 16 - int(broken_one.sum())
    assert all(a >= b for a, b in zip(runs, runs[1:])) and len(runs) <= 2 * 5


def test_eot_on_a_deterministic_model_changes_nothing(one_thread):
    model = small_cnn()
    images, labels = batch(model, n=6)
    kw = dict(norm="linf", eps=1 / 64, steps=8, loss="dlr")
    # (g + g) / 2 == g exactly
    assert torch.equal(APGD(model, eot_iter=2, **kw)(images, labels), APGD(model, **kw)(images, labels))


def test_eot_averages_the_gradient_of_a_randomized_model(one_thread):
    # Noise with a large mean offset at the input makes one pass's gradient direction unreliable;
    # averaging passes is what the "rand" version of AutoAttack relies on.
    torch.manual_seed(0)
    linear = nn.Sequential(nn.Flatten(), nn.Linear(192, 10)).eval()
    calls = []

    def noisy(x):
        calls.append(len(x))
        return linear(x + 0.05 * torch.randn_like(x))

    images = torch.rand(4, 3, 8, 8)
    with torch.no_grad():
        labels = linear(images).argmax(1)
    adv = APGD(noisy, eps=0.03, steps=4, eot_iter=5)(images, labels)
    assert_in_ball_and_box(adv, images, 0.03, "linf")
    assert len(calls) == 5 + 5 * (4 + 1)  # the clean evaluation, then steps + 1 evaluations, 5 passes each


def test_autocast_channels_last_and_int32_labels(one_thread):
    model = small_cnn()
    images, labels = batch(model, n=6)
    kw = dict(norm="linf", eps=1 / 32, steps=8)
    adv = APGD(model, channels_last=True, **kw)(images, labels.int())
    assert adv.is_contiguous(memory_format=torch.channels_last)
    assert_in_ball_and_box(adv, images, 1 / 32, "linf")
    # the same points as contiguous images where the model's arithmetic is the same (a channels_last
    # convolution rounds differently, and a sign step amplifies any difference)
    linear = nn.Sequential(nn.Flatten(), nn.Linear(192, 10)).eval()
    with torch.no_grad():
        labels = linear(images).argmax(1)
    eager = APGD(linear, **kw)(images, labels)
    torch.testing.assert_close(APGD(linear, channels_last=True, **kw)(images, labels.int()), eager, rtol=0, atol=0)
    adv = APGD(model, autocast=torch.bfloat16, **kw)(images, labels)
    assert_in_ball_and_box(adv, images, 1 / 32, "linf")
    assert adv.dtype == torch.float32
    adv = APGD(lambda x: model(x.float()), **kw)(images.half(), labels)  # float16 images
    assert adv.dtype == torch.float16
    assert_in_ball_and_box(adv.float(), images.half().float(), 1 / 32, "linf")


def test_empty_batch_and_nothing_to_attack(one_thread):
    model = small_cnn()
    images, labels = batch(model, n=3, wrong=3)
    assert torch.equal(APGD(model, eps=0.1, steps=3)(images, labels), images)
    empty = APGD(model, eps=0.1, steps=3)(images[:0], labels[:0])
    assert empty.shape == (0, 3, 8, 8)


def test_bad_input():
    model = small_cnn()
    images, labels = batch(model, n=2)
    cases = [
        (dict(norm="l1"), ValueError, "norm must be one of 'linf', 'l2'; got 'l1'"),
        (dict(eps=-0.1), ValueError, "eps must be >= 0.0, got -0.1"),
        (dict(steps=0), ValueError, "steps must be >= 1, got 0"),
        (dict(steps=2.5), TypeError, "steps must be an int, got float 2.5"),
        (dict(loss="cw"), ValueError, "loss must be one of 'ce', 'dlr'; got 'cw'"),
        (dict(rho=1.0), ValueError, r"rho must be in \(0, 1\), got 1.0"),
        (dict(rho=0), ValueError, r"rho must be in \(0, 1\), got 0.0"),
        (dict(restarts=0), ValueError, "restarts must be >= 1, got 0"),
        (dict(eot_iter=0), ValueError, "eot_iter must be >= 1, got 0"),
        (dict(seed=-1), ValueError, "seed must be >= 0, got -1"),
        (dict(autocast=torch.float64), ValueError, "autocast must be None"),
    ]
    for kwargs, error, message in cases:
        with pytest.raises(error, match=message):
            APGD(model, **({"eps": 0.1} | kwargs))
    with pytest.raises(ValueError, match="n_target_classes must be >= 1, got 0"):
        APGDT(model, eps=0.1, n_target_classes=0)
    with pytest.raises(ValueError, match=r"n_target_classes must be < the number of classes \(10\).*got 10"):
        APGDT(model, eps=0.1, n_target_classes=10)(images, labels)
    three = small_cnn(classes=3)
    with pytest.raises(ValueError, match="APGDT needs at least 4 classes.*got logits with 3"):
        APGDT(three, eps=0.1, n_target_classes=2)(images, labels % 3)
    two = small_cnn(classes=2)
    with pytest.raises(ValueError, match="loss='dlr' needs at least 3 classes.*got logits with 2"):
        APGD(two, eps=0.1, loss="dlr")(images, labels % 2)
    with pytest.raises(ValueError, match=r"cuda_graph=True needs CUDA images, got images on cpu"):
        APGD(model, eps=0.1, cuda_graph=True)(images, labels)
    with pytest.raises(ValueError, match=r"images must lie in \[lower, upper\]"):
        APGD(model, eps=0.1)(images + 1.0, labels)
    with pytest.raises(ValueError, match=r"labels must be class indices in \[0, 10\)"):
        APGD(model, eps=0.1)(images, labels + 10)
    with pytest.raises(ValueError, match="eps must be >= 0 for every sample, got -1.0 for sample 1"):
        APGD(model, eps=torch.tensor([0.1, -1.0]))(images, labels)
    with pytest.raises(ValueError, match=r"eps must be a float or a floating tensor of shape \(2,\)"):
        APGD(model, eps=torch.tensor([0.1, 0.1, 0.1]))(images, labels)


# ---------------------------------------------------------------------------------------------
# On a GPU (skipped without one).


@pytest.mark.gpu
@pytest.mark.parametrize("norm, eps", [("linf", 1 / 32), ("l2", 1 / 8)])
@pytest.mark.parametrize("cls", [APGD, APGDT])
def test_cuda_graph_replays_the_eager_iterations(cls, norm, eps):
    model = small_cnn()
    images, labels = (t.cuda() for t in batch(model, n=32))
    model.cuda()
    kw = dict(norm=norm, eps=eps, steps=25, restarts=2) | ({"n_target_classes": 3} if cls is APGDT else {})
    eager = cls(model, **kw)(images, labels)
    assert torch.equal(cls(model, **kw)(images, labels), eager)  # eager is deterministic: graphs can match it
    graphed = cls(model, cuda_graph=True, **kw)(images, labels)
    assert_in_ball_and_box(graphed.cpu(), images.cpu(), eps, norm)
    torch.testing.assert_close(graphed, eager, rtol=0, atol=0)


@pytest.mark.gpu
def test_fast_modes_on_gpu():
    model = small_cnn()
    images, labels = (t.cuda() for t in batch(model, n=64, wrong=0))
    model.cuda()
    kw = dict(norm="linf", eps=1 / 64, steps=50)
    exact = APGD(model, **kw)(images, labels)
    fast = APGD(model, autocast=torch.bfloat16, channels_last=True, cuda_graph=True, **kw)(images, labels)
    assert fast.is_contiguous(memory_format=torch.channels_last)
    assert_in_ball_and_box(fast.cpu(), images.cpu(), 1 / 64, "linf")
    with torch.no_grad():
        robust = [int((model(x).argmax(1) == labels).sum()) for x in (exact, fast)]
    assert abs(robust[0] - robust[1]) <= 3, robust  # bfloat16 arithmetic: a few images may differ
