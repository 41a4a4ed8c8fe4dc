"""Block-coordinate-descent optimizers driving the fused backward."""

from .block_optimizer import BlockOptimizer

__all__ = ["BlockOptimizer"]
