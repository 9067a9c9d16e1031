"""Bad input to the PGD ops: a clear error naming the argument, the value and the expectation,
raised before anything is written."""

from __future__ import annotations

import math

import pytest
import torch

from pyadvk.ops import pgd as pgd_ops
from pyadvk.ops import pgd_step, pgd_step_, random_init
from tests.conftest import available

BACKENDS = available(pgd_ops.STEP, "cpu")


def _inputs(shape=(2, 3, 4)):
    x = torch.rand(shape)
    return x.clone(), x, torch.randn(shape)


CASES = [
    (dict(x_orig=torch.rand(2, 3, 5)), ValueError, r"x_orig must have the shape of x_adv \(2, 3, 4\), got \(2, 3, 5\)"),
    (
        dict(grad=torch.rand(2, 3, 4, dtype=torch.float64)),
        TypeError,
        "grad must be float32, float16 or bfloat16, got torch.float64",
    ),
    (
        dict(grad=torch.rand(2, 3, 4).half()),
        TypeError,
        r"grad must have the dtype of x_adv \(torch.float32\), got torch.float16",
    ),
    (
        dict(x_adv=torch.randint(0, 5, (2, 3, 4))),
        TypeError,
        "x_adv must be float32, float16 or bfloat16, got torch.int64",
    ),
    (dict(x_adv=[[0.0]]), TypeError, "x_adv must be a torch.Tensor, got list"),
    (dict(x_adv=torch.tensor(0.5)), ValueError, r"x_adv must have at least 1 dim\(s\), got shape \(\)"),
    (dict(eps=-0.1), ValueError, "eps must be >= 0.0, got -0.1"),
    (dict(eps=math.nan), ValueError, "eps must not be NaN"),
    (dict(alpha=0.0), ValueError, "alpha must be > 0.0, got 0.0"),
    (dict(alpha="0.1"), TypeError, "alpha must be a real number, got str '0.1'"),
    (dict(norm="l1"), ValueError, "norm must be one of 'linf', 'l2'; got 'l1'"),
    (dict(lower=1.0, upper=0.0), ValueError, "lower must be < upper, got lower=1.0, upper=0.0"),
    (dict(lower=0.5, upper=0.5), ValueError, "lower must be < upper"),
    (
        dict(eps=torch.ones(3)),
        ValueError,
        r"eps must be a float or a floating tensor of shape \(2,\) \(one value per sample\), "
        r"got a torch.float32 tensor of shape \(3,\)",
    ),
    (
        dict(eps=torch.ones(2, dtype=torch.long)),
        ValueError,
        r"eps must be a float or a floating tensor of shape \(2,\)",
    ),
    (dict(eps=torch.tensor([0.1, -0.2])), ValueError, "eps must be >= 0 for every sample, got -0.2.* for sample 1"),
    (dict(alpha=torch.tensor([0.1, 0.0])), ValueError, "alpha must be > 0 for every sample, got 0.0 for sample 1"),
    (dict(alpha=torch.tensor([math.nan, 0.1])), ValueError, "alpha must be > 0 for every sample, got nan for sample 0"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("change, error, match", CASES)
@pytest.mark.parametrize("inplace", [False, True])
def test_bad_arguments(backend, change, error, match, inplace):
    x_adv, x_orig, grad = _inputs()
    args = dict(x_adv=x_adv, x_orig=x_orig, grad=grad, eps=0.1, alpha=0.05, norm="linf", lower=0.0, upper=1.0)
    args.update(change)
    before = x_adv.clone()
    fn = pgd_step_ if inplace else pgd_step
    with pytest.raises(error, match=match):
        fn(args.pop("x_adv"), args.pop("x_orig"), args.pop("grad"), backend=backend, **args)
    assert torch.equal(x_adv, before), "a failed call changed x_adv"


def test_device_mismatch_is_reported():
    x_adv, x_orig, grad = _inputs()
    meta = torch.empty(2, 3, 4, device="meta")
    with pytest.raises(ValueError, match=r"x_orig must be on the device of x_adv \(cpu\), got meta"):
        pgd_step(x_adv, meta, grad, eps=0.1, alpha=0.1)


def test_random_init_bad_arguments():
    x = torch.rand(2, 3)
    with pytest.raises(ValueError, match="eps must be >= 0.0, got -1.0"):
        random_init(x, eps=-1.0)
    with pytest.raises(ValueError, match="norm must be one of"):
        random_init(x, eps=0.1, norm="linf2")
    with pytest.raises(TypeError, match="x must be float32"):
        random_init(x.long(), eps=0.1)


@pytest.mark.skipif("cpp" not in BACKENDS, reason="the C++ extension is not built")
def test_compiled_ops_check_their_arguments():
    """Called directly, the C++ bodies check with TORCH_CHECK and a message too."""
    x_adv, x_orig, grad = _inputs()
    op = torch.ops.pyadvk.pgd_step_linf
    with pytest.raises(
        RuntimeError, match=r"pgd_step_linf: grad must have the shape of x_adv \[2, 3, 4\], got \[2, 3\]"
    ):
        op(x_adv, x_orig, grad[:, :, 0], 0.1, 0.1, None, None, 0.0, 1.0)
    with pytest.raises(RuntimeError, match="pgd_step_linf: eps must be >= 0, got -1"):
        op(x_adv, x_orig, grad, -1.0, 0.1, None, None, 0.0, 1.0)
    with pytest.raises(RuntimeError, match="pgd_step_linf: alpha must be > 0, got 0"):
        op(x_adv, x_orig, grad, 0.1, 0.0, None, None, 0.0, 1.0)
    with pytest.raises(RuntimeError, match="pgd_step_linf: lower must be < upper, got lower=1, upper=0"):
        op(x_adv, x_orig, grad, 0.1, 0.1, None, None, 1.0, 0.0)
    with pytest.raises(RuntimeError, match=r"eps_per_sample must have shape \(2,\), got \[3\]"):
        op(x_adv, x_orig, grad, 0.1, 0.1, torch.ones(3), None, 0.0, 1.0)
    with pytest.raises(RuntimeError, match="x_adv must be contiguous or channels_last"):
        op(x_adv[:, :, ::2], x_orig[:, :, ::2], grad[:, :, ::2], 0.1, 0.1, None, None, 0.0, 1.0)
    with pytest.raises(RuntimeError, match="x_adv must be float32, float16 or bfloat16, got Double"):
        op(x_adv.double(), x_orig.double(), grad.double(), 0.1, 0.1, None, None, 0.0, 1.0)
    with pytest.raises(RuntimeError, match="pgd_step_l2_: x_orig and grad must have the dtype of x_adv"):
        torch.ops.pyadvk.pgd_step_l2_(x_adv, x_orig.half(), grad, 0.1, 0.1, None, None, 0.0, 1.0)
