"""BlockOptimizer on peft models whose tuner is not LoRA, against the plain-autograd reference.

The reference (:class:`~tests.optim.reference_bcd.ReferenceBCD`) trains an unpatched copy of the same peft model
with ordinary autograd and the blocks written down by hand (one per decoder layer: ``model_zoo.layout``); the engine
is the patched copy under ``BlockOptimizer`` with the blocks it infers.
"""

from __future__ import annotations

import copy
import warnings

import peft
import torch

import bread_kernels

from tests import model_zoo as models
from .reference_bcd import ReferenceBCD

#: plain SGD as the base optimizer: Adam turns a rounding difference in a near-zero gradient into a difference of
#: a whole step (see ADAM_EPS in test_equivalence), SGD keeps it a rounding difference
OPTIMIZER = dict(lr=0.1)


def _hand_written_blocks(model: torch.nn.Module) -> list[list[str]]:
    """One block per decoder layer of the zoo model ``model`` wraps (peft's names)."""
    layers, _ = models.layout(model.get_base_model())
    return [[models.PEFT_PREFIX + prefix] for prefix in layers]


def _train_against_the_reference(original: torch.nn.Module, steps: int, **bcd) -> None:
    reference, engine = copy.deepcopy(original), bread_kernels.patch(copy.deepcopy(original))
    expected = ReferenceBCD(reference, _hand_written_blocks(original), loss_fn=models.loss_of,
                            optimizer_cls=torch.optim.SGD, optimizer_kwargs=OPTIMIZER, **bcd)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = bread_kernels.BlockOptimizer(torch.optim.SGD(engine.parameters(), **OPTIMIZER),
                                           list(engine.named_parameters()), verbose=0, **bcd)
    assert opt.block_prefix_list == expected.blocks
    for ids in models.batches(steps):
        expected.step(ids)
        models.loss_of(engine, ids).backward()
        opt.step()
        opt.zero_grad()
    assert models.moved_parameters(original, engine)
    models.assert_same_parameters(reference, engine)


def test_layer_norm_tuning_trains_one_block_per_layer():
    """peft's LN tuning keeps a trainable copy of each norm at ``….layers.<i>.<norm>.ln_tuning_layers.default.``:
    the block inference made each copy a block of its own, so BAdam spent two switches in three on a single norm
    (the reference skips the names of a layer it found)."""
    original = peft.get_peft_model(models.llama(layers=2), peft.LNTuningConfig(
        target_modules=["input_layernorm", "post_attention_layernorm"]))
    _train_against_the_reference(original, steps=4, switch_block_every=1)
