"""Robustness metrics: the Accuracy-Robustness Area, robust accuracy, robustness curves, and the
evaluation report with its warning signs (:func:`evaluate`)."""

from pyadvk.metrics.ara import AraResult, ara, ara_from_distances, ara_histogram, plot_ara, reference_indices
from pyadvk.metrics.evaluate import AttackResult, Check, Evaluation, evaluate
from pyadvk.metrics.robustness import RobustnessCurve, plot_robustness, robust_accuracy, robustness_curve

__all__ = [
    "AraResult",
    "AttackResult",
    "Check",
    "Evaluation",
    "RobustnessCurve",
    "ara",
    "ara_from_distances",
    "ara_histogram",
    "evaluate",
    "plot_ara",
    "plot_robustness",
    "reference_indices",
    "robust_accuracy",
    "robustness_curve",
]
