"""What bread_kernels knows about peft's LoRA, on a real peft model."""

import peft
import pytest

from bread_kernels.peft_lora import (adapter_parameters, check_lora_layer, is_adapter_name, is_lora_layer,
                                     lora_layer_classes, lora_layers, trained_adapter)
from tests.model_zoo import llama, with_lora


def test_layers_adapters_and_names_of_a_peft_model():
    model = with_lora(llama(), r=4)
    layers = lora_layers(model)
    assert len(layers) == 4 * 7 and all(is_lora_layer(m) for _, m in layers)
    assert lora_layer_classes() == [peft.tuners.lora.Linear]
    name, layer = layers[0]
    assert {id(p) for p in adapter_parameters(layer)} == {id(layer.lora_A["default"].weight),
                                                          id(layer.lora_B["default"].weight)}
    assert adapter_parameters(layer.base_layer) == []
    assert trained_adapter(layer, name) == "default"
    check_lora_layer(name, layer)
    adapters = [n for n, _ in model.named_parameters() if is_adapter_name(n)]
    assert len(adapters) == 2 * len(layers) and not is_adapter_name("model.layers.0.mlp.up_proj.weight")


def test_disabled_adapters_do_not_train_and_variants_are_refused():
    model = with_lora(llama(), r=4)
    name, layer = lora_layers(model)[0]
    with model.disable_adapter():
        assert trained_adapter(layer, name) is None
    dora = with_lora(llama(), r=4, use_dora=True)
    name, layer = lora_layers(dora)[0]
    with pytest.raises(NotImplementedError, match="peft variant .*DoRA"):
        check_lora_layer(name, layer)
