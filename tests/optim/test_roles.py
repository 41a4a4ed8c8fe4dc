"""The role functions on plain name lists (no model): BlockOptimizers' substring rule, the partial modes, the cut,
the no-decay group."""

import pytest

from bread_kernels import Role
from bread_kernels.optim.roles import lowest_needed_block, no_decay_names, roles_for_block

NAMES = ["embed.weight"] + [f"layers.{i}.{w}" for i in range(3) for w in ("attn.weight", "norm.weight")] + \
    ["norm.weight", "head.weight"]
LAYERS = [f"layers.{i}." for i in range(3)]
LORA = ["embed.weight", "layers.0.q.base_layer.weight", "layers.0.q.lora_A.default.weight",
        "layers.0.q.lora_B.default.weight", "layers.1.q.base_layer.weight", "layers.1.q.lora_A.default.weight",
        "layers.1.q.lora_B.default.weight", "head.weight"]


def by_role(roles):
    return {role: sorted(n for n, r in roles.items() if r is role) for role in Role if role in roles.values()}


def test_badam_trains_the_block_and_freezes_the_rest():
    roles = roles_for_block(NAMES, ["layers.1."])
    assert by_role(roles) == {Role.ACTIVE: ["layers.1.attn.weight", "layers.1.norm.weight"],
                              Role.FROZEN: sorted(set(NAMES) - {"layers.1.attn.weight", "layers.1.norm.weight"})}


def test_a_prefix_matches_as_a_substring_like_the_reference():
    roles = roles_for_block(NAMES, ["1.attn"])
    assert [n for n, r in roles.items() if r is Role.ACTIVE] == ["layers.1.attn.weight"]


@pytest.mark.parametrize("sign", [False, True])
def test_sgd_all_and_partial(sign):
    on_the_fly = Role.SIGN if sign else Role.SGD
    everything = roles_for_block(NAMES, ["layers.1."], sgd_mode="all", sign=sign)
    assert {r for n, r in everything.items() if not n.startswith("layers.1.")} == {on_the_fly}
    partial = roles_for_block(NAMES, ["layers.1."], sgd_mode="partial", sign=sign)
    first = NAMES.index("layers.1.attn.weight")
    for position, name in enumerate(NAMES):
        if name.startswith("layers.1."):
            assert partial[name] is Role.ACTIVE
        else:
            assert partial[name] is (on_the_fly if position > first else Role.FROZEN), name


def test_lora_modes_and_adapters_never_take_the_on_the_fly_update():
    adapters = {n for n in LORA if ".lora_" in n}
    every = roles_for_block(LORA, ["layers.1."], lora_mode="all", sgd_mode="all")
    assert {every[n] for n in adapters} == {Role.ACTIVE}
    assert every["layers.0.q.base_layer.weight"] is Role.SGD and every["layers.1.q.base_layer.weight"] is Role.ACTIVE
    partial = roles_for_block(LORA, ["layers.1."], lora_mode="partial")
    assert {n for n in adapters if partial[n] is Role.ACTIVE} == {n for n in adapters if n.startswith("layers.1.")}
    only = roles_for_block(LORA, ["layers.1."], lora_mode="adapter_only")
    assert {n for n, r in only.items() if r is Role.ACTIVE} == {n for n in adapters if n.startswith("layers.1.")}


def test_a_block_without_trainable_parameters_and_unknown_modes_are_refused():
    with pytest.raises(ValueError, match="holds no LoRA adapter, and lora_mode='adapter_only'.*lora_mode='all'"):
        roles_for_block(LORA, ["head."], lora_mode="adapter_only")
    with pytest.raises(ValueError, match="no trainable parameter"):
        roles_for_block(NAMES, ["nowhere."])
    with pytest.raises(ValueError, match="unknown sgd_mode 'most'"):
        roles_for_block(NAMES, ["layers.1."], sgd_mode="most")
    with pytest.raises(ValueError, match="unknown lora_mode 'some'"):
        roles_for_block(NAMES, ["layers.1."], lora_mode="some")


def test_the_cut_is_the_lowest_block_with_work():
    assert lowest_needed_block(NAMES, roles_for_block(NAMES, ["layers.1."]), LAYERS) == 1
    assert lowest_needed_block(NAMES, roles_for_block(NAMES, ["layers.1."], sgd_mode="partial"), LAYERS) == 1
    assert lowest_needed_block(NAMES, roles_for_block(NAMES, ["layers.2."], sgd_mode="all"), LAYERS) == 0
    assert lowest_needed_block(NAMES, roles_for_block(NAMES, ["head."]), LAYERS) == 3  # no block has work
    assert lowest_needed_block(NAMES, roles_for_block(NAMES, ["embed."]), LAYERS) == 0  # the embedding needs dX


def test_no_decay_names_by_module_class_or_by_name():
    assert no_decay_names(["a.bias", "a.weight", "ln_f.weight", "b.norm.weight"]) == {"a.bias", "b.norm.weight"}
    assert no_decay_names(["a.bias", "ln_f.weight"], norm_parameters={"ln_f.weight"}) == {"a.bias", "ln_f.weight"}
