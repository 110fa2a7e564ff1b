"""LTMP on the hybrid backbones (MobileViT, EfficientViT-MIT): the invariants of
docs/hybrid_merging.md (section "LTMP"), the registry contract and the FLOPs table (slow)."""
import copy

import pytest
import timm
import torch
from timm.models.efficientvit_mit import LiteMLA
from timm.models.mobilevit import MobileVitBlock, _inverted_residual_block, _mobilevit_block
from torch import nn

import models  # noqa: F401  (registers the models)
from models import ltmp
from models import ltmp_hybrid
from models import ltmp_layers
from models.errors import ModelConfigError
from vit_utils import spatial_input_shapes

PX = 96  # tiny MobileViT: 12x12 -> patch grids 6x6 (4 sequences each), 3x3; tiny EfficientViT: 6x6, 3x3
TINY = {
    "mobilevit": dict(
        blocks=(
            _inverted_residual_block(d=1, c=8, s=1, br=2.0),
            _inverted_residual_block(d=1, c=16, s=2, br=2.0),
            _mobilevit_block(d=1, c=16, s=2, transformer_dim=24, transformer_depth=3, patch_size=2, br=2.0),
            _mobilevit_block(d=1, c=24, s=2, transformer_dim=32, transformer_depth=2, patch_size=2, br=2.0),
        ),
        stem_chs=8, num_features=32),
    "efficientvit": dict(widths=(8, 8, 16, 16, 32), depths=(1, 1, 1, 2, 2), head_dim=8, head_widths=(32, 32)),
}
BASES = {"mobilevit_xs": "mobilevit", "mobilevit_s": "mobilevit", "efficientvit_b1": "efficientvit"}
KINDS = ["mobilevit_xs", "efficientvit_b1"]


def tiny(name, **kwargs):
    """(LTMP model `name` with the tiny timm backbone's weights, the backbone), both in eval mode."""
    base_name = name.split("ltmp_", 1)[1]
    torch.manual_seed(0)
    base = timm.create_model(base_name, num_classes=10, **TINY[BASES[base_name]]).eval()
    for m in base.modules():  # non-trivial BatchNorm statistics
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    model = timm.create_model(name, num_classes=10, **dict(TINY[BASES[base_name]], **kwargs))
    model.load_state_dict(ltmp.checkpoint_filter_fn(base.state_dict(), model), strict=True)
    return model.eval(), base


def images(n=2, seed=0):
    return torch.randn(n, 3, PX, PX, generator=torch.Generator().manual_seed(seed))


def per_block(model, merge, prune):
    blocks = model._threshold_blocks()
    pick = lambda v: [v(i, len(blocks)) if callable(v) else v for i in range(len(blocks))]  # noqa: E731
    model.set_thresholds(merge=pick(merge), prune=pick(prune))


def stage_of(model):
    """Stage number of every threshold block (its transformer / EfficientViT stage)."""
    owners = [m for m in model.modules() if isinstance(m, (ltmp_hybrid.LTMPTransformerSequence, ltmp_hybrid.LTMPEfficientVitStage))]
    return [next(k for k, o in enumerate(owners) if any(b is c for c in o.modules())) for b in model._threshold_blocks()]


def last_of_stage(model):
    stages = stage_of(model)
    return [i + 1 == len(stages) or stages[i + 1] != s for i, s in enumerate(stages)]


# ---------------------------------------------------------------------------------------------
# Registry and weights
# ---------------------------------------------------------------------------------------------

NAMES = [f"{p}ltmp_{b}" for p in ("", "inference_") for b in BASES]


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_is_the_backbone_plus_thresholds_per_transformer_block(name):
    base_name = name.split("ltmp_", 1)[1]
    with torch.device("meta"):
        model = timm.create_model(name)
        base = timm.create_model(base_name)
    keys, base_keys = set(model.state_dict()), set(base.state_dict())
    extra = keys - base_keys
    assert base_keys <= keys
    depth = 9 if base_name.startswith("mobilevit") else 7
    assert len(extra) == 2 * depth and all(ltmp.is_threshold_key(k) for k in extra)
    prefix = "stages.2.1.transformer.0." if base_name.startswith("mobilevit") else "stages.2.blocks.1."
    assert {prefix + "merge_masker.threshold", prefix + "prune_masker.threshold"} <= extra
    assert type(model).__module__ == "models.ltmp_hybrid"


