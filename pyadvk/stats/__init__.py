"""Per-neuron activation statistics over datasets (issue 4)."""

from pyadvk.stats.neuron_stats import NeuronStats, plot_top_patches

__all__ = ["NeuronStats", "plot_top_patches"]
