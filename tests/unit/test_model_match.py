import timm
import torch

import models  # noqa: F401
from utils.model_match import removed_attention_blocks, suggest_model_for_keys


def test_shrink_weights_for_a_deit_suggest_the_shrink_model_with_its_done_layer():
    weights = timm.create_model("deit_tiny_patch16_224_shrink", done_layer=[0, 2, 4]).state_dict()
    assert removed_attention_blocks(weights) == [0, 2, 4]
    assert suggest_model_for_keys(weights, "deit_tiny_patch16_224") == "deit_tiny_patch16_224_shrink --done_layer [0,2,4]"


def test_other_size_of_the_family_is_suggested_and_unrelated_weights_are_not():
    weights = timm.create_model("raftmlp_s").state_dict()
    assert suggest_model_for_keys(weights, "raftmlp_m") == "raftmlp_s"
    assert suggest_model_for_keys({"foo.weight": torch.zeros(2, 2)}, "raftmlp_m") is None
    assert suggest_model_for_keys(weights, None) is None
