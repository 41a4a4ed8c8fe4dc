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

import torch

from tests.optim.reference_bcd import ADAM, SGD, SIGN, ReferenceBCD


class AccumulatingReference(ReferenceBCD):
    def step_accumulated(self, micro_batches: list) -> float:
        """One optimizer step over ``micro_batches`` (each the combined batch of every rank); returns the mean
        loss."""
        self.roles = self.role_of_each()
        self.block_history.append(self.active_block)
        for p in self.params.values():
            p.grad = None
        n = len(micro_batches)
        sgd_step = self.scheduled_lr() * self.sgd_lr_scaling
        total = 0.0
        for batch in micro_batches:
            loss = self.loss_fn(self.model, batch)
            (loss / n).backward()
            total += loss.item() / n
            with torch.no_grad():
                for name, p in self.params.items():
                    role = self.roles[name]
                    if role == ADAM:
                        continue  # accumulates over the micro-batches
                    if role in (SGD, SIGN) and p.grad is not None:
                        direction = torch.sign(p.grad) if role == SIGN else p.grad
                        p.copy_(p.float() - sgd_step * direction.float())
                    p.grad = None
        for group in self.base_optimizer.param_groups:
            group["lr"] = self.block_lr()
        for p, master in self.masters.items():
            master.grad = p.grad.float()
        self.base_optimizer.step()
        with torch.no_grad():
            for p, master in self.masters.items():
                p.copy_(master)
                master.grad = None
        for p in self.params.values():
            p.grad = None
        self.global_step += 1
        self.steps_in_block += 1
        if self.global_step % self.switch_block_every == 0:
            self._switch()
        return total
