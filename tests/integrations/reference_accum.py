"""The plain-autograd BCD reference with gradient accumulation, on one process (nothing from bread_kernels).

:class:`AccumulatingReference` extends :class:`tests.optim.reference_bcd.ReferenceBCD` by one step over A
micro-batches, the semantics the ZeRO-3 integration implements (and the reference ``block_optim.py`` has, since
its hooks fire on every backward):

* each micro-batch's backward uses ``loss_i / A``;
* after each micro-batch's backward every SGD/SIGN parameter is updated with that micro-batch's gradient
  (``p -= lr·s·g_i`` or ``lr·s·sign(g_i)``), so the next micro-batch sees the updated weight;
* the active block's gradients accumulate over the A micro-batches and the base optimizer steps once;
* the block schedule counts optimizer steps.

With A = 1 it is exactly ``ReferenceBCD.step``.
"""

from __future__ import annotations

from tests.optim.reference_bcd import ReferenceBCD


class AccumulatingReference(ReferenceBCD):
    """:meth:`ReferenceBCD.step_accumulated` is the step with accumulation; this name is what the workers use."""
