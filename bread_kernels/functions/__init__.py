"""torch.autograd.Function wrappers whose backward follows a WeightPlan."""

from .embedding import FusedEmbeddingFunction, fused_embedding
from .head_loss import FusedHeadLossFunction, fused_head_loss
from .linear import FusedLinearFunction, fused_linear

__all__ = ["FusedEmbeddingFunction", "FusedHeadLossFunction", "FusedLinearFunction", "fused_embedding",
           "fused_head_loss", "fused_linear"]
