"""bread_kernels: fused backward kernels for block-coordinate-descent finetuning (BAdam, BREAD).

Public API so far: the Roles and update rules of the plan, and the fused dense linear.
"""

from .functions.linear import FusedLinearFunction, fused_linear
from .plan import OnTheFlyUpdate, Role, Rounding, WeightPlan

__version__ = "0.1.0"

__all__ = ["Role", "Rounding", "OnTheFlyUpdate", "WeightPlan", "FusedLinearFunction", "fused_linear", "__version__"]
