"""The examples/ scripts run end to end on tiny sizes on the CPU: the attack composes with
torch.compile + bf16 autocast + channels_last; adversarial training in Lightning (skipped
without it)."""

from __future__ import annotations

import importlib.util
import os

import pytest

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")
TINY = ["--size", "8", "--epochs", "1", "--max-train-images", "128", "--max-images", "32"]


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", os.path.join(ROOT, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_compile_bf16_channels_last_example():
    # aot_eager: dynamo + AOTAutograd as with inductor, without its C++ code generation (minutes here)
    result = load("compile_bf16_channels_last").main([*TINY, "--backend", "aot_eager"])
    assert result["max_linf_distance"] == pytest.approx(0.1, abs=1e-6)  # the ball is reached, not left
    for key in ("robust_accuracy_compiled_bf16_channels_last", "robust_accuracy_eager_bf16"):
        assert 0.0 <= result[key] <= result["clean_accuracy"]
    # bf16 rounding moves at most a few of the 32 images against fp32
    assert abs(result["robust_accuracy_compiled_bf16_channels_last"] - result["robust_accuracy_eager_fp32"]) <= 3 / 32


@pytest.mark.slow
def test_lightning_example():
    pytest.importorskip("lightning")
    result = load("lightning_adversarial").main([*TINY, "--loss", "robust"])
    assert {"train_loss", "train_ce", "train_penalty", "train_psi", "robust_accuracy", "clean_accuracy"} <= set(result)
    assert result["train_psi"] == pytest.approx(220 * 64 / 3072, rel=0.1)
    assert 0.0 <= result["robust_accuracy"] <= result["clean_accuracy"] <= 1.0
