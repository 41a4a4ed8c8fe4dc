"""A plain-autograd reference of block coordinate descent (BAdam, BREAD-SGD, BREAD-SGD-partial).

It is the executable statement of the algorithm the engine (``bread_kernels.BlockOptimizer`` on a patched model)
must reproduce, written to be read, not to be fast, and independent of ``bread_kernels`` (nothing is imported
from it).  Every step it computes the gradient of *every* parameter with ordinary autograd, then applies the
algorithm's update rules by hand:

* **Blocks.**  A block is a list of parameter-name prefixes; a parameter belongs to a block if its name starts
  with one of them.  By default there is one block per repeated layer of the block stack (bottom to top); with
  ``include_embedding`` the input-embedding block comes first; with ``include_lm_head`` a last block holds every
  parameter not in any other block (final norm, lm_head, ...).  ``active_modules`` are prefixes that are always
  active.  (:func:`block_prefixes` builds this list from facts the caller states about the model.)
* **Order.**  First block: ``descending`` -> the last, ``ascending`` -> block 0, ``fixed`` -> ``start_block``,
  ``random`` -> ``torch.randperm(n).tolist().pop()`` (the order is consumed from its end and redrawn, from the
  global torch RNG, when exhausted).  ``start_block`` overrides the first block except in ``random`` mode.  After
  every ``switch_block_every`` steps the block changes: descending ``i-1 mod n``, ascending ``i+1 mod n``, fixed
  never, random the next popped index.
* **Active block.**  Trained by a fresh base optimizer (same class and hyper-parameters as the user's) over two
  groups: weights with the base ``weight_decay``, and biases plus normalisation-layer weights (direct parameters
  of modules whose class name contains ``Norm``) with ``weight_decay=0``.  Its state is empty after every switch.
* **Low precision.**  A bf16/fp16 active parameter is trained through an fp32 master copy made at the switch
  (the gradient is upcast into it, the base optimizer steps it, the parameter is assigned its rounding to nearest);
  the on-the-fly updates are done in the parameter's dtype, ``p -= step * g`` rounded to nearest, as
  BlockOptimizers does.
* **LR.**  The scheduled lr of step ``t`` is ``lr * lr_lambda(t)`` (what ``param_groups[0]["lr"]`` holds when a
  ``LambdaLR`` stepped ``t`` times).  With ``lr_warmup_step_afterswitch = W`` and ``global_step >= W`` the base
  optimizer uses ``lr * min(1, (s + 1) / W)``, ``s`` the steps already taken in the current block.
* **Inactive parameters**, by ``sgd_mode``:
  ``"disabled"``: frozen (BAdam).
  ``"all"``: every inactive parameter gets ``p -= lr * sgd_lr_scaling * g`` (``sign(g)`` with ``sgd_use_sign``),
  ``g`` its full (summed, for tied weights) gradient of this step's backward, ``lr`` the scheduled lr without the
  warm-up factor.  Computing every gradient first and updating afterwards is exactly "the update uses the
  gradient taken at the pre-update weights".
  ``"partial"``: like ``"all"`` but only for inactive parameters that come *after* the first active parameter in
  ``named_parameters()`` order; earlier ones are frozen.
  LoRA adapter parameters (peft's ``lora_A``/``lora_B``) never take the on-the-fly update.
* **LoRA adapters** (BREAD), by ``lora_mode``: ``"all"``: every adapter is trained by the base optimizer every
  step; ``"partial"``: the adapters from the first active parameter on (the active block's and those above it);
  ``"adapter_only"``: only the active block's adapters, and the active block's base weights stay frozen.  An
  adapter that is trained before and after a switch keeps its base-optimizer state (moments, step count).
"""

from __future__ import annotations

from typing import Callable, Iterable, Sequence

import torch

__all__ = ["block_prefixes", "no_decay_names", "ReferenceBCD"]

ADAM, SGD, SIGN, FROZEN = "adam", "sgd", "sign", "frozen"


def block_prefixes(
    param_names: Sequence[str],
    layer_prefixes: Sequence[str],
    embedding_prefix: str,
    include_embedding: bool = False,
    include_lm_head: bool = False,
    n_layer_per_block: int = 1,
) -> list[list[str]]:
    """The default block list: one block per layer, the embedding first if asked, then (ascending) merges of
    ``n_layer_per_block`` consecutive blocks, then the "everything else" block if asked.

    The last block lists the full names of the remaining parameters (a full name is a prefix of itself)."""
    blocks = [[prefix] for prefix in layer_prefixes]
    if include_embedding:
        blocks.insert(0, [embedding_prefix])
    if n_layer_per_block > 1:
        blocks = [sum(blocks[i:i + n_layer_per_block], []) for i in range(0, len(blocks), n_layer_per_block)]
    if include_lm_head:
        covered = [p for block in blocks for p in block]
        blocks.append([name for name in param_names if not name.startswith(tuple(covered))])
    return blocks


