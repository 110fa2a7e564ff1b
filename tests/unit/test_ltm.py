"""LTM models: the invariants of docs/methods/ltm.md plus training and weight loading.

Tiny configurations of each backbone (passed through to timm) keep the fast tests fast; the
registered full-size models are exercised once at batch 1 in the slow tests.
"""
import copy
import math

import pytest
import timm
import torch
from timm.models.mobilevit import _inverted_residual_block, _mobilevit_block

import models  # noqa: F401  (registers the LTM models)
from models import ltm
from models.errors import ModelConfigError
from models.ltm import LTMMaskModule, candidate_table, load_base_weights, merged_grid
from models.token_ops import (
    neighbor_dot, neighbor_gather_sum, neighbor_merge, neighbor_scatter_sum, neighbor_unmerge)

TINY_MOBILEVIT = dict(
    blocks=(
        _inverted_residual_block(d=1, c=8, s=1, br=2.0),
        _inverted_residual_block(d=1, c=16, s=2, br=2.0),
        _mobilevit_block(d=1, c=16, s=2, transformer_dim=24, transformer_depth=2, patch_size=2, br=2.0),
        _mobilevit_block(d=1, c=24, s=2, transformer_dim=32, transformer_depth=1, patch_size=2, br=2.0),
    ),
    stem_chs=8, num_features=32,
)

# (LTM name, timm base, tiny kwargs, default test size, another size the base accepts)
TINY = {
    "vit": ("ltm_vit_small_patch16_224", "vit_small_patch16_224",
            dict(embed_dim=32, depth=2, num_heads=2, img_size=64), 64, None),
    "vit_dynamic": ("ltm_vit_small_patch16_224", "vit_small_patch16_224",
                    dict(embed_dim=32, depth=2, num_heads=2, img_size=64, dynamic_img_size=True), 64, 96),
    "swin": ("ltm_swin_tiny_patch4_window7_224", "swin_tiny_patch4_window7_224",
             dict(embed_dim=16, depths=(2, 2), num_heads=(1, 2), window_size=4, img_size=64,
                  dynamic_img_size=True), 64, 96),
    "mobilevit": ("ltm_mobilevit_xs", "mobilevit_xs", TINY_MOBILEVIT, 64, 96),
    "efficientvit": ("ltm_efficientvit_b1", "efficientvit_b1",
                     dict(widths=(8, 8, 16, 16, 32), depths=(1, 1, 1, 2, 2), head_dim=8, head_widths=(32, 32)),
                     96, 64),
}
FAMILIES = ["vit", "swin", "mobilevit", "efficientvit"]
NUM_CLASSES = 10

# docs/methods/ltm.md: LTM blocks per model and the parameter counts measured with the spec's prototype.
FULL = {
    "ltm_vit_small_patch16_224": ("vit_small_patch16_224", 12, 22_050_688, 224),
    "ltm_vit_base_patch16_224": ("vit_base_patch16_224", 12, 86_567_680, 224),
    "ltm_swin_tiny_patch4_window7_224": ("swin_tiny_patch4_window7_224", 12, 28_288_378, 224),
    "ltm_swin_base_patch4_window7_224": ("swin_base_patch4_window7_224", 24, 87_768_272, 224),
    "ltm_mobilevit_xs": ("mobilevit_xs", 9, 2_317_866, 256),
    "ltm_mobilevit_s": ("mobilevit_s", 9, 5_578_650, 256),
    "ltm_efficientvit_b1": ("efficientvit_b1", 7, 9_102_038, 224),
}


def tiny(family, ratio=0.8, **extra):
    name, _, kwargs, _, _ = TINY[family]
    return timm.create_model(name, num_classes=NUM_CLASSES, compression_ratio=ratio, **dict(kwargs, **extra))


def tiny_base(family, **extra):
    _, base, kwargs, _, _ = TINY[family]
    return timm.create_model(base, num_classes=NUM_CLASSES, **dict(kwargs, **extra))


def tiny_input(family, batch=2, size=None):
    return torch.randn(batch, 3, size or TINY[family][3], size or TINY[family][3])


def mask_keys(model):
    return sorted(k for k in model.state_dict() if ltm.is_mask_key(k))


