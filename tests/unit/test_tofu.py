"""ToFu patch (models/tofu.py) and its fusion kernels (token_ops.prune_tokens / mlerp_merge):
the invariants of docs/methods/tofu.md and more."""
import copy

import pytest
import timm
import torch

import models  # noqa: F401  (registers the models)
from models import tofu, tome
from models.errors import ModelConfigError
from models.token_ops import (
    BipartiteMatch, bipartite_soft_matching, merge_tokens, mlerp_merge, parse_r, prune_tokens)
from vit_utils import TINY_VIT, run_lengths, tiny_vit



def groups_of(match: BipartiteMatch, batch: int):
    """{destination index among B tokens: [source indices among A tokens]} per batch row."""
    out = []
    for b in range(batch):
        groups = {}
        for s, d in zip(match.src_idx[b, :, 0].tolist(), match.dst_idx[b, :, 0].tolist()):
            groups.setdefault(d, []).append(s)
        out.append(groups)
    return out


def random_match(x, r, class_token=False):
    return bipartite_soft_matching(x, r, class_token=class_token)


# ---------------------------------------------------------------------------
# fusion kernels against their formulas (section 5, checks 3-5)
# ---------------------------------------------------------------------------

def test_prune_keeps_inputs_bitwise():
    x = torch.randn(2, 11, 8)
    match = random_match(x, 4, class_token=True)
    out = prune_tokens(x, match)
    assert out.shape == (2, 7, 8)
    for b in range(2):
        kept_a = (2 * match.unm_idx[b, :, 0]).tolist()
        expected = torch.cat([x[b, kept_a], x[b, 1::2]])
        assert torch.equal(out[b], expected)
    assert torch.equal(out[:, 0], x[:, 0])  # cls kept first


def test_prune_layout_with_distillation_token():
    x = torch.randn(2, 12, 4)
    match = bipartite_soft_matching(x, 3, class_token=True, distill_token=True)
    out = prune_tokens(x, match)
    assert out.shape == merge_tokens(x, match).shape == (2, 9, 4)
    for b in range(2):
        kept_a = (2 * match.unm_idx[b, :, 0]).tolist()
        assert kept_a[0] == 0
        expected = torch.cat([x[b, :2], x[b, kept_a[1:]], x[b, 3::2]])  # cls, dist, other kept A, other B
        assert torch.equal(out[b], expected)


