"""An optimizer with Microsoft BlockOptimizers' attributes and semantics, written from its published behaviour
(``block_optim.py`` and its README), independent of bread_kernels: the stand-in for that library, which is not on
PyPI.  It is what :func:`bread_kernels.accelerate` must work under.

What it keeps from the original:

* ``switch_trainable_params()`` (in ``__init__`` and inside ``step()`` every ``switch_block_every`` steps) sets
  ``active_param_prefixs`` to the current block plus ``active_modules``, turns ``requires_grad`` on for exactly the
  matching parameters, rebuilds the base optimizer over fp32 copies of them (two groups: decay / no decay for
  biases), empties its state, and then (``sgd_mode`` "all"/"partial") turns ``requires_grad`` on again for every
  parameter that takes the SGD step: all, or those after the first active one in ``named_parameters`` order.
* With ``sgd_mode`` other than "disabled" a post-accumulate-grad hook is registered on *every* parameter, never
  removed, holding ``sgd_lr_scaling`` and ``sgd_use_sign`` only in its closure: a parameter not matching
  ``active_param_prefixs`` takes ``p -= lr·s·g`` (``sign(g)``) with ``lr = param_groups[0]["lr"]`` and drops its grad.
* ``step()``: grads to the fp32 copies, base step, copies back, ``global_step += 1``, switch when due
  (``(global_step + 1) % switch_block_every == 0`` checked after the increment, as the original does).
"""

from __future__ import annotations

from collections import defaultdict

import torch


class BlockOptimizersStyle(torch.optim.Optimizer):
    def __init__(self, base_optimizer, named_parameters_list, block_prefix_list, switch_block_every=2,
                 switch_mode="descending", active_modules=(), sgd_mode="disabled", sgd_lr_scaling=1.0,
                 sgd_use_sign=False, verbose=0):
        self.base_optimizer = base_optimizer
        self.named_parameters_list = named_parameters_list
        self.block_prefix_list = block_prefix_list
        self.block_num = len(block_prefix_list)
        self.switch_block_every = switch_block_every
        self.switch_mode = switch_mode
        self.active_modules = list(active_modules)
        self.sgd_mode = sgd_mode
        self.lora_mode = "all"
        self.verbose = verbose
        self.global_step = 0
        self.weight_decay = base_optimizer.param_groups[0]["weight_decay"]
        self.defaults_no_wd = {k: v for k, v in base_optimizer.defaults.items() if k != "weight_decay"}
        self.param_groups = base_optimizer.param_groups
        self.current_block_idx = self.block_num - 1 if switch_mode == "descending" else 0
        super().__init__(self.param_groups, base_optimizer.defaults)
        if sgd_mode != "disabled":
            for n, p in named_parameters_list:
                p.register_post_accumulate_grad_hook(self._sgd_hook(n, sgd_lr_scaling, sgd_use_sign))
        self.switch_trainable_params()

    def _sgd_hook(self, n, lr_scaling, use_sign):
        def sgd_update(p):
            if any(prefix in n for prefix in self.active_param_prefixs):
                return
            g = p.grad.sign() if use_sign else p.grad
            p.data.add_(g, alpha=-self.param_groups[0]["lr"] * lr_scaling)
            p.grad = None
        return sgd_update

    def switch_trainable_params(self):
        self.active_param_prefixs = self.block_prefix_list[self.current_block_idx] + self.active_modules
        self.lp, self.hp = [], []
        groups = [{"params": [], "weight_decay": self.weight_decay, **self.defaults_no_wd},
                  {"params": [], "weight_decay": 0.0, **self.defaults_no_wd}]
        for name, p in self.named_parameters_list:
            if any(prefix in name for prefix in self.active_param_prefixs):
                p.requires_grad_(True)
                hp = p.detach().clone().float().requires_grad_(True)
                self.lp.append(p)
                self.hp.append(hp)
                groups[1 if "bias" in name else 0]["params"].append(hp)
            else:
                p.requires_grad_(False)
                p.grad = None
        names = [n for n, _ in self.named_parameters_list]
        if self.sgd_mode != "disabled":
            if self.sgd_mode == "all":
                sgd_names = names
            else:
                first = min(i for i, n in enumerate(names) if any(pre in n for pre in self.active_param_prefixs))
                sgd_names = names[first:]
            for n, p in self.named_parameters_list:
                if n in sgd_names:
                    p.requires_grad_(True)
        self.base_optimizer.param_groups = [g for g in groups if g["params"]]
        self.base_optimizer.state = defaultdict(dict)
        if self.switch_mode == "descending":
            self.current_block_idx = (self.current_block_idx - 1) % self.block_num
        else:
            self.current_block_idx = (self.current_block_idx + 1) % self.block_num

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.base_optimizer.param_groups:
            group["lr"] = self.param_groups[0]["lr"]
        for lp, hp in zip(self.lp, self.hp):
            assert lp.grad is not None, "an active parameter has no gradient"
            hp.grad = lp.grad.float()
            lp.grad = None
        self.base_optimizer.step()
        for lp, hp in zip(self.lp, self.hp):
            lp.copy_(hp.to(lp.dtype))
            hp.grad = None
        self.global_step += 1
        if (self.global_step + 1) % self.switch_block_every == 0:
            self.switch_trainable_params()