# ---------------------------------------------------------------------------------------------
# 4. merged_grid
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("h, w, ratio, expected", [
    (14, 14, 0.8, (13, 12)), (56, 56, 0.8, (50, 50)), (28, 28, 0.8, (25, 25)), (7, 7, 0.8, (6, 7)),
    (16, 16, 0.8, (14, 15)), (8, 8, 0.8, (7, 7)), (4, 4, 0.8, (4, 3)), (2, 2, 0.8, (2, 2)),
    (18, 18, 0.8, (16, 16)), (14, 14, 1.0, (14, 14)), (9, 5, 1.0, (9, 5)), (1, 1, 0.25, (1, 1)),
])
def test_merged_grid(h, w, ratio, expected):
    assert merged_grid(h, w, ratio) == expected


def test_merged_grid_rounds_half_up():
    # h' = 5 * sqrt(0.25) = 2.5 exactly: half-up gives 3 (Python's round would give 2);
    # then w' = floor(0.25 * 25 / 3 + 0.5) = 2
    assert merged_grid(5, 5, 0.25) == (3, 2)


# ---------------------------------------------------------------------------------------------
# 5, 6. mask properties, merge / unmerge
# ---------------------------------------------------------------------------------------------

GEOMETRIES = [((14, 14), 0.8), ((7, 7), 0.8), ((4, 4), 0.8), ((8, 6), 0.5), ((5, 9), 0.25), ((3, 3), 0.1)]


def merge_tokens(tokens, mask, table):
    return neighbor_merge(tokens, mask, table.index, table.num_targets)


def unmerge_tokens(merged, mask, table):
    return neighbor_unmerge(merged, mask, table.index)


def dense_assignment(table, mask):
    """Dense (B, h*w, h'*w') weights, built only in tests."""
    dense = mask.new_zeros(mask.shape[0], mask.shape[1], table.num_targets)
    return dense.scatter_add_(2, table.index.expand(mask.shape[0], -1, -1), mask)


@pytest.mark.parametrize("grid, ratio", GEOMETRIES)
def test_mask_is_row_stochastic_on_valid_slots(grid, ratio):
    module = LTMMaskModule(ratio)
    tokens = torch.randn(3, grid[0] * grid[1], 16)
    first = module(tokens, grid)
    state = module(tokens + 0.1 * torch.randn_like(tokens), grid, first)  # with a real prior
    for mask in (first.mask, state.mask):
        table = state.table
        assert mask.shape == (3, grid[0] * grid[1], 9)
        assert (mask >= 0).all()
        torch.testing.assert_close(mask.sum(-1), torch.ones(3, grid[0] * grid[1]))
        assert (mask[:, ~table.valid] == 0).all()
        assert (dense_assignment(table, mask).sum(1) > 0).all()  # every target receives weight


@pytest.mark.parametrize("grid, ratio", GEOMETRIES)
def test_candidate_table_is_a_3x3_neighbourhood_of_the_home_anchor(grid, ratio):
    merged = merged_grid(*grid, ratio)
    table = candidate_table(grid, merged)
    h, w = grid
    for i in range(h * w):
        y, x = divmod(i, w)
        ay = min(merged[0] - 1, math.floor((y + 0.5) * merged[0] / h))
        ax = min(merged[1] - 1, math.floor((x + 0.5) * merged[1] / w))
        expected = {(ay + dy) * merged[1] + ax + dx for dy in (-1, 0, 1) for dx in (-1, 0, 1)
                    if 0 <= ay + dy < merged[0] and 0 <= ax + dx < merged[1]}
        assert set(table.index[i][table.valid[i]].tolist()) == expected


@pytest.mark.parametrize("grid, ratio", GEOMETRIES)
def test_merge_and_unmerge_preserve_constant_fields(grid, ratio):
    module = LTMMaskModule(ratio)
    state = module(torch.randn(2, grid[0] * grid[1], 8), grid)
    constant = torch.randn(2, 1, 8)
    merged = merge_tokens(constant.expand(-1, grid[0] * grid[1], -1), state.mask, state.table)
    torch.testing.assert_close(merged, constant.expand(-1, state.table.num_targets, -1))
    restored = unmerge_tokens(constant.expand(-1, state.table.num_targets, -1), state.mask, state.table)
    torch.testing.assert_close(restored, constant.expand(-1, grid[0] * grid[1], -1))


def test_merge_unmerge_match_dense_reference():
    module = LTMMaskModule(0.5)
    grid = (6, 5)
    tokens = torch.randn(2, 30, 4)
    state = module(tokens, grid)
    dense = dense_assignment(state.table, state.mask)  # (B, N, M)
    expected_merge = dense.transpose(1, 2) @ tokens / dense.sum(1).unsqueeze(-1)
    torch.testing.assert_close(merge_tokens(tokens, state.mask, state.table), expected_merge)
    field = torch.randn(2, state.table.num_targets, 4)
    torch.testing.assert_close(unmerge_tokens(field, state.mask, state.table), dense @ field)


