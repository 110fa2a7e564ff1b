"""ToMe / ToFu on the hybrid backbones (MobileViT, EfficientViT-MIT): the invariants of
docs/hybrid_merging.md, the group-map kernels of models/token_ops.py and the FLOPs table."""
import copy

import pytest
import timm
import torch
from timm.models.efficientvit_mit import EfficientVitBlock, LiteMLA
from timm.models.mobilevit import MobileVitBlock
from torch import nn

import models  # noqa: F401  (registers the models)
from models import tofu, tome
from models.errors import ModelConfigError
from models.token_ops import (
    bipartite_soft_matching, compose_groups, merge_groups, merge_source, merge_tokens, merged_index, unmerge_groups)
from vit_utils import recorded_inputs, run_lengths, spatial_input_shapes

PX = 96  # MobileViT: 6x6, 3x3, 2x2 patch grids (the last one interpolated); EfficientViT: 6x6, 3x3
HYBRIDS = ["mobilevit_xs", "mobilevit_s", "efficientvit_b1"]
METHODS = {"tome": tome.patch, "tofu": tofu.patch}
HEAVY_R = [18, 9, 4, 2, 2, 1, 1, 1, 1]  # clamped per stage by the rule


def make(name, **kwargs):
    torch.manual_seed(0)
    return timm.create_model(name, num_classes=10, **kwargs).eval()


def heavy_r(model):
    return HEAVY_R[:len(tome.transformer_blocks(model))]


def stage_lengths(model, x):
    """Per transformer block: tokens per sequence after it (MobileViT [B*P, N, C] / EfficientViT [B, N, C])."""
    return run_lengths(model, x, tome.transformer_blocks(model))[1]


# ---------------------------------------------------------------------------
# group-map kernels
# ---------------------------------------------------------------------------

def test_merged_index_is_the_index_form_of_the_source_map():
    torch.manual_seed(0)
    x = torch.randn(3, 13, 6)
    match = bipartite_soft_matching(x, 5)
    index = merged_index(match, 13)
    source = merge_source(match, x)
    assert index.shape == (3, 13) and int(index.max()) == 7
    assert torch.all(source.gather(1, index[:, None, :]).squeeze(1) == 1)
    for b in range(3):  # kept A tokens go to their rank, B tokens after them, merged A tokens to their partner
        assert index[b, 2 * match.unm_idx[b, :, 0]].tolist() == list(range(2))
        assert index[b, 1::2].tolist() == list(range(2, 8))
        assert torch.equal(index[b, 2 * match.src_idx[b, :, 0]], 2 + match.dst_idx[b, :, 0])


def test_group_maps_compose_and_round_trip():
    torch.manual_seed(1)
    x = torch.randn(2, 20, 4)
    first = bipartite_soft_matching(x, 6)
    y = merge_tokens(x, first, "mean")
    second = bipartite_soft_matching(y, 4)
    group = compose_groups(compose_groups(None, merged_index(first, 20)), merged_index(second, 14))
    source = merge_source(second, y, merge_source(first, x))
    assert torch.all(source.gather(1, group[:, None, :]).squeeze(1) == 1)  # group g holds token p
    t = torch.randn(2, 10, 4)
    torch.testing.assert_close(merge_groups(unmerge_groups(t, group), group, 10), t)
    full = unmerge_groups(t, group)
    for b in range(2):  # unmerged values are copies of the group's token
        assert torch.equal(full[b], t[b, group[b]])
    assert merge_groups(x, None, 20) is x and unmerge_groups(x, None) is x


