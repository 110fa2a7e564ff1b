"""ToMe patch (models/tome.py): the invariants of docs/methods/tome.md,
ToMe on attention-shrunk models (docs/methods/shrink.md) and more."""
import copy

import pytest
import timm
import torch
from timm.models.vision_transformer import Block
from torch import nn

import models  # noqa: F401  (registers the models)
from models import tofu, tome
from models.token_ops import bipartite_soft_matching, merge_wavg, parse_r
from vit_utils import TINY_VIT, run_lengths, tiny_vit




# ---------------------------------------------------------------------------
# stand-ins for the models/shrink.py blocks (same contract: has_attention / attention_weight)
# ---------------------------------------------------------------------------

class StandInShrinkBlock(nn.Module):
    """Deployed shrink block: 2x + MLP, no attention."""
    has_attention = False

    def __init__(self, block: Block):
        super().__init__()
        self.norm2, self.mlp, self.ls2, self.drop_path2 = block.norm2, block.mlp, block.ls2, block.drop_path2

    def forward(self, x):
        h = 2 * x
        return h + self.drop_path2(self.ls2(self.mlp(self.norm2(h))))


class StandInLambdaBlock(Block):
    """Diluted block: (2 - lam) x + lam attn, then the MLP residual."""
    lam = 1.0

    def attention_weight(self) -> float:
        return self.lam

    def forward(self, x, attn_mask=None, is_causal=False):
        lam = self.attention_weight()
        h = (2 - lam) * x + lam * self.drop_path1(self.ls1(self.attn(self.norm1(x))))
        return h + self.drop_path2(self.ls2(self.mlp(self.norm2(h))))


def shrink_standin(model, done):
    model = copy.deepcopy(model)
    for i in done:
        model.blocks[i] = StandInShrinkBlock(model.blocks[i])
    return model


def lambda_standin(model, lambdas):
    """lambdas: {block index: lambda}; every block becomes a lambda block (others at 1)."""
    model = copy.deepcopy(model)
    for i, block in enumerate(model.blocks):
        block.__class__ = StandInLambdaBlock
        block.lam = lambdas.get(i, 1.0)
    return model


