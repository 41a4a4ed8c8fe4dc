"""BlockOptimizer on peft models whose tuner is not LoRA, against the plain-autograd reference.

The reference (:class:`~tests.optim.reference_bcd.ReferenceBCD`) trains an unpatched copy of the same peft model
with ordinary autograd and the blocks written down by hand (one per decoder layer: ``model_zoo.layout``); the engine
is the patched copy under ``BlockOptimizer`` with the blocks it infers.
"""

from __future__ import annotations

import copy
import warnings

import peft
import pytest
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


NON_LORA_TUNERS = {  # peft config, and the attribute peft's tuner layer holds its adapters under
    "loha": (lambda: peft.LoHaConfig(target_modules=["q_proj", "v_proj"]), "hada_w1_a"),
    "lokr": (lambda: peft.LoKrConfig(target_modules=["q_proj", "v_proj"]), "lokr_w1"),
    "ia3": (lambda: peft.IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]),
            "ia3_l"),
    "vera": (lambda: peft.VeraConfig(target_modules=["q_proj", "v_proj"], r=4), "vera_lambda_b"),
    "oft": (lambda: peft.OFTConfig(target_modules=["q_proj"], r=0, oft_block_size=16), "oft_R"),
}


def _lora_mode_warnings(model, **bcd) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt = bread_kernels.BlockOptimizer(torch.optim.SGD(model.parameters(), **OPTIMIZER),
                                           list(model.named_parameters()), verbose=0, **bcd)
    opt.close()
    return [str(w.message) for w in caught if "lora_mode" in str(w.message)]


@pytest.mark.parametrize("patched", [True, False], ids=["patched", "unpatched"])
@pytest.mark.parametrize("tuner", list(NON_LORA_TUNERS))
def test_adapters_of_another_tuner_than_lora_are_said_to_be_block_weights(tuner, patched):
    """``lora_mode`` applies to LoRA's adapters (``.lora_`` names) only; another tuner's adapters are ordinary block
    weights (trained with their block, the on-the-fly step when it is inactive), as on the reference's path — which
    was silent: one warning at construction says so, naming an adapter."""
    config, attribute = NON_LORA_TUNERS[tuner]
    model = peft.get_peft_model(models.llama(layers=2), config())
    if patched:
        bread_kernels.patch(model)
    said = _lora_mode_warnings(model, sgd_mode="all")
    assert len(said) == 1
    assert f".{attribute}." in said[0] and "applies only to LoRA's adapters" in said[0]
    assert "on-the-fly SGD or sign step of sgd_mode='all'" in said[0]
    assert "frozen while it is not" in _lora_mode_warnings(model)[0]  # BAdam


def test_lora_adapters_and_a_model_without_peft_are_not_warned_about():
    lora = bread_kernels.patch(models.with_lora(models.llama(layers=2)))
    assert _lora_mode_warnings(lora, sgd_mode="all", lora_mode="partial") == []
    assert _lora_mode_warnings(bread_kernels.patch(models.llama(layers=2)), sgd_mode="all") == []
    assert _lora_mode_warnings(models.llama(layers=2)) == []
