"""Statistics over a model's neurons: streaming per-neuron activation statistics over whole
datasets (:class:`NeuronStats`), and the consistency analysis and influential neurons of Dong et
al. 2017 (paper 2)."""

from pyadvk.stats.consistency import (
    ConsistencyResult,
    consistency,
    consistency_score,
    representation_consistency,
)
from pyadvk.stats.influence import InfluenceResult, influential_neurons
from pyadvk.stats.neuron_stats import NeuronStats
from pyadvk.stats.pictures import plot_top_patches, receptive_field_box, select_channels

__all__ = [
    "ConsistencyResult",
    "InfluenceResult",
    "NeuronStats",
    "consistency",
    "consistency_score",
    "influential_neurons",
    "plot_top_patches",
    "receptive_field_box",
    "representation_consistency",
    "select_channels",
]