def reference_tome(model, x, r, start_idx=0, prop_attn=True):
    """Explicit-attention ToMe forward on an *unpatched* model (official numerics, plus shrink rules)."""
    r_list = parse_r(len(model.blocks), r)
    class_token = model.cls_token is not None
    distill_token = getattr(model, "dist_token", None) is not None
    x = model.norm_pre(model._pos_embed(model.patch_embed(x)))
    size, seen = None, 0
    for blk in model.blocks:
        lam = blk.attention_weight() if hasattr(blk, "attention_weight") else None
        if not getattr(blk, "has_attention", True) or lam == 0:
            x = blk(x)
            continue
        seen += 1
        if seen - 1 < start_idx:
            x = blk(x)
            continue
        a = blk.attn
        B, N, C = x.shape
        qkv = a.qkv(blk.norm1(x)).reshape(B, N, 3, a.num_heads, a.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        logits = (q @ k.transpose(-2, -1)) * a.scale
        if prop_attn and size is not None:
            logits = logits + size.log()[:, None, None, :, 0]
        out = a.proj((logits.softmax(-1) @ v).transpose(1, 2).reshape(B, N, C))
        out = blk.ls1(out)
        x = x + out if lam is None else (2 - lam) * x + lam * out
        match = bipartite_soft_matching(k.mean(1), r_list.pop(0), class_token, distill_token)
        x, size = merge_wavg(match, x, size)
        x = x + blk.ls2(blk.mlp(blk.norm2(x)))
    return model.forward_head(model.norm(x))


# ---------------------------------------------------------------------------
# section 10 checks
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["tome", "tofu"])
def test_r0_and_large_start_idx_equal_unpatched(method):
    """ToMe and ToFu (which shares ToMe's patch): r = 0, or every block left unpatched, is the plain ViT."""
    from models import tofu
    patch = {"tome": tome.patch, "tofu": tofu.patch}[method]
    model = tiny_vit()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = model(x)
        patch(model, r=0)
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)
        patch(model, r=8, start_idx=12)
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("r,final", [(13, 41), (16, 11)])
def test_clamp_rule_token_counts(r, final):
    model = tome.patch(tiny_vit(img_size=224), r=r)
    _, lengths = run_lengths(model, torch.randn(1, 3, 224, 224))
    expected, t = [], 197
    for _ in range(12):
        t -= min(r, (t - 1) // 2)
        expected.append(t)
    assert lengths == expected and lengths[-1] == final


@pytest.mark.parametrize("name,prefix", [("deit_small_patch16_224", 1), ("deit_small_distilled_patch16_224", 2)])
def test_sizes_sources_and_protected_tokens(name, prefix):
    model = tome.patch(tiny_vit(name, img_size=96), r=6, trace_source=True)
    with torch.no_grad():
        model(torch.randn(2, 3, 96, 96))
    size, source = model._tome_info["size"], model._tome_info["source"]
    tokens = 36 + prefix
    assert torch.all(size.sum(1) == tokens)
    assert torch.all(size[:, :prefix] == 1)
    assert source.shape[-1] == tokens
    assert torch.all(source.sum(1) == 1)  # each original token in exactly one group
    torch.testing.assert_close(source.sum(-1, keepdim=True), size)
    for p in range(prefix):  # cls at 0 (and dist at 1) alone in their group
        assert torch.all(source[:, p, p] == 1) and torch.all(source[:, p].sum(-1) == 1)


def test_proportional_attention_equals_duplicated_tokens():
    attn = tiny_vit().blocks[0].attn
    x = torch.randn(2, 6, 48)
    with_duplicate = torch.cat([x, x[:, 5:]], dim=1)
    size = torch.ones(2, 6, 1)
    size[:, 5] = 2
    with torch.no_grad():
        full, _ = tome._attention_with_metric(attn, with_duplicate, None)
        merged, _ = tome._attention_with_metric(attn, x, size)
    torch.testing.assert_close(merged, full[:, :6], rtol=1e-5, atol=1e-5)


SHRINK_TABLE = [  # docs/methods/shrink.md: removed blocks, start_idx, r, merging blocks, final tokens
    ((0, 1, 3, 4, 6), 1, 24, [5, 7, 8, 9, 10, 11], 53),
    ((0, 1, 3, 4, 6), 1, 28, [5, 7, 8, 9, 10, 11], 29),
    ((0, 1, 3, 4, 6, 9), 0, 14, [2, 5, 7, 8, 10, 11], 113),
    ((0, 2, 4), 1, 22, [3, 5, 6, 7, 8, 9, 10, 11], 22),
    ((0, 2, 4, 6), 1, 19, [3, 5, 7, 8, 9, 10, 11], 64),
    ((0, 2, 4), 1, 19, [3, 5, 6, 7, 8, 9, 10, 11], 45),
    ((0, 2, 4, 6), 1, 14, [3, 5, 7, 8, 9, 10, 11], 99),
]


@pytest.fixture(scope="module")
def vit224():
    torch.manual_seed(0)
    return tiny_vit(img_size=224)


@pytest.mark.parametrize("removed,start_idx,r,merging,final", SHRINK_TABLE)
def test_shrink_table(vit224, removed, start_idx, r, merging, final):
    model = tome.patch(shrink_standin(vit224, removed), r=r, start_idx=start_idx)
    assert tome.merging_block_indices(model) == merging
    _, lengths = run_lengths(model, torch.randn(1, 3, 224, 224))
    changed = [i for i in range(12) if lengths[i] < (lengths[i - 1] if i else 197)]
    assert changed == merging
    assert lengths[-1] == final
    if removed == (0, 1, 3, 4, 6) and r == 24:
        assert lengths == [197, 197, 197, 197, 197, 173, 173, 149, 125, 101, 77, 53]


def test_shrunk_blocks_never_pop_r(vit224):
    model = tome.patch(shrink_standin(vit224, (0, 2, 4)), r=[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12], start_idx=1)
    _, lengths = run_lengths(model, torch.randn(1, 3, 224, 224))
    merged = [(lengths[i - 1] if i else 197) - lengths[i] for i in range(12)]
    # merging blocks 3, 5, 6, ..., 11 take entries 1..8 in order; others merge nothing
    assert merged == [0, 0, 0, 1, 0, 2, 3, 4, 5, 6, 7, 8]


@pytest.mark.parametrize("r", [0, 13, (8, -0.5), [5] * 4])
def test_shrink_standin_matches_reference(r):
    base = tiny_vit(img_size=96)
    model = shrink_standin(base, (0, 2, 4))
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        plain = model(x)
        expected = reference_tome(model, x, r, start_idx=1)
        tome.patch(model, r=r, start_idx=1)
        out = model(x)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    if r == 0:
        torch.testing.assert_close(out, plain, rtol=1e-5, atol=1e-5)


def test_lambda_zero_equals_shrink_with_tome():
    base = tiny_vit(img_size=96)
    x = torch.randn(2, 3, 96, 96)
    shrink = tome.patch(shrink_standin(base, (0, 2, 4)), r=9, start_idx=1)
    lam = tome.patch(lambda_standin(base, {0: 0.0, 2: 0.0, 4: 0.0}), r=9, start_idx=1)
    assert tome.merging_block_indices(lam) == tome.merging_block_indices(shrink)
    with torch.no_grad():
        torch.testing.assert_close(lam(x), shrink(x), rtol=1e-6, atol=1e-6)


def test_lambda_dilution_with_tome_matches_reference():
    base = tiny_vit(img_size=96)
    model = lambda_standin(base, {0: 0.0, 2: 0.3, 5: 0.7})
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        expected = reference_tome(model, x, 7, start_idx=1)
        tome.patch(model, r=7, start_idx=1)
        out = model(x)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert tome.merging_block_indices(model) == list(range(2, 12))
    model.blocks[2].lam = 0.0  # lambda changes at run time: the start_idx ordinal follows it
    assert tome.merging_block_indices(model) == list(range(3, 12))


@pytest.mark.parametrize("patch", [tome.patch, tofu.patch], ids=["tome", "tofu"])
def test_state_dict_unchanged_and_r_changes_between_calls(patch):
    model = tiny_vit()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = sum(p.numel() for p in model.parameters())
    patch(model, r=2)
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(before[k], after[k]) for k in before)
    assert sum(p.numel() for p in model.parameters()) == params
    x = torch.randn(1, 3, 64, 64)
    _, lengths = run_lengths(model, x)
    assert lengths[-1] == 17 - 2 * 7 - 1  # 17 -> ... clamp: 15, 13, 11, 9, 7, 5, 3, 2, 2, ...
    model.r = 0
    _, lengths = run_lengths(model, x)
    assert lengths == [17] * 12
    model.r = [3, 3]
    _, lengths = run_lengths(model, x)
    assert lengths[:3] == [14, 11, 11]