# ---------------------------------------------------------------------------
# invariants on the real backbones
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", HYBRIDS)
@pytest.mark.parametrize("method", METHODS)
def test_r0_and_large_start_idx_equal_unpatched(name, method):
    model = make(name)
    x = torch.randn(2, 3, PX, PX)
    with torch.no_grad():
        expected = model(x)
        METHODS[method](model, r=0)
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)
        METHODS[method](model, r=heavy_r(model), start_idx=len(tome.transformer_blocks(model)))
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name,depth", [("mobilevit_xs", 9), ("mobilevit_s", 9), ("efficientvit_b1", 7)])
def test_schedule_has_one_entry_per_transformer_block(name, depth):
    model = tome.patch(make(name), r=2)
    assert len(tome.transformer_blocks(model)) == depth == model._tome_cfg.num_layers
    assert tome.merging_block_indices(model) == list(range(depth))
    assert tofu.prune_layer_indices(tofu.patch(model, r=2)) == list(range(depth // 2))
    with pytest.raises(ModelConfigError):
        model.r = [1] * (depth + 1)


@pytest.mark.parametrize("name", HYBRIDS)
@pytest.mark.parametrize("method", METHODS)
def test_convolutions_and_stage_outputs_see_the_full_grid(name, method):
    """Every convolution with a spatial kernel gets the input shape it gets without merging, and so does
    every stage boundary; 1x1 convolutions may run on fewer positions (merged tokens), never more."""
    model = make(name)
    x = torch.randn(1, 3, PX, PX)
    pointwise = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1)]

    def positions():
        return recorded_inputs(model, pointwise, x, lambda tensor: tensor.shape[-2] * tensor.shape[-1])

    expected, full_positions = spatial_input_shapes(model, x), positions()
    METHODS[method](model, r=heavy_r(model))
    assert stage_lengths(model, x) != stage_lengths(tome.unpatch(copy.deepcopy(model)), x)  # it does merge
    assert spatial_input_shapes(model, x) == expected
    merged_positions = positions()
    assert len(merged_positions) == len(full_positions)
    assert all(m <= f for m, f in zip(merged_positions, full_positions))
    assert (merged_positions != full_positions) == name.startswith("efficientvit")


@pytest.mark.parametrize("name,grids", [("mobilevit_xs", [36, 9, 4]), ("efficientvit_b1", [36, 9])])
def test_sequence_lengths_follow_the_clamp_rule_per_stage(name, grids):
    model = make(name)
    depths = [2, 4, 3] if name.startswith("mobilevit") else [3, 4]
    r = heavy_r(model)
    tome.patch(model, r=r)
    lengths = stage_lengths(model, torch.randn(1, 3, PX, PX))
    expected, schedule = [], list(r)
    for depth, tokens in zip(depths, grids):
        t = tokens  # every stage starts from the full grid again
        for _ in range(depth):
            t -= min(schedule.pop(0), t // 2)  # no class token is protected
            expected.append(t)
    assert lengths == expected


def test_start_idx_counts_attention_blocks_across_stages():
    model = tome.patch(make("mobilevit_xs"), r=[3] * 9, start_idx=3)
    lengths = stage_lengths(model, torch.randn(1, 3, PX, PX))
    # blocks 0-2 (stage 2 and the first of stage 3) are left alone; the schedule goes to blocks 3-8
    assert lengths[:3] == [36, 36, 9] and lengths[3] == 9 - 3
    assert tome.merging_block_indices(model) == list(range(3, 9))


@pytest.mark.parametrize("name", ["mobilevit_xs", "efficientvit_b1"])
@pytest.mark.parametrize("method", METHODS)
def test_unmerge_copies_each_group_token_to_its_members(name, method):
    """The stage output equals the merged tokens gathered through the group map (ToFu: a pruned
    token's positions carry its destination's value)."""
    model = make(name)
    METHODS[method](model, r=heavy_r(model), trace_source=True)
    merged, unmerged = [], []
    if name.startswith("mobilevit"):
        stages = [m.transformer for m in model.modules() if isinstance(m, MobileVitBlock)]
        hooks = [s[-1].register_forward_hook(lambda m, i, o: merged.append(o)) for s in stages]
        hooks += [s.register_forward_hook(lambda m, i, o: unmerged.append(o)) for s in stages]
    else:
        stages = [s for s in model.stages if any(isinstance(b, EfficientVitBlock) for b in s.blocks)]
        hooks = [s.blocks[-1].register_forward_hook(lambda m, i, o: merged.append(o)) for s in stages]
        hooks += [s.register_forward_hook(lambda m, i, o: unmerged.append(o.flatten(2).transpose(1, 2)))
                  for s in stages]
    with torch.no_grad():
        model(torch.randn(2, 3, PX, PX))
    for h in hooks:
        h.remove()
    groups = model._tome_info["groups"]
    assert len(groups) == len(stages) == len(merged) == len(unmerged)
    for group, small, full in zip(groups, merged, unmerged):
        assert group.shape == full.shape[:2] and int(group.max()) < small.shape[1]
        assert torch.equal(full, unmerge_groups(small, group))
        counts = torch.zeros(small.shape[:2], dtype=torch.long).scatter_add_(1, group, torch.ones_like(group))
        assert torch.all(counts >= 1)  # every token of the merged stage owns at least one grid position


def test_lite_mla_proportional_attention_equals_duplicated_tokens():
    """A group of s identical tokens counts s times in LiteMLA's linear attention."""
    torch.manual_seed(0)
    mla = LiteMLA(16, 16, dim=8, scales=()).eval()  # no spatial aggregation: a pure token-set op
    tokens = torch.randn(2, 6, 16)
    group = torch.tensor([[0, 1, 2, 3, 4, 5, 5, 2], [0, 0, 1, 2, 3, 4, 5, 5]])
    full = unmerge_groups(tokens, group)  # [2, 8, 16] with duplicates
    size = torch.zeros(2, 6).scatter_add_(1, group, torch.ones(2, 8))[..., None]
    state = tome.ToMeState(r_list=[], group=group, grid=(2, 4))
    with torch.no_grad():
        expected = mla(full.transpose(1, 2).reshape(2, 16, 2, 4)).flatten(2).transpose(1, 2)
        merged, _ = tome._lite_mla_tokens(mla, tokens, state, size)
    torch.testing.assert_close(unmerge_groups(merged, group), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["mobilevit_xs", "efficientvit_b1"])
def test_state_dict_unpatch_and_training(name):
    model = make(name)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    classes = [type(m) for m in model.modules()]
    x = torch.randn(2, 3, PX, PX)
    with torch.no_grad():
        expected = model(x)
    tofu.patch(model, r=heavy_r(model))
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(before[k], after[k]) for k in before)
    clone = copy.deepcopy(model)
    model.train()
    model(x).logsumexp(-1).sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    tofu.unpatch(clone)
    assert [type(m) for m in clone.modules()] == classes
    with torch.no_grad():
        torch.testing.assert_close(clone(x), expected, rtol=0, atol=0)


