"""bread_kernels: fused backward kernels for block-coordinate-descent finetuning (BAdam, BREAD).

``patch(model)`` installs the streaming backward and the fused Linear functions (``fused_loss=True``: the fused
head+loss too); ``BlockOptimizer`` (the BlockOptimizers-compatible driver) writes each step's plan; ``fused_linear``
and ``fused_head_loss`` are the ops underneath.
"""

from .functions.head_loss import FusedHeadLossFunction, fused_head_loss
from .functions.linear import FusedLinearFunction, fused_linear
from .functions.lora import FusedLoRALinearFunction, fused_lora_linear
from .lora import init_bread_lora_, merge_and_unload
from .integrations.bcd import accelerate, unaccelerate
from .optim import BlockOptimizer
from .optim.driver import EngineDriver
from .patch import patch, unpatch
from .plan import OnTheFlyUpdate, Role, Rounding, WeightPlan

__version__ = "0.1.0"

__all__ = [
    "patch",
    "unpatch",
    "BlockOptimizer",
    "accelerate",
    "unaccelerate",
    "EngineDriver",
    "Role",
    "Rounding",
    "OnTheFlyUpdate",
    "WeightPlan",
    "FusedLinearFunction",
    "fused_linear",
    "FusedHeadLossFunction",
    "fused_head_loss",
    "FusedLoRALinearFunction",
    "fused_lora_linear",
    "init_bread_lora_",
    "merge_and_unload",
    "__version__",
]