@pytest.mark.parametrize("name", ["ltmp_mobilevit_xs", "inference_ltmp_efficientvit_b1"])
def test_backbone_weights_load_with_thresholds_at_init(name):
    model, base = tiny(name)
    merge = ltmp_layers.MASKED_MERGE_INIT if name.startswith("ltmp_") else ltmp_layers.INFERENCE_MERGE_INIT
    thresholds = model.thresholds()
    depth = len(model._threshold_blocks())
    assert len(thresholds["merge"]) == len(thresholds["prune"]) == depth == 5 - name.startswith("inference")
    assert thresholds["merge"] == pytest.approx([merge] * depth) and thresholds["prune"] == [ltmp_layers.PRUNE_INIT] * depth
    own = model.state_dict()
    assert all(torch.equal(own[k], v) for k, v in base.state_dict().items())


@pytest.mark.parametrize("kind", KINDS)
def test_checkpoints_load_strictly_into_the_twin(kind):
    masked, _ = tiny(f"ltmp_{kind}")
    per_block(masked, 0.7, 0.01)
    inference = timm.create_model(f"inference_ltmp_{kind}", num_classes=10, **TINY[BASES[kind]])
    inference.load_state_dict(masked.state_dict(), strict=True)
    masked.load_state_dict(inference.state_dict(), strict=True)
    twin = ltmp.inference_twin(masked)
    assert isinstance(twin, type(inference)) and twin.thresholds() == masked.thresholds()