def test_neighbourhood_kernels_gradcheck():
    table = candidate_table((4, 5), (3, 3))
    n, m, d = 20, 9, 3
    src = torch.randn(2, n, d, dtype=torch.float64, requires_grad=True)
    tgt = torch.randn(2, m, d, dtype=torch.float64, requires_grad=True)
    weight = torch.rand(2, n, 9, dtype=torch.float64, requires_grad=True)
    index = table.index
    assert torch.autograd.gradcheck(lambda a, b: neighbor_dot(a, b, index), (src, tgt))
    assert torch.autograd.gradcheck(lambda w_, b: neighbor_gather_sum(w_, b, index), (weight, tgt))
    assert torch.autograd.gradcheck(lambda w_, a: neighbor_scatter_sum(w_, a, index, m), (weight, src))


def test_mask_logits_are_fp32_under_autocast():
    module = LTMMaskModule(0.8)
    tokens = torch.randn(2, 16, 8).bfloat16()
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        state = module(tokens, (4, 4))
    assert state.mask.dtype == torch.float32


# ---------------------------------------------------------------------------------------------
# 1, 2, 3, 10 on tiny backbones
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["vit", "vit_dynamic", "swin", "mobilevit", "efficientvit"])
def test_ratio_one_is_bit_identical_to_timm_base(family):
    base = tiny_base(family).eval()
    model = tiny(family, ratio=1.0).eval()
    missing = load_base_weights(model, base.state_dict())
    assert sorted(missing) == mask_keys(model) and missing
    x = tiny_input(family)
    with torch.no_grad():
        assert torch.equal(model(x), base(x))


@pytest.mark.parametrize("family", FAMILIES)
def test_state_dict_is_base_plus_mask_keys(family):
    base_keys = set(tiny_base(family).state_dict())
    model = tiny(family)
    keys = set(model.state_dict())
    assert base_keys <= keys
    extra = keys - base_keys
    assert extra and all(ltm.is_mask_key(k) for k in extra)
    blocks = ltm.ltm_blocks(model)
    assert len(extra) == 2 * len(blocks)
    for _, block in blocks:
        assert block.mask_module.logit_scale.item() == pytest.approx(math.log(10.0))
        assert block.mask_module.prev_weight.item() == 0.0
    n_base = sum(p.numel() for p in tiny_base(family).parameters())
    assert sum(p.numel() for p in model.parameters()) == n_base + 2 * len(blocks)


@pytest.mark.parametrize("family", ["vit_dynamic", "swin", "mobilevit", "efficientvit"])
@pytest.mark.parametrize("ratio", [1.0, 0.8, 0.5, 0.25])
def test_output_shape_at_two_resolutions(family, ratio):
    model = tiny(family, ratio).eval()
    with torch.no_grad():
        for size in (TINY[family][3], TINY[family][4]):
            out = model(tiny_input(family, size=size))
            assert isinstance(out, torch.Tensor) and out.shape == (2, NUM_CLASSES)
            assert torch.isfinite(out).all()


@pytest.mark.parametrize("family", FAMILIES)
def test_features_then_classifier_equals_forward(family):
    model = tiny(family).eval()
    x = tiny_input(family)
    with torch.no_grad():
        features = model.forward_head(model.forward_features(x), pre_logits=True)
        torch.testing.assert_close(model.get_classifier()(features), model(x), rtol=0, atol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_merging_changes_the_output(family):
    """At r < 1 the model really merges (otherwise every other check would pass vacuously)."""
    base = tiny_base(family).eval()
    model = tiny(family, 0.5).eval()
    load_base_weights(model, base.state_dict())
    x = tiny_input(family)
    with torch.no_grad():
        assert not torch.allclose(model(x), base(x))


# ---------------------------------------------------------------------------------------------
# 8. determinism, train == eval mask, gradients
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_eval_is_deterministic_and_train_uses_the_same_mask(family):
    model = tiny(family)
    x = tiny_input(family)
    captured = {}
    name, block = ltm.ltm_blocks(model)[0]

    def keep_mask(module, args, out):
        captured.setdefault(module.training, out.mask)

    block.mask_module.register_forward_hook(keep_mask)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), model(x))
    model.train()
    with torch.no_grad():
        model(x)
    # BatchNorm in train mode changes the tokens of conv backbones; compare on ViT-style models only
    if family in ("vit", "swin"):
        torch.testing.assert_close(captured[True], captured[False])


