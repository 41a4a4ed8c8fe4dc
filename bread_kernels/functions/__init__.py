"""torch.autograd.Function wrappers whose backward follows a WeightPlan."""

from .linear import FusedLinearFunction, fused_linear

__all__ = ["FusedLinearFunction", "fused_linear"]