# ---------------------------------------------------------------------------
# more models, SDPA vs explicit reference, training, unpatch, bad input
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("name,kwargs", [
    ("deit_small_patch16_224", {}),
    ("deit_small_distilled_patch16_224", {}),
    ("vit_small_patch16_224", dict(init_values=0.3)),  # LayerScale
    ("vit_small_patch16_224", dict(class_token=False, global_pool="avg")),
])
@pytest.mark.parametrize("r,prop_attn,start_idx", [(13, True, 0), ((8, -1.0), True, 2), (5, False, 0)])
def test_sdpa_matches_explicit_reference(name, kwargs, r, prop_attn, start_idx):
    model = tiny_vit(name, img_size=96, **kwargs)
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        expected = reference_tome(model, x, r, start_idx, prop_attn)
        tome.patch(model, r=r, prop_attn=prop_attn, start_idx=start_idx)
        out = model(x)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_unpatch_restores_classes_and_logits():
    model = tiny_vit()
    classes = [type(model)] + [type(b) for b in model.blocks] + [type(b.attn) for b in model.blocks]
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = model(x)
        tome.patch(model, r=4)
        assert tome.is_patched(model) and not torch.allclose(model(x), expected)
        tome.patch(model, r=3)  # re-patching replaces the settings
        tome.unpatch(model)
        out = model(x)
    assert [type(model)] + [type(b) for b in model.blocks] + [type(b.attn) for b in model.blocks] == classes
    assert not hasattr(model, "_tome_cfg") and not any(hasattr(b, "_tome_cfg") for b in model.blocks)
    assert torch.equal(out, expected)