@pytest.mark.parametrize("form", ["paper", "opentome"])
def test_mlerp_matches_formula_per_group(form):
    torch.manual_seed(1)
    x = torch.randn(3, 14, 6, dtype=torch.float64)
    match = random_match(x, 6)
    out = mlerp_merge(x, match, form=form)
    kept = match.unm_idx.shape[1]
    for b, groups in enumerate(groups_of(match, 3)):
        for j in range(x.shape[1] // 2):
            dst = x[b, 2 * j + 1]
            members = [dst] + [x[b, 2 * s] for s in groups.get(j, [])]
            mean = torch.stack(members).mean(0)
            largest = max(float(m.norm()) for m in members)
            if form == "paper":
                expected = dst if j not in groups else mean / mean.norm() * largest
            else:  # OpenToMe / PiToMe: divide by the ORIGINAL destination's norm, every destination
                expected = mean / dst.norm() * largest
            torch.testing.assert_close(out[b, kept + j], expected, rtol=1e-12, atol=1e-12)
        for u, a in enumerate(match.unm_idx[b, :, 0].tolist()):
            assert torch.equal(out[b, u], x[b, 2 * a])


def test_mlerp_paper_properties():
    torch.manual_seed(2)
    x = torch.randn(2, 16, 10, dtype=torch.float64)
    match = random_match(x, 7)
    out = mlerp_merge(x, match, "paper")
    mean = merge_tokens(x, match, "mean")
    kept = match.unm_idx.shape[1]
    for b, groups in enumerate(groups_of(match, 2)):
        for j, sources in groups.items():
            members = torch.stack([x[b, 2 * j + 1]] + [x[b, 2 * s] for s in sources])
            merged = out[b, kept + j]
            torch.testing.assert_close(merged.norm(), members.norm(dim=-1).max())  # norm of the largest member
            direction = torch.nn.functional.cosine_similarity(merged, mean[b, kept + j], dim=0)
            torch.testing.assert_close(direction, torch.tensor(1.0, dtype=torch.float64))
        for j in set(range(8)) - set(groups):  # destinations without sources: bitwise unchanged
            assert torch.equal(out[b, kept + j], x[b, 2 * j + 1])


def test_mlerp_of_identical_tokens_is_the_token():
    x = torch.randn(1, 8, 5)
    x[:, 0::2] = x[:, 1::2]  # every A token duplicates its right neighbour
    match = random_match(x, 4)
    assert torch.equal(match.dst_idx[0, :, 0].sort().values, torch.arange(4))
    out = mlerp_merge(x, match, "paper")
    torch.testing.assert_close(out, x[:, 1::2], rtol=1e-6, atol=1e-6)


def test_mlerp_average_shrinks_norm_mlerp_does_not():
    x = torch.tensor([[[3.0, 0.0], [0.0, 4.0]]])  # one A, one B token, orthogonal
    match = random_match(x, 1)
    avg = merge_tokens(x, match, "mean")
    assert float(avg.norm()) < 4.0
    torch.testing.assert_close(mlerp_merge(x, match, "paper").norm(), torch.tensor(4.0))
    torch.testing.assert_close(mlerp_merge(x, match, "paper")[0, 0], torch.tensor([1.5, 2.0]) / 2.5 * 4.0)
    # opentome: mean / ||x_dst|| * max = (1.5, 2) / 4 * 4
    torch.testing.assert_close(mlerp_merge(x, match, "opentome")[0, 0], torch.tensor([1.5, 2.0]))


def test_mlerp_bad_form():
    with pytest.raises(ValueError):
        mlerp_merge(torch.randn(1, 4, 2), None, "slerp")


# ---------------------------------------------------------------------------
# the patch (section 5, checks 1, 2, 6, 7)
# ---------------------------------------------------------------------------

def reference_tofu(model, x, r, prune_layers, mode):
    """Explicit-attention forward of an *unpatched* ViT with ToFu (no sizes, no proportional attention)."""
    r_list = parse_r(len(model.blocks), r)
    class_token = model.cls_token is not None
    distill_token = getattr(model, "dist_token", None) is not None
    x = model.norm_pre(model._pos_embed(model.patch_embed(x)))
    for i, blk in enumerate(model.blocks):
        a = blk.attn
        B, N, C = x.shape
        qkv = a.qkv(blk.norm1(x)).reshape(B, N, 3, a.num_heads, a.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = ((q @ k.transpose(-2, -1)) * a.scale).softmax(-1)
        x = x + blk.ls1(a.proj((attn @ v).transpose(1, 2).reshape(B, N, C)))
        match = bipartite_soft_matching(k.mean(1), r_list.pop(0), class_token, distill_token)
        if match is not None:
            if i in prune_layers:
                x = prune_tokens(x, match)
            elif mode == "mean":
                x = merge_tokens(x, match, "mean")
            else:
                x = mlerp_merge(x, match, mode)
        x = x + blk.ls2(blk.mlp(blk.norm2(x)))
    return model.forward_head(model.norm(x))


def test_clamp_rule_token_counts():
    model = tofu.patch(tiny_vit(img_size=224), r=13)
    _, lengths = run_lengths(model, torch.randn(1, 3, 224, 224))
    assert lengths[-1] == 41 and lengths[0] == 184


def test_default_prune_layers_follow_the_paper_rule():
    assert tofu.prune_layer_indices(tofu.patch(tiny_vit(), r=2)) == [0, 1, 2, 3, 4, 5]  # d = L // 2
    assert tofu.prune_layer_indices(tofu.patch(tiny_vit(depth=7), r=2)) == [0, 1, 2]
    model = tofu.patch(tiny_vit(), r=2, prune_layers=range(7), mlerp="opentome")  # OpenToMe / PiToMe rule
    assert tofu.prune_layer_indices(model) == list(range(7))


@pytest.mark.parametrize("name,kwargs", [
    ("deit_small_patch16_224", {}),
    ("deit_small_distilled_patch16_224", {}),
    ("vit_small_patch16_224", dict(init_values=0.3)),
    ("vit_small_patch16_224", dict(class_token=False, global_pool="avg")),
])
# the last case prunes in every block: ToMe's matching plus dropping the matched tokens
@pytest.mark.parametrize("mode,prune_layers", [("paper", None), ("opentome", range(7)), ("mean", [1, 4]),
                                               ("paper", range(12))])
def test_matches_explicit_reference(name, kwargs, mode, prune_layers):
    model = tiny_vit(name, img_size=96, **kwargs)
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        expected = reference_tofu(model, x, 5, set(range(6)) if prune_layers is None else set(prune_layers), mode)
        tofu.patch(model, r=5, prune_layers=prune_layers, mlerp=mode)
        out = model(x)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_no_prune_mean_equals_tome_with_unweighted_average():
    """prune_layers=[] and mlerp='mean' is ToMe with plain averaging and without proportional attention."""
    model = tiny_vit(img_size=96)
    x = torch.randn(2, 3, 96, 96)

    def unweighted(block_index, match, tokens, size):
        return merge_tokens(tokens, match, "mean"), None

    with torch.no_grad():
        tofu.patch(model, r=6, prune_layers=[], mlerp="mean")
        out = model(x)
        tome.apply_patch(model, r=6, prop_attn=False, start_idx=0, trace_source=False, fusion=unweighted)
        expected = model(x)
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)


def test_sizes_never_tracked_so_prop_attn_has_no_effect():
    model = tiny_vit(img_size=96)
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        tofu.patch(model, r=6, prop_attn=True, trace_source=True)
        with_prop = model(x)
        assert model._tome_info["size"] is None
        tofu.patch(model, r=6, prop_attn=False)
        torch.testing.assert_close(model(x), with_prop, rtol=0, atol=0)


def test_source_trace_and_applied_r():
    model = tofu.patch(tiny_vit(img_size=96), r=6, trace_source=True)
    with torch.no_grad():
        model(torch.randn(2, 3, 96, 96))
    source = model._tome_info["source"]
    assert source.shape[-1] == 37 and torch.all(source.sum(1) == 1)  # each original token in one group
    applied, t = [], 37
    for _ in range(12):
        step = min(6, (t - 1) // 2)
        t -= step
        applied += [step] if step else []
    assert model._tome_info["r_applied"] == applied and source.shape[1] == t


# state dict untouched and `model.r` changing between calls: test_tome.py, parametrized over ToMe and ToFu


def test_unpatch_and_switching_between_tome_and_tofu():
    model = tiny_vit()
    classes = [type(model)] + [type(b) for b in model.blocks]
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = model(x)
        tofu.patch(model, r=3)
        assert tofu.is_patched(model) and not tome.is_patched(model)
        tome.patch(model, r=3)  # replaces ToFu
        assert tome.is_patched(model) and not tofu.is_patched(model)
        tofu.patch(model, r=3)
        tofu.unpatch(model)
        out = model(x)
    assert [type(model)] + [type(b) for b in model.blocks] == classes
    assert not hasattr(model, "_tome_cfg") and not any(hasattr(b, "_tome_index") for b in model.blocks)
    assert torch.equal(out, expected)


def test_training_step_and_deepcopy():
    model = tofu.patch(tiny_vit(depth=4, drop_path_rate=0.1), r=3)
    clone = copy.deepcopy(model)
    clone.r = 0
    assert model.r == 3 and clone.blocks[0]._tome_cfg is clone._tome_cfg
    model.train()
    model(torch.randn(2, 3, 64, 64)).logsumexp(-1).sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("kwargs", [dict(r=-1), dict(r="13"), dict(mlerp="slerp"), dict(prune_layers=[12]),
                                    dict(prune_layers="0,1"), dict(prune_layers=[1.5]), dict(start_idx=-2)])
def test_bad_input_raises_one_line(kwargs):
    with pytest.raises(ModelConfigError) as info:
        tofu.patch(tiny_vit(), **kwargs)
    assert "\n" not in str(info.value)


def test_unsupported_family_names_the_supported_ones():
    with pytest.raises(ModelConfigError) as info:
        tofu.patch(timm.create_model("resnet10t", num_classes=10), r=2)
    message = str(info.value)
    assert "\n" not in message and "MobileViT" in message and "EfficientViT" in message and "VisionTransformer" in message
    with pytest.raises(ModelConfigError):
        tofu.patch(timm.create_model("deit_small_patch16_shrink_base", img_size=32, **TINY_VIT), r=2)  # EViT


# ---------------------------------------------------------------------------
# method family (models/family.py): flags, patch, reduction search
# ---------------------------------------------------------------------------

def test_family_flags_patch_and_check():
    import argparse

    from models import family
    fam = family.get_family("tofu")
    assert fam.is_patch()
    parser = family.add_family_args(argparse.ArgumentParser())
    args = parser.parse_args(["--tofu-r", "[4,4,3]", "--tofu-start-idx", "1", "--tofu-mlerp", "opentome"])
    model = tiny_vit(depth=4)
    assert "tofu" in family.apply_patches(model, "deit_small_patch16_224", args)
    assert tofu.is_patched(model) and model.r == [4, 4, 3] and model._tome_cfg.start_idx == 1
    assert model._tome_cfg.fusion.mlerp == "opentome" and fam.hooks(model, None).log_state(model)["tofu_r"] == pytest.approx(11 / 3)
    with pytest.raises(ModelConfigError):
        fam.check_options(family.options_for(fam, parser.parse_args(["--tofu-start-idx", "2"])))


def test_family_reduction_search_reaches_a_token_budget():
    from models import family
    fam = family.get_family("tofu")

    def build(r):
        return tofu.patch(tiny_vit(img_size=96, depth=4), r=r)

    def tokens(model):  # stands in for GMACs: tokens summed over the blocks' outputs
        return float(sum(run_lengths(model, torch.randn(1, 3, 96, 96))[1]))

    value, reached = fam.reduction.search(build, 100.0, tokens)
    assert reached == tokens(build(value)) and abs(reached - 100.0) <= 4


def test_tome_and_tofu_together_is_one_line_naming_both_flags():
    import argparse

    from models import family
    from models.factory import create_model
    args = family.add_family_args(argparse.ArgumentParser()).parse_args(["--tome-r", "2", "--tofu-r", "2"])
    with pytest.raises(ModelConfigError) as info:
        create_model("deit_tiny_patch16_224", options=args, num_classes=10, img_size=32, model_kwargs=TINY_VIT)
    message = str(info.value)
    assert "\n" not in message and "--tome-r" in message and "--tofu-r" in message
    one = family.add_family_args(argparse.ArgumentParser()).parse_args(["--tofu-r", "2"])
    assert tofu.is_patched(create_model("deit_tiny_patch16_224", options=one, num_classes=10, img_size=32,
                                        model_kwargs=TINY_VIT))
