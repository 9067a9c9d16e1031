"""Statistics over a model's neurons: the consistency analysis and influential neurons of Dong et
al. 2017 (paper 2)."""

from pyadvk.stats.consistency import (
    ConsistencyResult,
    consistency,
    consistency_score,
    representation_consistency,
)
from pyadvk.stats.influence import InfluenceResult, influential_neurons

__all__ = ["ConsistencyResult", "InfluenceResult", "consistency", "consistency_score", "influential_neurons",
           "representation_consistency"]