@pytest.mark.parametrize("builder", [
    lambda: timm.create_model("resnet10t", num_classes=10),
    lambda: timm.create_model("mobilevitv2_050", num_classes=10),
    lambda: timm.create_model("ltm_mobilevit_xs", num_classes=10),
    lambda: timm.create_model("ltm_efficientvit_b1", num_classes=10),
])
@pytest.mark.parametrize("method", METHODS)
def test_unsupported_family_is_one_line_naming_the_supported(builder, method):
    with pytest.raises(ModelConfigError) as info:
        METHODS[method](builder(), r=2)
    message = str(info.value)
    assert "\n" not in message
    assert all(word in message for word in ("VisionTransformer", "MobileViT", "EfficientViT"))


# ---------------------------------------------------------------------------
# FLOPs table of docs/hybrid_merging.md (LTM table targets, GMACs, project counter)
# ---------------------------------------------------------------------------

FLOPS_TABLE = [  # model, px, r list, LTM target (GMACs), reachable within 3 %
    ("mobilevit_xs", 224, [98, 98, 24, 24, 24, 24, 8, 8, 8], 0.54, False),
    ("mobilevit_s", 224, [82, 82, 21, 21, 21, 21, 7, 7, 7], 1.22, True),
    ("efficientvit_b1", 224, [21, 21, 21, 5, 5, 5, 5], 0.47, True),
    ("efficientvit_b1", 288, [50, 50, 50, 12, 12, 12, 12], 0.73, True),
]


@pytest.mark.slow
@pytest.mark.parametrize("name,px,r,target,reachable", FLOPS_TABLE)
def test_flops_table(name, px, r, target, reachable):
    from models import flops
    model = timm.create_model(name).eval()
    base = flops.count_flops(model, px)["gmacs"]
    for method in METHODS.values():
        method(model, r=r)
        gmacs = flops.count_flops(model, px)["gmacs"]
        assert gmacs < base
        if reachable:
            assert abs(gmacs - target) / target <= 0.03
        else:  # the setting merges everything it can; nothing lower is reachable
            method(model, r=[10 ** 4] * len(r))
            assert abs(flops.count_flops(model, px)["gmacs"] - gmacs) < 1e-9 and gmacs > target * 1.03


@pytest.mark.parametrize("name", ["mobilevit_xs", "efficientvit_b1"])
def test_forward_intermediates_run_merged(name):
    model = tome.patch(make(name), r=heavy_r(model=make(name)))
    x = torch.randn(1, 3, PX, PX)
    with torch.no_grad():
        final, intermediates = model.forward_intermediates(x)
        torch.testing.assert_close(final, model.forward_features(x))
        tome.unpatch(model)
        plain, _ = model.forward_intermediates(x)
    assert not torch.allclose(final, plain)  # merging took effect inside forward_intermediates