def test_training_step_with_merging():
    model = tiny_vit(img_size=64, drop_path_rate=0.1, depth=4)
    tome.patch(model, r=3)
    model.train()
    loss = model(torch.randn(2, 3, 64, 64)).logsumexp(-1).sum()
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_ema_deepcopy_keeps_patch_shared_state():
    model = tome.patch(tiny_vit(), r=3)
    clone = copy.deepcopy(model)
    clone.r = 0
    assert model.r == 3 and clone.blocks[0]._tome_cfg is clone._tome_cfg
    x = torch.randn(1, 3, 64, 64)
    _, lengths = run_lengths(clone, x)
    assert lengths == [17] * 12


def test_no_state_outlives_forward():
    model = tome.patch(tiny_vit(), r=3)
    with torch.no_grad():
        model(torch.randn(1, 3, 64, 64))
        model.forward_features(torch.randn(1, 3, 64, 64))
    assert model._tome_cfg.slot.state is None and model._tome_info["size"] is None


@pytest.mark.parametrize("kwargs", [dict(r=-1), dict(r="13"), dict(r=[2, -1]), dict(start_idx=-1),
                                    dict(start_idx=1.5), dict(r=(4, 3.0))])
def test_bad_input_raises_one_line(kwargs):
    with pytest.raises(ValueError) as info:
        tome.patch(tiny_vit(depth=2), **kwargs)
    assert "\n" not in str(info.value)


def test_bad_r_assignment_raises():
    model = tome.patch(tiny_vit(depth=2), r=1)
    with pytest.raises(ValueError):
        model.r = -3
    assert model.r == 1


def test_gradient_checkpointing_rejected_in_training():
    model = tome.patch(tiny_vit(depth=2), r=1)
    model.set_grad_checkpointing(True)
    model.train()
    with pytest.raises(ValueError):
        model(torch.randn(1, 3, 64, 64))


def test_trace_source_reports_applied_r():
    model = tome.patch(tiny_vit(), r=(4, -1.0), trace_source=True)
    with torch.no_grad():
        model(torch.randn(1, 3, 64, 64))
    # schedule 8, 7, 6, 5, ... clamped by (T - 1) // 2: 17 -> 9 -> 5 -> 3 -> 2, then nothing to merge
    assert model._tome_info["r_applied"] == [8, 4, 2, 1]
    assert model._tome_info["source"].shape == (1, 2, 17)


def test_evit_rejected():
    evit = timm.create_model("deit_small_patch16_shrink_base", img_size=32, **TINY_VIT)
    with pytest.raises(ValueError):
        tome.patch(evit, r=2)


# ---------------------------------------------------------------------------
# the real attention-shrink models, once models/shrink.py registers them
# ---------------------------------------------------------------------------

def _shrink_ready():
    return "deit_small_patch16_224_shrink" in timm.list_models("deit_small_patch16_224_shrink")


