"""Robustness metrics: the Accuracy-Robustness Area, robust accuracy, robustness curves."""

from pyadvk.metrics.ara import AraResult, ara, ara_from_distances, plot_ara
from pyadvk.metrics.robustness import RobustnessCurve, plot_robustness, robust_accuracy, robustness_curve

__all__ = [
    "AraResult",
    "RobustnessCurve",
    "ara",
    "ara_from_distances",
    "plot_ara",
    "plot_robustness",
    "robust_accuracy",
    "robustness_curve",
]
