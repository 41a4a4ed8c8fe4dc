"""torch.autograd.Function wrappers whose backward follows a WeightPlan."""

from .embedding import FusedEmbeddingFunction, fused_embedding
from .linear import FusedLinearFunction, fused_linear

__all__ = ["FusedEmbeddingFunction", "FusedLinearFunction", "fused_embedding", "fused_linear"]