# ---------------------------------------------------------------------------------------------
# Invariants (docs/hybrid_merging.md, LTMP section)
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", NAMES[:1] + NAMES[2:4] + NAMES[5:])
def test_1_no_reduction_equals_the_backbone(name):
    model, base = tiny(name, merge_threshold=1.0, prune_threshold=0.0)
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(model(x), base(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["ltmp_mobilevit_xs", "inference_ltmp_mobilevit_xs",
                                  "ltmp_efficientvit_b1", "inference_ltmp_efficientvit_b1"])
def test_2_convolutions_and_stages_see_the_full_grid(name):
    model, base = tiny(name)
    per_block(model, 0.3, 0.05)
    x = images(1)
    assert spatial_input_shapes(model, x) == spatial_input_shapes(base, x)


@pytest.mark.parametrize("kind", KINDS)
def test_3_inference_lengths_follow_the_decisions_and_every_stage_restarts(kind):
    model, _ = tiny(f"inference_ltmp_{kind}")
    per_block(model, 0.4, 0.04)
    x = images(1)
    seen = []
    for block in model._threshold_blocks():
        block.register_forward_hook(lambda m, i, o: seen.append((i[0].shape[1], o.shape[1])))
    with torch.no_grad():
        model(x)
    stages = stage_of(model)
    counts = [t.tolist() for t in model.ltmp_info["tokens"]]
    assert any(n_in > n_out for n_in, n_out in seen), seen  # it does reduce
    for i, ((n_in, n_out), s) in enumerate(zip(seen, stages)):
        assert max(counts[i]) == n_out and min(counts[i]) >= 1  # the protected token survives
        if i and stages[i - 1] == s:
            assert n_in == seen[i - 1][1]
        else:  # a stage starts from its full grid
            assert n_in == {0: 36, 1: 9}.get(s, n_in) or kind.startswith("mobilevit")
    assert seen[0][0] == 36


def test_4_pruned_positions_hold_their_value_at_pruning_and_merged_ones_a_copy():
    """MobileViT, block 0 prunes everything but the protected token: the transformer's output at every
    pruned position is that patch's value after block 0's attention residual; with merging only, every
    position holds a copy of its group's token."""
    model, base = tiny("inference_ltmp_mobilevit_xs")
    mvb = next(m for m in model.modules() if isinstance(m, MobileVitBlock))
    outputs = {}
    mvb.transformer.register_forward_hook(lambda m, i, o: outputs.update(x=i[0], y=o))
    per_block(model, 1.0, lambda i, n: 1.0 if i == 0 else 0.0)
    with torch.no_grad():
        model(images(1))
        x = outputs["x"]
        block = mvb.transformer[0]
        after_attn = x + block.attn(block.norm1(x))
    y = outputs["y"]
    differs = (y - after_attn).abs().amax(-1) > 1e-5
    assert (differs.sum(dim=1) == 1).all()  # exactly the protected token ran on
    # merging only: each sequence's positions take at most T - #merged distinct values
    per_block(model, lambda i, n: 0.2 if i == 0 else 1.0, 0.0)
    with torch.no_grad():
        model(images(1))
    y, kept = outputs["y"], model.ltmp_info["tokens"][0]
    for row, count in zip(y, kept.tolist()):
        assert len(torch.unique(row.round(decimals=5), dim=0)) == count < y.shape[1]


def test_4_group_kernels_round_trip():
    torch.manual_seed(0)
    st = ltmp_hybrid.LTMPStageState(size=torch.ones(2, 3, 1), group=torch.tensor([[0, 1, 1, 2, -1], [2, 2, 0, -1, 1]]),
                             parked=torch.randn(2, 5, 4))
    tokens = torch.randn(2, 3, 4)
    full = ltmp_hybrid.stage_grid(tokens, st)
    assert torch.equal(full[0, 4], st.parked[0, 4]) and torch.equal(full[0, 2], tokens[0, 1])
    assert torch.equal(ltmp_hybrid.stage_grid(tokens, st, pruned="zero")[1, 3], torch.zeros(4))
    torch.testing.assert_close(ltmp_hybrid.regroup(full, st, 3), tokens)


@pytest.mark.parametrize("kind", KINDS)
def test_5_inference_batch_equals_each_sample_alone(kind):
    model, _ = tiny(f"inference_ltmp_{kind}")
    per_block(model, *{"mobilevit_xs": (0.6, 0.02), "efficientvit_b1": (0.7, 0.026)}[kind])
    x = images(3, seed=1) * torch.tensor([0.5, 1.0, 3.0])[:, None, None, None]
    with torch.no_grad():
        batch = model(x)
        counts = [t.tolist() for t in model.ltmp_info["tokens"]]
        alone = torch.cat([model(x[i:i + 1]) for i in range(3)])
    assert any(len(set(c)) > 1 for c in counts)  # sequences keep different numbers: padding is exercised
    torch.testing.assert_close(batch, alone, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_6_masked_equals_inference_when_only_the_last_block_of_each_stage_reduces(kind):
    masked, _ = tiny(f"ltmp_{kind}")
    last = last_of_stage(masked)
    per_block(masked, lambda i, n: 0.3 if last[i] else 1.0, lambda i, n: 0.05 if last[i] else 0.0)
    inference = ltmp.inference_twin(masked)
    x = images(2)
    with torch.no_grad():
        expected = inference(x)
        got = masked(x)
    assert any(float(m.mean()) < 1 for m in masked.masks)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_7_masked_model_masks_and_first_block_counts(kind):
    masked, _ = tiny(f"ltmp_{kind}")
    per_block(masked, 0.5, 0.03)
    inference = ltmp.inference_twin(masked)
    x = images(2)
    with torch.no_grad():
        masked(x)
        inference(x)
    assert len(masked.masks) == len(masked._threshold_blocks())
    for mask in masked.masks:
        assert set(mask.unique().tolist()) <= {0.0, 1.0} and (mask.sum(dim=1) >= 1).all()
    assert torch.equal(masked.masks[0].sum(dim=1).long(), inference.ltmp_info["tokens"][0].long())
    stages = stage_of(masked)
    for i in range(1, len(stages)):  # a masked token never comes back within a stage
        if stages[i] == stages[i - 1]:
            assert masked.masks[i].sum() <= masked.masks[i - 1].sum()


def test_8_lite_mla_importance_is_the_attention_mass_and_matches_timm():
    torch.manual_seed(0)
    mla = LiteMLA(16, 16, dim=8).eval()
    x = torch.randn(2, 16, 4, 4)
    tokens = x.flatten(2).transpose(1, 2)
    st = ltmp_hybrid.LTMPStageState(size=torch.ones(2, 16, 1), group=torch.arange(16).expand(2, 16), grid=(4, 4))
    with torch.no_grad():
        out, metric, importance = ltmp_hybrid.ltmp_lite_mla(mla, tokens, st)
        torch.testing.assert_close(out.transpose(1, 2).reshape(2, 16, 4, 4), mla(x), rtol=1e-5, atol=1e-5)
        qkv = mla.qkv(x)
        multi = torch.cat([qkv] + [op(qkv) for op in mla.aggreg], dim=1)
        multi = multi.reshape(2, -1, 3 * mla.dim, 16).transpose(-1, -2)
        q, k, _ = multi.chunk(3, dim=-1)
        q, k = mla.kernel_func(q), mla.kernel_func(k)
        scores = q @ k.transpose(-1, -2)
        attn = scores / (scores.sum(-1, keepdim=True) + mla.eps)
        expected = attn.mean(dim=(1, 2))
    finite = torch.isfinite(importance)
    assert (finite.sum(dim=1) == 15).all()  # the protected token
    torch.testing.assert_close(importance[finite], expected[finite], rtol=1e-4, atol=1e-7)
    assert torch.equal(importance.argmax(1), expected.argmax(1))
    assert metric.shape == (2, 16, mla.dim)


def test_9_flops_ratio_and_gradients_reach_the_thresholds():
    model, _ = tiny("ltmp_efficientvit_b1")
    threshold_groups = ltmp.threshold_param_groups(model, [0.1, 0.1])
    model.train()
    assert all(not m.training for m in model.modules() if isinstance(m, nn.BatchNorm2d))  # frozen BN stays eval
    x = images(2)
    per_block(model, 1.0, 0.0)
    model(x)
    assert abs(float(model.ltmp_flops_ratio(model.masks).detach()) - 1.0) < 1e-6
    per_block(model, 0.5, 0.05)
    criterion = ltmp.LTMPCriterion(lambda s, o, t: nn.functional.cross_entropy(o["logits"], t), model,
                                   reduction_target=0.3)
    out = model(x)
    assert isinstance(out, dict) and len(out["masks"]) == len(model._threshold_blocks())
    loss = criterion(x, out, torch.tensor([1, 2]))
    loss.backward()
    assert criterion.last["flops_ratio"] < 1.0
    grads = [p.grad for g in threshold_groups for p in g["params"]]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(float(g.abs()) > 0 for g in grads)


def test_10_deterministic_and_the_realised_flops_report():
    model, _ = tiny("ltmp_mobilevit_xs")
    per_block(model, 0.5, 0.03)
    x = images(1)
    with torch.no_grad():
        assert torch.equal(model(x), model(x))
    report = ltmp.realised_flops_ratio(model, x)
    assert report["counter"] == "fvcore" and 0 < report["flops_ratio"] < 1
    assert len(report["tokens_after_block"]) == len(model._threshold_blocks())


@pytest.mark.parametrize("kwargs", [dict(tau=0.0), dict(merge_threshold=2.0), dict(ltmp_threshold=0.1)])
def test_bad_kwargs_raise_one_line(kwargs):
    with pytest.raises(ModelConfigError) as info:
        timm.create_model("ltmp_mobilevit_xs", **dict(TINY["mobilevit"], **kwargs))
    assert "\n" not in str(info.value)


def test_unsupported_backbone_variant_is_one_line():
    with pytest.raises(ModelConfigError) as info:
        timm.create_model("ltmp_efficientvit_b1", widths=(8, 8, 16, 16, 32), depths=(1, 1, 1, 0, 0), head_dim=8,
                          head_widths=(32, 32))
    assert "no transformer blocks" in str(info.value)


# ---------------------------------------------------------------------------------------------
# FLOPs table (docs/hybrid_merging.md): full-size backbones, random weights (seed 0), seeded input
# ---------------------------------------------------------------------------------------------

# (name, px, prune threshold of every block (merge thresholds at the inference init 1.0: no merging),
#  LTM-table target GMACs, reachable within 3 %); random weights and input, both after torch.manual_seed(0)
FLOPS_TABLE = [
    ("inference_ltmp_mobilevit_xs", 224, 1.0, 0.56, True),  # the floor: one token per sequence after block 0
    ("inference_ltmp_mobilevit_s", 224, 0.0203356, 1.26, True),
    ("inference_ltmp_efficientvit_b1", 224, 0.00504239, 0.50, True),
    ("inference_ltmp_efficientvit_b1", 288, 0.0031355, 0.76, True),
]


@pytest.mark.slow
@pytest.mark.parametrize("name,px,prune,target,reachable", FLOPS_TABLE)
def test_flops_table(name, px, prune, target, reachable):
    from models import flops

    torch.manual_seed(0)
    model = timm.create_model(name, ltmp_threshold=prune).eval()
    torch.manual_seed(0)
    gmacs = flops.count_flops(model, px)["gmacs"]
    assert (abs(gmacs - target) / target <= 0.03) == reachable, gmacs
    unreduced = timm.create_model(name).eval()
    torch.manual_seed(0)
    assert gmacs < flops.count_flops(unreduced, px)["gmacs"]