@pytest.mark.parametrize("family, kwargs", [("vit", dict(global_pool="avg")), ("swin", {}), ("mobilevit", {})])
def test_gradients_reach_mask_parameters(family, kwargs):
    model = tiny(family, **kwargs).train()
    model(tiny_input(family)).logsumexp(-1).sum().backward()
    blocks = ltm.ltm_blocks(model)
    first, second = blocks[0][1].mask_module, blocks[1][1].mask_module
    assert first.logit_scale.grad is not None and first.logit_scale.grad.abs() > 0
    assert second.prev_weight.grad is not None and second.prev_weight.grad.abs() > 0


def test_ratio_one_freezes_mask_parameters():
    model = tiny("vit", 1.0)
    params = [p for n, p in model.named_parameters() if "mask_module" in n]
    assert params and not any(p.requires_grad for p in params)


# ---------------------------------------------------------------------------------------------
# Errors, weights, training
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("ratio", [0.0, -0.5, 1.5, "0.8", True])
def test_bad_ratio_is_a_one_line_model_config_error(ratio):
    with pytest.raises(ModelConfigError) as info:
        tiny("vit", ratio)
    assert "compression_ratio" in str(info.value) and "\n" not in str(info.value)


def test_cli_kwargs_and_flags():
    assert [f.kwarg for f in ltm.FAMILY.flags if f.kwarg] == ["compression_ratio"]
    model = tiny("swin")
    assert model.supports_ib_loss and model.compression_ratio == 0.8


def test_load_base_weights_rejects_a_foreign_checkpoint():
    model = tiny("vit")
    state = tiny_base("vit").state_dict()
    state["unexpected.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match="unexpected"):
        load_base_weights(model, state)
    state = tiny_base("vit").state_dict()
    del state["head.weight"]
    with pytest.raises(ValueError, match="head.weight"):
        load_base_weights(model, state)


def test_load_base_weights_resets_mask_parameters_to_init():
    model = tiny("vit")
    with torch.no_grad():
        for _, block in ltm.ltm_blocks(model):
            block.mask_module.logit_scale.fill_(3.0)
    load_base_weights(model, tiny_base("vit").state_dict())
    assert all(b.mask_module.logit_scale.item() == pytest.approx(math.log(10.0)) for _, b in ltm.ltm_blocks(model))


def test_pretrained_filter_fills_mask_keys_for_a_strict_load():
    model = tiny("vit")
    filtered = ltm._ltm_filter_fn(None)(tiny_base("vit").state_dict(), model)
    model.load_state_dict(filtered, strict=True)


@pytest.mark.parametrize("family", FAMILIES)
def test_state_dict_round_trip(family, tmp_path):
    model = tiny(family).eval()
    with torch.no_grad():
        for _, block in ltm.ltm_blocks(model):
            block.mask_module.prev_weight.fill_(0.3)
    path = tmp_path / "ltm.pth"
    torch.save(model.state_dict(), path)
    clone = tiny(family).eval()
    clone.load_state_dict(torch.load(path, weights_only=True), strict=True)
    x = tiny_input(family)
    with torch.no_grad():
        assert torch.equal(clone(x), model(x))


@pytest.mark.parametrize("family", FAMILIES)
def test_trains_on_tiny_data(family):
    torch.manual_seed(0)
    model = tiny(family).train()
    x = tiny_input(family, batch=4)
    y = torch.arange(4) % NUM_CLASSES
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(6):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_return_features_only_in_training():
    model = tiny("mobilevit")
    model.set_return_features(True)
    x = tiny_input("mobilevit")
    model.train()
    out = model(x)
    assert set(out) == {"logits", "features"}
    assert out["logits"].shape == (2, NUM_CLASSES) and out["features"].shape == (2, model.num_features)
    model.eval()
    assert isinstance(model(x), torch.Tensor)


def test_ema_copy_keeps_working():
    model = tiny("swin")
    ema = copy.deepcopy(model).eval()
    x = tiny_input("swin")
    with torch.no_grad():
        assert torch.equal(ema(x), model.eval()(x))


def test_vit_rejects_attention_masks_when_merging():
    model = tiny("vit").eval()
    with pytest.raises(ValueError, match="attention masks"):
        model.forward_features(tiny_input("vit"), attn_mask=torch.zeros(17, 17, dtype=torch.bool))


@pytest.mark.parametrize("family, kwargs", [("vit", dict(global_pool="avg")), ("swin", dict(drop_path_rate=0.0))])
def test_gradient_checkpointing_matches(family, kwargs):
    model = tiny(family, **kwargs).train()
    x = tiny_input(family)
    model(x).sum().backward()
    reference = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.set_grad_checkpointing(True)
    model(x).sum().backward()
    for ref, p in zip(reference, model.parameters()):
        torch.testing.assert_close(p.grad, ref)


# ---------------------------------------------------------------------------------------------
# Full-size registered models
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(FULL))
def test_full_size_keys_and_parameter_counts(name):
    """Built on the meta device: no weights are initialised, so this is cheap."""
    base_name, n_blocks, n_params, _ = FULL[name]
    base = timm.create_model(base_name, device="meta")
    model = timm.create_model(name, device="meta")
    base_keys = set(base.state_dict())
    extra = set(model.state_dict()) - base_keys
    assert base_keys <= set(model.state_dict())
    assert len(extra) == 2 * n_blocks and all(ltm.is_mask_key(k) for k in extra)
    assert len(ltm.ltm_blocks(model)) == n_blocks
    assert sum(p.numel() for p in model.parameters()) == n_params
    assert sum(p.numel() for p in base.parameters()) + 2 * n_blocks == n_params


