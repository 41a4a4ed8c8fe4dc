"""The engine under torch's autograd API around the model's forward and backward, against the plain-autograd
reference of BCD (:mod:`tests.optim.reference_bcd`), through :func:`tests.optim.test_equivalence.run_case`.

Saved-tensor hooks (``torch.autograd.graph.saved_tensors_hooks``, ``save_on_cpu``, activation-offloading libraries)
around the forward: a hook whose unpack hands back a copy of what was saved (``save_on_cpu`` on a GPU moves every
saved tensor to the host and back) must not take the on-the-fly updates with it: the reference's hooks write the
parameters themselves.
"""

from __future__ import annotations

import pytest
import torch

from tests import model_zoo as models
from .test_equivalence import (FUSED_EPS, MOE_SHORT_STEPS, SCALING, SGD_ALL, SIGN_PARTIAL, VARIANT_IDS, VARIANTS, Case,
                               run_case)


def _copying_hooks():
    """Saved-tensor hooks that save a copy of every tensor and hand back another copy, as ``save_on_cpu`` does on a
    GPU (``tensor.cpu()``, then ``.to(device)``), on any device."""
    return torch.autograd.graph.saved_tensors_hooks(lambda tensor: tensor.detach().clone(),
                                                    lambda tensor: tensor.clone())


def _offloaded(loss_fn):
    def loss_of(model, ids):
        with _copying_hooks():
            return loss_fn(model, ids)
    return loss_of


ON_THE_FLY = [SGD_ALL, SIGN_PARTIAL]
ON_THE_FLY_IDS = [VARIANT_IDS[VARIANTS.index(v)] for v in ON_THE_FLY]


@pytest.mark.parametrize("recompute", [True, False], ids=["recompute", "kept"])
@pytest.mark.parametrize("variant", ON_THE_FLY, ids=ON_THE_FLY_IDS)
def test_saved_tensor_hooks_that_copy_keep_the_on_the_fly_updates(variant, recompute):
    """The embedding and the head (outside the recomputed blocks: their forward runs under the hooks) and, with
    ``recompute=False``, every block's linears save their weights through the copying hooks; each takes the
    reference's update (before: the update went into the unpacked copy and the weight never moved)."""
    sgd_mode, sign = variant
    run_case(Case(steps=3, loss_fn=_offloaded(models.loss_of), patch=dict(fused_loss=False, recompute=recompute),
                  bcd=dict(switch_block_every=2, sgd_mode=sgd_mode, sgd_use_sign=sign, sgd_lr_scaling=SCALING)))


@pytest.mark.parametrize("tiles", [True, False], ids=["vocabulary-tiles", "whole-dw"])
def test_saved_tensor_hooks_that_copy_keep_the_fused_heads_update(tiles, monkeypatch):
    """The fused head+loss's on-the-fly head, by vocabulary tiles and with its dW accumulated in the forward, and
    the kept top block (``keep_top="auto"``) under the copying hooks."""
    if tiles:
        monkeypatch.setenv("BREAD_LOSS_CHUNK_BYTES", str(5 * models.VOCAB * 4))
    run_case(Case(steps=3, patch=dict(fused_loss=True), loss_fn=_offloaded(models.masked_loss_of),
                  optimizer_extra=FUSED_EPS, bcd=dict(switch_block_every=2, sgd_mode="all", sgd_lr_scaling=SCALING)))


def test_saved_tensor_hooks_that_copy_keep_the_experts_updates():
    """The fused MoE experts' on-the-fly updates (kept blocks: their forward runs under the hooks)."""
    run_case(Case("qwen3_moe", steps=3, short_steps=MOE_SHORT_STEPS, build=dict(experts_implementation="eager"),
                  patch=dict(fused_loss=False, recompute=False), loss_fn=_offloaded(models.loss_of),
                  bcd=dict(switch_block_every=2, sgd_mode="all", sgd_lr_scaling=SCALING)))
