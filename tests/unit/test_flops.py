"""flops.py: counter handles against hand-derived MAC counts, token counts per block,
and (slow) the published GMACs of the papers' models."""
import pytest
import timm
import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from models import flops

IMG, PATCH, DIM, DEPTH, HEADS, MLP_RATIO, CLASSES = 32, 8, 64, 2, 2, 4, 10


def tiny_vit(fused: bool) -> VisionTransformer:
    model = VisionTransformer(img_size=IMG, patch_size=PATCH, embed_dim=DIM, depth=DEPTH, num_heads=HEADS,
                              mlp_ratio=MLP_RATIO, num_classes=CLASSES, qkv_bias=True)
    for block in model.blocks:
        block.attn.fused_attn = fused
    return model.eval()


def analytic_macs() -> dict:
    """MACs of `tiny_vit` for one image, term by term (fvcore's conventions)."""
    grid = IMG // PATCH
    n = grid * grid + 1  # patches + cls token
    hidden = MLP_RATIO * DIM
    terms = {
        "patch_embed_conv": grid * grid * DIM * (3 * PATCH * PATCH),
        "qkv": DEPTH * n * DIM * 3 * DIM,
        # q @ k^T and attn @ v: per head n*n*head_dim each; summed over heads -> n*n*DIM each
        "attention": DEPTH * 2 * n * n * DIM,
        "proj": DEPTH * n * DIM * DIM,
        "fc1": DEPTH * n * DIM * hidden,
        "fc2": DEPTH * n * hidden * DIM,
        # fvcore: affine LayerNorm = 5 per element; norm1, norm2 per block and the final norm
        "layer_norms": (2 * DEPTH + 1) * 5 * n * DIM,
        "head": DIM * CLASSES,  # applied to the pooled cls token only
    }
    return terms


@pytest.mark.parametrize("fused", [True, False], ids=["sdpa", "explicit"])
def test_fvcore_counts_tiny_vit_exactly(fused):
    model = tiny_vit(fused)
    result = flops.count_flops(model, IMG, counter="fvcore")
    expected = sum(analytic_macs().values())
    assert round(result["gmacs"] * 1e9) == expected
    assert result["gmacs_fvcore"] == result["gmacs"]
    assert result["counter"] == "fvcore"
    assert result["gflops"] == pytest.approx(2 * result["gmacs"])
    assert result["params"] == sum(p.numel() for p in model.parameters())
    assert not any("scaled_dot_product" in op for op in result["skipped_ops_fvcore"])


def test_plain_fvcore_misses_fused_attention():
    """Why the handle exists: without it fvcore silently drops q@k^T and attn@v."""
    from fvcore.nn import FlopCountAnalysis

    model = tiny_vit(fused=True)
    plain = FlopCountAnalysis(model, torch.randn(1, 3, IMG, IMG)).unsupported_ops_warnings(False).total()
    terms = analytic_macs()
    assert plain == sum(terms.values()) - terms["attention"]


def test_batch_size_gives_per_image_count():
    model = tiny_vit(fused=True)
    one = flops.count_flops(model, IMG, counter="fvcore", batch_size=1)["gmacs"]
    three = flops.count_flops(model, IMG, counter="fvcore", batch_size=3)["gmacs"]
    assert three == pytest.approx(one, rel=1e-12)