def no_decay_names(model: torch.nn.Module) -> set[str]:
    """Biases and the weights of normalisation layers: the parameters trained without weight decay."""
    names = {name for name, _ in model.named_parameters() if name.endswith("bias")}
    for module_name, module in model.named_modules():
        if "Norm" in type(module).__name__:
            names |= {f"{module_name}.{n}" if module_name else n for n, _ in module.named_parameters(recurse=False)}
    return names


class ReferenceBCD:
    """Trains ``model`` in place, one :meth:`step` per batch, with plain autograd.

    ``optimizer_cls`` / ``optimizer_kwargs`` describe the base optimizer (e.g. ``torch.optim.AdamW`` and
    ``dict(lr=1e-2, weight_decay=0.01)``); ``lr_lambda`` is the multiplier of a ``LambdaLR`` schedule, if any.
    After each step, :attr:`roles` tells what happened to each parameter in it (``adam``/``sgd``/``sign``/``frozen``)
    and :attr:`active_block` which block was active; :attr:`block_history` lists the active block of every step.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        blocks: list[list[str]],
        *,
        loss_fn: Callable[[torch.nn.Module, torch.Tensor], torch.Tensor],
        optimizer_cls: type = torch.optim.AdamW,
        optimizer_kwargs: dict | None = None,
        switch_block_every: int = 50,
        start_block: int | None = None,
        switch_mode: str = "descending",
        active_modules: Iterable[str] = (),
        lr_warmup_step_afterswitch: int | None = None,
        sgd_mode: str = "disabled",
        sgd_lr_scaling: float = 1.0,
        sgd_use_sign: bool = False,
        lr_lambda: Callable[[int], float] | None = None,
        lora_mode: str = "all",
    ):
        assert switch_mode in ("descending", "ascending", "random", "fixed"), switch_mode
        assert sgd_mode in ("disabled", "all", "partial"), sgd_mode
        self.model = model
        self.loss_fn = loss_fn
        self.blocks = blocks
        self.n_blocks = len(blocks)
        self.optimizer_cls = optimizer_cls
        self.optimizer_kwargs = dict(optimizer_kwargs or {})
        self.base_lr = self.optimizer_kwargs.pop("lr")
        self.weight_decay = self.optimizer_kwargs.pop("weight_decay", 0.0)
        self.switch_block_every = switch_block_every
        self.switch_mode = switch_mode
        self.active_modules = list(active_modules)
        self.warmup = lr_warmup_step_afterswitch
        self.sgd_mode = sgd_mode
        self.sgd_lr_scaling = sgd_lr_scaling
        self.sgd_use_sign = sgd_use_sign
        self.lr_lambda = lr_lambda
        assert lora_mode in ("all", "partial", "adapter_only"), lora_mode
        self.lora_mode = lora_mode

        self.params = dict(model.named_parameters())  # named_parameters order; a tied weight appears once
        self.names = list(self.params)
        self.no_decay = no_decay_names(model)
        for p in self.params.values():
            if p.is_floating_point() or p.is_complex():  # a quantized int8 / packed weight has no gradient
                p.requires_grad_(True)  # the reference takes every gradient; roles decide what is used

        self.global_step = 0
        self.steps_in_block = 0
        self._random_order: list[int] = []
        if switch_mode == "random":
            self.active_block = self._next_random_block()
        elif start_block is not None:
            self.active_block = start_block
        elif switch_mode == "descending":
            self.active_block = self.n_blocks - 1
        elif switch_mode == "ascending":
            self.active_block = 0
        else:
            raise ValueError("switch_mode='fixed' needs start_block")
        self.block_history: list[int] = []
        self.roles: dict[str, str] = {}
        self.base_optimizer = None
        self._new_base_optimizer()

    # -- block bookkeeping ---------------------------------------------------------------------------------------
    def _next_random_block(self) -> int:
        if not self._random_order:
            self._random_order = torch.randperm(self.n_blocks).tolist()
        return self._random_order.pop()

    def active_names(self) -> list[str]:
        prefixes = tuple(self.blocks[self.active_block]) + tuple(self.active_modules)
        in_block = [name for name in self.names if name.startswith(prefixes)]
        adapters = [name for name in self.names if _is_adapter(name)]
        if not adapters:
            return in_block
        first = min(self.names.index(name) for name in in_block)
        if self.lora_mode == "all":
            chosen = set(in_block) | set(adapters)
        elif self.lora_mode == "partial":
            chosen = set(in_block) | {name for name in adapters if self.names.index(name) >= first}
        else:  # adapter_only
            chosen = {name for name in in_block if _is_adapter(name)}
        return [name for name in self.names if name in chosen]

    def role_of_each(self) -> dict[str, str]:
        active = set(self.active_names())
        first_active = min(self.names.index(name) for name in active)
        on_the_fly = SIGN if self.sgd_use_sign else SGD
        roles = {}
        for i, name in enumerate(self.names):
            if name in active:
                roles[name] = ADAM
            elif _is_adapter(name):
                roles[name] = FROZEN
            elif self.sgd_mode == "all" or (self.sgd_mode == "partial" and i > first_active):
                roles[name] = on_the_fly
            else:
                roles[name] = FROZEN
        return roles

    def _new_base_optimizer(self) -> None:
        """A fresh base optimizer (empty state) over the active parameters, in two weight-decay groups."""
        active = self.active_names()
        decay = [self.params[n] for n in active if n not in self.no_decay]
        no_decay = [self.params[n] for n in active if n in self.no_decay]
        groups = [g for g in ({"params": decay, "weight_decay": self.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
        self.masters = {}  # low-precision parameter -> its fp32 master, which the base optimizer trains
        for group in groups:
            for i, p in enumerate(group["params"]):
                if p.dtype != torch.float32:
                    master = p.detach().float().requires_grad_(True)
                    self.masters[p] = master
                    group["params"][i] = master
        previous = self.base_optimizer
        self.base_optimizer = self.optimizer_cls(groups, lr=self.base_lr, **self.optimizer_kwargs)
        if previous is not None:  # adapters trained on both sides of the switch keep their state
            for name in active:
                p = self.params[name]
                if _is_adapter(name) and p in previous.state:
                    self.base_optimizer.state[p] = previous.state[p]

    def _switch(self) -> None:
        if self.switch_mode == "descending":
            self.active_block = (self.active_block - 1) % self.n_blocks
        elif self.switch_mode == "ascending":
            self.active_block = (self.active_block + 1) % self.n_blocks
        elif self.switch_mode == "random":
            self.active_block = self._next_random_block()
        # fixed: the same block again (the optimizer state is still reset, like at any switch)
        self.steps_in_block = 0
        self._new_base_optimizer()

    # -- learning rates ------------------------------------------------------------------------------------------
    def scheduled_lr(self) -> float:
        return self.base_lr * (self.lr_lambda(self.global_step) if self.lr_lambda is not None else 1.0)

    def block_lr(self) -> float:
        lr = self.scheduled_lr()
        if self.warmup is not None and self.global_step >= self.warmup:
            lr *= min(1.0, (self.steps_in_block + 1) / self.warmup)
        return lr

    # -- one training step ---------------------------------------------------------------------------------------
    def step(self, batch: torch.Tensor) -> float:
        """Forward, backward, on-the-fly corrections of the inactive parameters, base-optimizer step, switch."""
        return self.step_accumulated([batch])

    def step_accumulated(self, micro_batches: list) -> float:
        """One optimizer step over A micro-batches (gradient accumulation; A = 1 is a plain step).  Each
        micro-batch's backward uses ``loss_i / A``; after it every SGD/SIGN parameter is updated with that
        micro-batch's gradient (so the next micro-batch sees the updated weight, as hooks on every backward do);
        the active block's gradients accumulate and the base optimizer steps once; the schedule counts optimizer
        steps.  Returns the mean loss."""
        self.roles = self.role_of_each()
        self.block_history.append(self.active_block)
        for p in self.params.values():
            p.grad = None
        n = len(micro_batches)
        self.reached: set[str] = set()  # the parameters some micro-batch's backward reached (gave a gradient)
        sgd_step = self.scheduled_lr() * self.sgd_lr_scaling
        total = 0.0
        for batch in micro_batches:
            loss = self.loss_fn(self.model, batch)
            (loss / n).backward()  # every gradient at the pre-update weights (tied weights: summed)
            total += loss.item() / n
            self.reached |= {name for name, p in self.params.items() if p.grad is not None}
            with torch.no_grad():
                for name, p in self.params.items():
                    role = self.roles[name]
                    if role == ADAM:
                        continue  # accumulates over the micro-batches
                    if role in (SGD, SIGN) and p.grad is not None:
                        direction = torch.sign(p.grad) if role == SIGN else p.grad
                        p.copy_(p.float() - sgd_step * direction.float())  # in fp32, rounded once to p's dtype
                    p.grad = None  # inactive parameters never keep a gradient

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


def _is_adapter(name: str) -> bool:
    return "lora_A." in name or "lora_B." in name
