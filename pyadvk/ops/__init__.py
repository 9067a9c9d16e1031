"""pyadvk's fused ops. Each op family lives in one module (schema, torch reference body, fake
kernel, public wrapper); its compiled bodies are in csrc/ and its Triton body in kernels/."""

from pyadvk import _extension
from pyadvk.ops.apgd import apgd_step, apgd_step_
from pyadvk.ops.boundary_projection import boundary_projection
from pyadvk.ops.channel_stats import ChannelStats, channel_stats_update, quantile_threshold
from pyadvk.ops.half_huber import half_huber_relu
from pyadvk.ops.pgd import pgd_step, pgd_step_, random_init
from pyadvk.ops.power_iteration import power_iteration

# Load the compiled bodies after every schema above is declared.
_extension.load()

__all__ = [
    "apgd_step",
    "apgd_step_",
    "boundary_projection",
    "ChannelStats",
    "channel_stats_update",
    "half_huber_relu",
    "pgd_step",
    "pgd_step_",
    "power_iteration",
    "quantile_threshold",
    "random_init",
]