@pytest.mark.skipif(not _shrink_ready(), reason="models.shrink has not registered deit_small_patch16_224_shrink yet")
@pytest.mark.parametrize("removed,start_idx,r,merging,final", [row for row in SHRINK_TABLE if len(row[0]) < 5])
def test_real_shrink_models(removed, start_idx, r, merging, final):
    model = timm.create_model("deit_small_patch16_224_shrink", done_layer=list(removed), **TINY_VIT).eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        plain = model(x)
        tome.patch(model, r=0, start_idx=start_idx)
        torch.testing.assert_close(model(x), plain, rtol=1e-5, atol=1e-5)
    model.r = r
    assert tome.merging_block_indices(model) == merging
    _, lengths = run_lengths(model, x)
    assert lengths[-1] == final

    lam = timm.create_model("deit_small_patch16_224_copy_lambda", prune_layer=list(removed), done_layer=[], **TINY_VIT).eval()
    lam.load_state_dict(model.state_dict(), strict=False)
    lam.set_lambda(0.0)
    tome.patch(lam, r=r, start_idx=start_idx)
    assert tome.merging_block_indices(lam) == merging
    with torch.no_grad():
        torch.testing.assert_close(lam(x), model(x), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------
# tools/tome_visualize.py
# ---------------------------------------------------------------------------

def test_make_visualization_groups():
    import numpy as np
    from PIL import Image

    from tools.tome_visualize import group_colours, make_visualization
    img = Image.fromarray(np.full((32, 32, 3), 100, dtype=np.uint8))
    # cls + 4 patches (2x2 grid of 16 px); groups: {cls}, {p0, p1}, {p2}, {p3}
    source = torch.tensor([[1, 0, 0, 0, 0], [0, 1, 1, 0, 0], [0, 0, 0, 1, 0], [0, 0, 0, 0, 1]])
    vis = np.asarray(make_visualization(img, source, patch_size=16))
    assert vis.shape == (32, 32, 3)
    assert tuple(vis[8, 16]) == (100, 100, 100)  # interior of the merged top group spans both patches
    border = tuple(np.uint8(np.array(group_colours(4)[1]) * 255))
    assert tuple(vis[0, 16]) == border and tuple(vis[0, 0]) == border


def test_tome_visualize_cli(tmp_path):
    from PIL import Image

    from tools import tome_visualize
    out = tmp_path / "groups.png"
    code = tome_visualize.main(["--model", "deit_tiny_patch16_224", "--img-size", "64", "--tome-r", "[3] * 4",
                                "--model-kwargs", "{'embed_dim': 48, 'num_heads': 3, 'depth': 4}", "--out", str(out)])
    assert code == 0 and Image.open(out).size == (128, 64)
    assert tome_visualize.main(["--model", "deit_tiny_patch16_224", "--img-size", "64", "--tome-r", "-2",
                                "--model-kwargs", "{'depth': 2}", "--out", str(out)]) == 2


# ---------------------------------------------------------------------------
# model families, error type, pluggable fusion
# ---------------------------------------------------------------------------

def test_bad_input_is_a_model_config_error():
    from models.errors import ModelConfigError
    for kwargs in (dict(r=-1), dict(start_idx=-1), dict(r=[1] * 13)):
        with pytest.raises(ModelConfigError):
            tome.patch(tiny_vit(), **kwargs)


@pytest.mark.parametrize("name", ["resnet10t", "ltm_vit_small_patch16_224"])
def test_unsupported_family_names_the_supported_ones(name):
    kwargs = dict(embed_dim=48, num_heads=3, depth=2, img_size=32) if name.startswith("ltm") else {}
    model = timm.create_model(name, num_classes=10, **kwargs)
    with pytest.raises(ValueError) as info:
        tome.patch(model, r=2)
    message = str(info.value)
    assert "\n" not in message and all(w in message for w in ("VisionTransformer", "MobileViT", "EfficientViT"))
    assert tome.model_family(tiny_vit(depth=2)) == "vit"


def test_fusion_step_is_pluggable():
    """apply_patch with a fusion that keeps the destination only equals ToMe's matching + drop."""
    from models.token_ops import prune_tokens
    model = tiny_vit(img_size=96)
    x = torch.randn(2, 3, 96, 96)
    calls = []

    def drop(block_index, match, tokens, size):
        calls.append(block_index)
        return prune_tokens(tokens, match), size

    with torch.no_grad():
        tome.apply_patch(model, r=4, prop_attn=True, start_idx=2, trace_source=False, fusion=drop)
        out = model(x)
        from models import tofu
        tofu.patch(model, r=4, prune_layers=range(12), start_idx=2)
        torch.testing.assert_close(out, model(x), rtol=0, atol=0)
    assert calls == list(range(2, 12))


def test_forward_intermediates_merges_like_forward():
    model = tome.patch(tiny_vit(depth=4), r=3)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        final, intermediates = model.forward_intermediates(x, output_fmt="NLC")
        torch.testing.assert_close(final, model.forward_features(x))
    assert [y.shape[1] for y in intermediates] == [13, 10, 7, 4]  # 16 patches + cls, 3 merged per block
    assert model._tome_cfg.slot.state is None
