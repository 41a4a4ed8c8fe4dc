"""fp32 master copies of the low-precision parameters the base optimizer trains (the active block, adapters).

The base optimizer steps the masters; the low-precision parameters receive the rounded result.  A master that
stays trained across a block switch (a LoRA adapter with ``lora_mode="all"``) is kept, so is its optimizer state.
A parameter written by someone else since its master was last rounded into it (``model.load_state_dict`` after the
optimizer was built, an EMA copy-back, a re-initialisation, ``vector_to_parameters``; not an in-place write into
``p.data``, which torch does not count) gives its master its values at the next step, so the
step starts from what the parameter holds, as an fp32 parameter's does; a write of the master's own rounding (a
resume that loads the model after the optimizer) keeps the master's fp32 bits.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["Fp32Masters"]


class Fp32Masters:
    """The ``(parameter, master, name)`` triples of the current block."""

    def __init__(self):
        self.entries: list[tuple[nn.Parameter, torch.Tensor, str]] = []
        # id(parameter) -> its version and storage when its master last wrote it
        self._written: dict[int, tuple[int, int]] = {}

    def rebuild(self, trained: list[tuple[str, nn.Parameter, bool]]) -> list[torch.Tensor]:
        """The tensors the base optimizer steps for ``trained`` ``(name, parameter, keep)``: the parameter itself
        when it is fp32, else its master — the previous one when ``keep`` and there is one, else a fresh fp32
        copy."""
        old = {name: master for _, master, name in self.entries}
        written = self._written
        self.entries, targets, self._written = [], [], {}
        for name, p, keep in trained:
            target = p
            if p.dtype != torch.float32:
                kept = keep and name in old
                target = old[name] if kept else p.detach().float().clone().requires_grad_(True)
                self.entries.append((p, target, name))
                self._written[id(p)] = written.get(id(p), _mark(p)) if kept else _mark(p)
            targets.append(target)
        return targets

    def follow_casts(self, trained: list[tuple[str, nn.Parameter, torch.Tensor]]) -> dict[int, torch.Tensor]:
        """The ``(name, parameter, target)`` of the current block again after a cast since :meth:`rebuild`
        (``model.to(torch.bfloat16)`` after the optimizer was built): a low-precision parameter without a master
        gets one, a parameter cast to fp32 drops its master and is its own target.  Returns ``{id(old target): new
        target}`` for the targets that changed (empty where nothing was cast: no rebuild)."""
        mastered = {id(low) for low, _, _ in self.entries}
        if all((p.dtype != torch.float32) == (id(p) in mastered) for _, p, _ in trained):
            return {}
        targets = self.rebuild([(name, p, True) for name, p, _ in trained])
        return {id(old): new for (_, _, old), new in zip(trained, targets) if new is not old}

    def grads_to_masters(self) -> None:
        """Move each parameter's ``.grad`` to its master, in fp32 (after taking a write from outside, see the
        module docstring)."""
        for low, master, _ in self.entries:
            self._take_outside_write(low, master)
            if low.grad is not None:
                master.grad = low.grad.float()
                low.grad = None

    @torch.no_grad()
    def _take_outside_write(self, low: torch.Tensor, master: torch.Tensor) -> None:
        if _mark(low) == self._written.get(id(low)):
            return  # nobody wrote it: no comparison (and no host sync)
        if not torch.equal(low, master.to(low.dtype)):
            master.copy_(low)
        self._written[id(low)] = _mark(low)

    @torch.no_grad()
    def masters_to_params(self) -> None:
        """Round the stepped masters into their parameters and drop the masters' gradients."""
        for low, master, _ in self.entries:
            low.copy_(master)
            self._written[id(low)] = _mark(low)
            master.grad = None

    def zero_grad(self) -> None:
        for _, master, _ in self.entries:
            master.grad = None

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {name: master.detach().clone() for _, master, name in self.entries}

    @torch.no_grad()
    def load_state_dict(self, saved: dict[str, torch.Tensor]) -> None:
        for _, master, name in self.entries:
            if name in saved:
                master.copy_(saved[name])

    def __len__(self) -> int:
        return len(self.entries)


def _mark(p: torch.Tensor) -> tuple[int, int]:
    """What changes when a parameter is written: its version (an in-place write: ``p.copy_`` under ``no_grad``,
    ``load_state_dict``) and its storage (``p.data = ...``: ``vector_to_parameters``).  A write into ``p.data`` in
    place changes neither, and is not seen."""
    return p._version, p.data_ptr()
