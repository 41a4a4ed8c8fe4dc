"""Block partition and switching order on plain name lists."""

import pytest
import torch

from bread_kernels.optim.blocks import BlockOrder, infer_blocks, layer_prefixes

NAMES = ["model.embed_tokens.weight"] + [f"model.layers.{i}.w" for i in range(5)] + ["model.norm.weight",
                                                                                     "lm_head.weight"]


def test_the_reference_patterns_find_layers_embedding_and_the_rest():
    assert infer_blocks(NAMES, layer_prefixes(NAMES), None, False, False, 1) == [[f"model.layers.{i}."]
                                                                                for i in range(5)]
    blocks = infer_blocks(NAMES, layer_prefixes(NAMES), None, True, True, 2)
    assert blocks[0] == ["model.embed_tokens."]
    assert blocks[1:4] == [["model.layers.0.", "model.layers.1."], ["model.layers.2.", "model.layers.3."],
                           ["model.layers.4."]]
    assert blocks[4] == ["model.norm.weight", "lm_head.weight"]
    with pytest.raises(ValueError, match="could not infer the blocks"):
        infer_blocks(["a.weight", "b.weight"], layer_prefixes(["a.weight", "b.weight"]), None, False, False, 1)


SEQ2SEQ = ["shared.weight", *[f"encoder.block.{i}.w" for i in range(2)], "encoder.final_layer_norm.weight",
           *[f"decoder.block.{i}.w" for i in range(3)], "lm_head.weight"]


def test_the_patterns_serve_where_they_find_the_patched_stack_and_every_stack_else():
    bart = [f"model.{part}.layers.{i}.w" for part in ("encoder", "decoder") for i in range(2)]
    decoder = ["model.decoder.layers.0.", "model.decoder.layers.1."]
    # every stack the reference's patterns match, in parameter order, though patch streams one of them
    assert layer_prefixes(bart, decoder, [decoder]) == [f"model.{part}.layers.{i}." for part in ("encoder", "decoder")
                                                        for i in range(2)]
    # T5's stacks, which the patterns miss: every stack found structurally, in parameter order
    stacks = [[f"decoder.block.{i}." for i in range(3)], [f"encoder.block.{i}." for i in range(2)]]
    assert layer_prefixes(SEQ2SEQ, stacks[0], stacks) == [*stacks[1], *stacks[0]]
    assert layer_prefixes(SEQ2SEQ, stacks[0], stacks[:1]) == stacks[0]  # the patched stack, always among them
    assert layer_prefixes(SEQ2SEQ) == []  # unpatched: the patterns' (none here: refused, naming patch)


def test_a_name_with_layers_inside_a_layer_makes_no_block_of_its_own():
    """peft's LN tuning puts a trainable copy of a layer's norm at ``….layers.<i>.<norm>.ln_tuning_layers.default.``:
    the greedy pattern made each copy a block of its own (three blocks per layer, two of them a single norm), where
    the reference skips every name that holds a layer prefix it found, whichever of the names comes first."""
    layer = ["self_attn.q_proj.weight", "input_layernorm.ln_tuning_layers.default.weight", "mlp.up_proj.weight"]
    names = [f"base_model.model.model.layers.{i}.{part}" for i in range(2) for part in layer]
    assert layer_prefixes(names) == [f"base_model.model.model.layers.{i}." for i in range(2)]
    norm_first = [f"transformer.layers.{i}.{part}" for i in range(2) for part in (layer[1], layer[0])]
    assert layer_prefixes(norm_first) == [f"transformer.layers.{i}." for i in range(2)]


def test_an_embedding_the_patched_model_does_not_name_comes_from_the_reference_pattern():
    names = ["backbone.embed_tokens.weight", "backbone.layers.0.w", "backbone.layers.1.w", "head.weight"]
    blocks = infer_blocks(names, layer_prefixes(names), None, True, True, 1)
    assert blocks == [["backbone.embed_tokens."], ["backbone.layers.0."], ["backbone.layers.1."], ["head.weight"]]
    with pytest.raises(ValueError, match="no input embedding was found .*pass block_prefix_list"):
        infer_blocks(names[1:], layer_prefixes(names), None, True, False, 1)


@pytest.mark.parametrize("mode, expected", [("descending", [3, 2, 1, 0, 3]), ("ascending", [0, 1, 2, 3, 0])])
def test_deterministic_orders_cycle(mode, expected):
    order = BlockOrder(4, mode, None)
    assert [order.current] + [order.advance() for _ in range(4)] == expected


def test_random_order_visits_every_block_per_epoch_and_resumes_from_its_state():
    torch.manual_seed(0)
    order = BlockOrder(5, "random", None)
    epoch = [order.current] + [order.advance() for _ in range(4)]
    assert sorted(epoch) == list(range(5))
    saved = order.state_dict()
    rng = torch.get_rng_state()
    ahead = [order.advance() for _ in range(7)]
    resumed = BlockOrder(5, "random", None)
    resumed.load_state_dict(saved)
    torch.set_rng_state(rng)
    assert [resumed.advance() for _ in range(7)] == ahead


def test_fixed_stays_and_bad_starts_are_refused():
    order = BlockOrder(3, "fixed", 1)
    assert [order.advance() for _ in range(3)] == [1, 1, 1]
    with pytest.raises(ValueError, match="start_block=3 is outside the 3 blocks"):
        BlockOrder(3, "ascending", 3)
    with pytest.raises(ValueError, match="saved switch_mode 'fixed'"):
        BlockOrder(3, "ascending", None).load_state_dict(order.state_dict())