@pytest.mark.slow
@pytest.mark.parametrize("name", ["ltm_vit_small_patch16_224", "ltm_swin_tiny_patch4_window7_224",
                                  "ltm_mobilevit_xs", "ltm_efficientvit_b1"])
def test_full_size_ratio_one_matches_base_at_batch_one(name):
    base_name, _, _, size = FULL[name]
    base = timm.create_model(base_name).eval()
    model = timm.create_model(name, compression_ratio=1.0).eval()
    load_base_weights(model, base.state_dict())
    x = torch.randn(1, 3, size, size)
    with torch.no_grad():
        reference = base(x)
        assert torch.equal(model(x), reference)
        merged = timm.create_model(name, compression_ratio=0.8).eval()
        load_base_weights(merged, base.state_dict())
        out = merged(x)
    assert out.shape == (1, 1000) and torch.isfinite(out).all() and not torch.equal(out, reference)
# ---------------------------------------------------------------------------------------------
# 7. FLOPs (fvcore, batch 1)
# ---------------------------------------------------------------------------------------------

def fvcore_gmacs(model, size):
    from fvcore.nn import FlopCountAnalysis

    analysis = FlopCountAnalysis(model.eval(), torch.randn(1, 3, size, size))
    analysis.unsupported_ops_warnings(False)
    analysis.uncalled_modules_warnings(False)
    return analysis.total() / 1e9