def test_both_counters_reported_and_compared():
    model = tiny_vit(fused=True)
    result = flops.count_flops(model, IMG, counter="both")
    assert result["counter"] == "fvcore" and result["counters_run"] == ["fvcore", "torchprofile"]
    tp = result["gmacs_torchprofile"]
    # torchprofile counts a LayerNorm as 1 MAC per element instead of fvcore's 5
    n = (IMG // PATCH) ** 2 + 1
    assert round(tp * 1e9) == round(result["gmacs_fvcore"] * 1e9) - (2 * DEPTH + 1) * 4 * n * DIM
    assert result["counters_rel_diff"] == pytest.approx(flops.relative_difference(result["gmacs_fvcore"], tp))
    assert result["counters_disagree"] is False


def test_disagreement_threshold():
    assert flops.relative_difference(100.0, 97.0) == pytest.approx(0.03)
    assert flops.relative_difference(0.0, 0.0) == 0.0
    assert flops.relative_difference(100.0, 99.0) <= flops.DISAGREEMENT_TOLERANCE < flops.relative_difference(100, 97)


def test_attention_macs_grouped_query():
    # q heads 4, kv heads 1 (repeated), Nq 10, Nk 12, Dqk 8, Dv 16
    assert flops.attention_macs([2, 4, 10, 8], [2, 1, 12, 8], [2, 1, 12, 16]) == 2 * 4 * 10 * 12 * (8 + 16)


class TokenReducer(nn.Module):
    """A linear, then the selection / scatter ops the token methods use."""

    in_chans = 3

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(3 * 8 * 8, 16)

    def forward(self, x):
        tokens = self.proj(x.flatten(1)).view(x.shape[0], 4, 4)  # [B, N=4, C=4]
        score = tokens.mean(-1)
        _, keep = score.topk(2, dim=1)
        order = score.argsort(dim=1)
        _, sorted_idx = score.sort(dim=1)
        kept = tokens.gather(1, keep.unsqueeze(-1).expand(-1, -1, 4))
        merged = torch.zeros_like(tokens).scatter_add(1, order.unsqueeze(-1).expand(-1, -1, 4), tokens)
        merged = merged.scatter_reduce(1, sorted_idx.unsqueeze(-1).expand(-1, -1, 4), tokens, reduce="mean")
        summed = torch.zeros(x.shape[0], 4, 4).index_add(1, torch.tensor([0, 1, 1, 0]), merged)
        return kept.sum(1) + summed.sum(1)


def test_token_reduction_ops_count_zero():
    result = flops.count_flops(TokenReducer(), 8, counter="fvcore")
    assert round(result["gmacs"] * 1e9) == 3 * 8 * 8 * 16  # the linear only
    reduction_ops = {"aten::topk", "aten::sort", "aten::argsort", "aten::gather", "aten::scatter_add",
                     "aten::scatter_reduce", "aten::index_add"}
    assert reduction_ops.isdisjoint(result["skipped_ops_fvcore"])


def test_tokens_per_block_vit():
    assert flops.tokens_per_block(tiny_vit(fused=True), IMG) == [(IMG // PATCH) ** 2 + 1] * DEPTH


class HalveTokens(nn.Module):
    def forward(self, x):
        return x[:, : (x.shape[1] + 1) // 2]


class TokenDropper(nn.Module):
    in_chans = 3

    def __init__(self):
        super().__init__()
        self.blocks = nn.Sequential(HalveTokens(), HalveTokens(), HalveTokens())

    def forward(self, x):
        return self.blocks(x.flatten(2).transpose(1, 2))  # [B, H*W, 3]


def test_tokens_per_block_on_a_tiny_evit():
    import models  # noqa: F401

    model = timm.create_model("deit_small_patch16_shrink_base", img_size=64, embed_dim=48, num_heads=3, depth=4,
                              drop_loc=(1, 3), base_keep_rate=0.5, fuse_token=True)
    # 16 patches + cls; block 1 keeps 8 (+ fused), block 3 keeps ceil(0.5 * 9) = 5 (+ fused)
    assert flops.tokens_per_block(model, 64) == [17, 10, 10, 7]


def test_tokens_per_block_follows_reduction_and_conv_maps():
    assert flops.tokens_per_block(TokenDropper(), 4) == [8, 4, 2]

    convnet = nn.Module()
    convnet.blocks = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.Conv2d(8, 8, 3, stride=2, padding=1))
    convnet.forward = lambda x: convnet.blocks(x)
    assert flops.tokens_per_block(convnet, 16) == [64, 16]
    assert flops.tokens_per_block(nn.Sequential(nn.Conv2d(3, 4, 1)), 8) == []


def test_unknown_counter_rejected():
    with pytest.raises(ValueError, match="unknown FLOP counter"):
        flops.count_flops(tiny_vit(fused=True), IMG, counter="ptflops")


# Published numbers (GMACs); the tolerance is the 2 % the project promises.
PUBLISHED = [
    ("deit_small_patch16_224", {}, 4.6),
    ("deit_small_patch16_shrink_base", {"base_keep_rate": 0.7, "fuse_token": True}, 3.0),
    ("dwnet_tiny_patch4_window7_224", {}, 3.743),  # docs/methods/dwnet.md, fvcore
    ("raftmlp_s", {}, 2.101),  # docs/methods/raftmlp.md, fvcore (paper 2.1 G)
]


@pytest.mark.slow
@pytest.mark.parametrize("name,kwargs,gmacs", PUBLISHED, ids=[p[0] for p in PUBLISHED])
def test_published_gmacs(name, kwargs, gmacs):
    import models  # noqa: F401

    if not timm.is_model(name):
        pytest.skip(f"{name} is not registered yet")
    model = timm.create_model(name, **kwargs)
    result = flops.count_flops(model, 224, counter="fvcore")
    assert result["gmacs"] == pytest.approx(gmacs, rel=0.02)


@pytest.mark.slow
def test_evit_tokens_per_block_match_spec():
    import models  # noqa: F401

    if not timm.is_model("deit_small_patch16_shrink_base"):
        pytest.skip("EViT is not registered yet")
    model = timm.create_model("deit_small_patch16_shrink_base", base_keep_rate=0.7, fuse_token=True)
    # docs/methods/evit.md: 0.7 with fusion -> 140, 100, 72 tokens after blocks 3, 6, 9
    assert flops.tokens_per_block(model, 224) == [197] * 3 + [140] * 3 + [100] * 3 + [72] * 3


class PairDistances(nn.Module):
    """torch.cdist of 5 tokens against 3 centres in 3 dims (the clustering methods' distances)."""

    def forward(self, x):
        tokens = x.flatten(2).transpose(1, 2)[:, :5]  # [B, 5, 3]: 5 pixels, 3 channels
        return torch.cdist(tokens, tokens[:, :3])


def test_cdist_counts_one_mac_per_coordinate_pair():
    result = flops.count_flops(PairDistances(), 4, counter="fvcore")
    assert round(result["gmacs"] * 1e9) == 5 * 3 * 3
    assert not any("cdist" in op for op in result["skipped_ops_fvcore"])