def counted_flops(model, size):
    """torch's dispatch-level FLOP counter (no tracing, so cheap on tiny models)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model.eval()(torch.randn(1, 3, size, size))
    return counter.get_total_flops()


@pytest.mark.parametrize("family", [
    "vit", "swin",
    pytest.param("mobilevit", marks=pytest.mark.slow), pytest.param("efficientvit", marks=pytest.mark.slow)])
def test_flops_do_not_increase_as_ratio_decreases(family):
    size = TINY[family][3]
    flops = [counted_flops(tiny(family, ratio), size) for ratio in (1.0, 0.8, 0.5, 0.25)]
    assert all(later <= earlier for earlier, later in zip(flops, flops[1:]))
    assert flops[-1] < flops[0]


@pytest.mark.slow
def test_fvcore_gmacs_decrease_with_ratio_on_vit():
    gmacs = [fvcore_gmacs(tiny("vit", ratio), 64) for ratio in (1.0, 0.5)]
    assert gmacs[1] < gmacs[0]


# docs/methods/ltm.md table (prototype of the spec, fvcore GMACs at r = 0.8)
# (one per family that is cheap to trace; all seven were measured for the README table)
PUBLISHED_SPEC_GMACS = {
    ("ltm_vit_small_patch16_224", 224): 3.684,
    ("ltm_mobilevit_xs", 256): 0.904,
    ("ltm_efficientvit_b1", 224): 0.497,
}


@pytest.mark.slow
@pytest.mark.parametrize("name, size", sorted(PUBLISHED_SPEC_GMACS))
def test_gmacs_match_the_spec_table(name, size):
    gmacs = fvcore_gmacs(timm.create_model(name, compression_ratio=0.8), size)
    assert gmacs == pytest.approx(PUBLISHED_SPEC_GMACS[(name, size)], rel=0.02)


# ---------------------------------------------------------------------------------------------
# Visualisation tool
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["vit", "mobilevit"])
def test_weight_maps_split_each_source_over_all_targets(family):
    from tools.ltm_visualize import target_weight_maps

    model = tiny(family)
    name = ltm.ltm_blocks(model)[0][0]
    images = tiny_input(family)
    probe = target_weight_maps(model, images, name, [0])
    h2, w2 = probe["merged"]
    result = target_weight_maps(model, images, name, list(range(h2 * w2)))
    maps = result["maps"]
    assert maps.shape == (2, h2 * w2) + tuple(result["grid"])
    assert (maps >= 0).all() and (maps <= 1).all()
    torch.testing.assert_close(maps.sum(1), torch.ones(2, *result["grid"]))


def test_visualize_cli_writes_a_png(tmp_path):
    from tools.ltm_visualize import main

    out = tmp_path / "weights.png"
    assert main(["--model", "ltm_mobilevit_xs", "--input-size", "64", "--num-targets", "3",
                 "--num-classes", "10", "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["--model", "vit_small_patch16_224", "--out", str(out)]) == 2


# ---------------------------------------------------------------------------------------------
# Recipes
# ---------------------------------------------------------------------------------------------

def ltm_configs():
    import glob
    import os

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return sorted(glob.glob(os.path.join(root, "configs", "ltm_*.yaml")))


@pytest.mark.parametrize("path", ltm_configs(), ids=lambda p: p.rsplit("/", 1)[-1])
def test_recipe_keys_are_main_options(path):
    import main

    defaults = main.load_cfg_defaults(path, main.get_args_parser(add_help=False))
    assert timm.is_model(defaults["model"]) and defaults["model"].startswith("ltm_")
    assert defaults["compression_ratio"] == 0.8 and defaults["ib_weight"] == 0.1
    assert defaults["input_size"] == timm.get_pretrained_cfg(defaults["model"]).input_size[-1] or "r288" in path
    if path.endswith("_finetune.yaml"):
        assert defaults["epochs"] == 50 and math.floor(defaults["ib_warmup_ratio"] * defaults["epochs"]) == 15


def test_ddp_is_told_about_bypassed_mask_modules_only_below_ratio_one():
    import timm
    kwargs = dict(embed_dim=32, depth=1, num_heads=2, img_size=32, patch_size=8, num_classes=4)
    assert timm.create_model("ltm_vit_small_patch16_224", compression_ratio=0.8, **kwargs).ddp_find_unused_parameters
    assert not timm.create_model("ltm_vit_small_patch16_224", compression_ratio=1.0, **kwargs).ddp_find_unused_parameters


# ---------------------------------------------------------------------------------------------
# Per-forward state: blocks keep timm's Tensor -> Tensor forward
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["vit", "swin", "mobilevit", "efficientvit"])
def test_every_ltm_block_returns_a_tensor_through_call(family):
    model = tiny(family).eval()
    seen = []
    for name, block in ltm.ltm_blocks(model):
        block.register_forward_hook(lambda module, args, out, name=name: seen.append((name, type(out))))
    with torch.no_grad():
        model(tiny_input(family))
    assert [n for n, _ in seen] == [n for n, _ in ltm.ltm_blocks(model)]
    assert all(t is torch.Tensor for _, t in seen)
    assert all(getattr(m, "_ltm_slot", None) is None or m._ltm_slot.state is None for m in model.modules())


def test_vit_forward_intermediates_match_the_block_outputs():
    model = tiny("vit").eval()
    outputs = []
    for block in model.blocks:
        block.register_forward_hook(lambda module, args, out: outputs.append(out))
    x = tiny_input("vit")
    with torch.no_grad():
        final, inter = model.forward_intermediates(x, output_fmt="NLC")
        features = model.forward_features(x)
    torch.testing.assert_close(final, features)
    for y, out in zip(inter, outputs):
        torch.testing.assert_close(y, out[:, model.num_prefix_tokens:])


def test_a_merging_vit_block_alone_asks_for_its_model():
    block = tiny("vit").blocks[0]
    with pytest.raises(ValueError, match="inside its model"):
        block(torch.randn(1, 17, 32))
    assert tiny("vit", 1.0).blocks[0](torch.randn(1, 17, 32)).shape == (1, 17, 32)
