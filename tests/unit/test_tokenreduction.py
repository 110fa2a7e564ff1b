"""TokenReduction baselines (models/tokenreduction*.py): the checks of the spec's invariants.

Each method is compared with an independent, literal re-statement of the official forward
(explicit attention everywhere, the official loops, e.g. K-Medoids' per-cluster masked sums),
on small models of several shapes, keep rates and locations, in float64 so that discrete
selections cannot flip on rounding.
"""
import json
import math
import os

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F

import models  # noqa: F401  (registers the models)
from models import tokenreduction as tr
from models.errors import ModelConfigError
from models.tokenreduction_clustering import cluster_merge, dpc_knn_cluster, kmedoids_fit
from models.tokenreduction_sinkhorn import sinkhorn_transport

METHODS = tr.METHODS
SMALL = dict(embed_dim=48, num_heads=3, num_classes=10)  # DeiT-S shape at 1/8 width


def build(method, size="small", img_size=64, patch_size=8, dtype=torch.float64, **kwargs):
    model = timm.create_model(f"{method}_{size}_patch16_224", img_size=img_size, patch_size=patch_size,
                              **dict(SMALL, **kwargs)).eval().to(dtype)
    _spread(model)
    return model


def _spread(model):
    """Random weights with some spread (DPC-KNN merge weights exp(score) of moderate range)."""
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("score.weight"):
                param.copy_(torch.randn(param.shape, generator=generator, dtype=param.dtype) * 0.3)
            elif name in ("cls_token", "pos_embed"):
                param.copy_(torch.randn(param.shape, generator=generator, dtype=param.dtype) * 0.2)


# ---------------------------------------------------------------------------
# Independent re-statement of the official forwards
# ---------------------------------------------------------------------------

def ref_attention(blk, x):
    a = blk.attn
    B, N, C = x.shape
    qkv = a.qkv(blk.norm1(x)).reshape(B, N, 3, a.num_heads, C // a.num_heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    attn = ((q @ k.transpose(-2, -1)) * a.scale).softmax(dim=-1)
    return a.proj((attn @ v).transpose(1, 2).reshape(B, N, C)), attn


def ref_kmedoids(x, cluster_num, iterations, token_weight):
    """The official k_medoids_fit, loop for loop (token_weight given)."""
    B, N, C = x.shape
    cluster_idx = torch.topk(token_weight, k=cluster_num, dim=1)[1].squeeze(2)
    dist_matrix = torch.cdist(x, x)
    weighted = dist_matrix * token_weight
    for _ in range(iterations):
        center_matrix = torch.stack([dist_matrix[b][:, cluster_idx[b]] for b in range(B)])
        assignment = torch.argmin(center_matrix, dim=-1)
        for k in range(cluster_num):
            clone = weighted.clone()
            clone[assignment != k] = 1000000
            cluster_idx[:, k] = torch.argmin(torch.sum(clone, dim=-1), dim=1)
    return torch.stack([x[b, cluster_idx[b]] for b in range(B)]), cluster_idx


def ref_dpcknn(x, cluster_num, k, token_weight):
    B, N, C = x.shape
    dist = torch.cdist(x, x) / (C ** 0.5)
    nearest = torch.topk(dist, k=k, dim=-1, largest=False)[0]
    density = (-(nearest ** 2).mean(dim=-1)).exp()
    density = density + torch.rand(density.shape, dtype=density.dtype) * 1e-6
    out = []
    for b in range(B):
        delta = torch.empty(N, dtype=x.dtype)
        dmax = dist[b].max()
        for i in range(N):
            denser = [dist[b, i, j] for j in range(N) if density[b, j] > density[b, i]]
            delta[i] = min(denser) if denser else dmax
        centers = torch.topk(delta * density[b], k=cluster_num)[1]
        assign = dist[b][centers].argmin(dim=0)
        assign[centers] = torch.arange(cluster_num)
        w = token_weight[b, :, 0]
        merged = []
        for c in range(cluster_num):
            members = assign == c
            total = w[members].sum() + 1e-6
            merged.append(((w[members] / total)[:, None] * x[b, members]).sum(0))
        out.append(torch.stack(merged))
    return torch.stack(out)


def ref_sinkhorn(layer, y):
    y = F.normalize(y, dim=-1)
    v = F.normalize(layer.v.detach(), dim=-1)
    scores = (y @ v.T).transpose(1, 2) / layer.eps  # [B, K, N]
    K, N = scores.shape[1:]
    lam = -math.log(K + N)
    u = torch.zeros(scores.shape[:2], dtype=y.dtype)
    t = torch.zeros(scores.shape[0], N, dtype=y.dtype)
    for _ in range(layer.iters):
        u = lam - torch.logsumexp(scores + t[:, None, :], dim=2)
        t = lam - torch.logsumexp(scores + u[:, :, None], dim=1)
    plan = torch.exp(scores + u[:, :, None] + t[:, None, :] - lam)
    return plan @ y


def ref_patchmerger(layer, y):
    y = F.layer_norm(y, y.shape[-1:], layer.norm.weight, layer.norm.bias, eps=1e-5)
    return torch.softmax(layer.queries @ y.transpose(1, 2), dim=-1) @ y


def reference_forward(model, images, method):
    P = model.patch_embed.num_patches
    x = model._pos_embed(model.patch_embed(images))
    attn, cluster = None, 0
    for i, blk in enumerate(model.blocks):
        if method != "topk" and i in model.reduction_loc:
            layer, K = model.cluster_layers[cluster], model.keep_counts[cluster]
            y = x[:, 1:]
            if method == "kmedoids":
                weight = attn.sum(dim=1).sum(dim=1)[:, 1:].unsqueeze(2)
                z = ref_kmedoids(y, K, layer.iters, weight)[0]
            elif method == "dpcknn":
                weight = y.new_ones(y.shape[0], y.shape[1], 1) if layer.equal_weight else layer.score(y).exp()
                z = ref_dpcknn(y, K, layer.k, weight)
            elif method == "sinkhorn":
                z = ref_sinkhorn(layer, y)
            else:
                z = ref_patchmerger(layer, y)
            x = torch.cat([x[:, :1], z], dim=1)
            cluster += 1
        out, attn = ref_attention(blk, x)
        x = x + out
        if method == "topk" and i in model.reduction_loc:
            rate = model.reduction_rates[model.reduction_loc.index(i)]
            K = int(rate * P)
            if K != x.shape[1] - 1:
                idx = torch.topk(attn[:, :, 0, 1:].mean(dim=1), K, dim=1, largest=True, sorted=True)[1]
                x = torch.cat([x[:, :1], torch.stack([x[b, 1:][idx[b]] for b in range(x.shape[0])])], dim=1)
        x = x + blk.mlp(blk.norm2(x))
    return model.head(model.norm(x)[:, 0])


CONFIGS = [
    # (size kwargs, depth, reduction_loc, keep_rate, img)
    (dict(), 4, (1, 2, 3), (0.7,), 64),
    (dict(num_heads=1, embed_dim=24), 5, (1, 3), (0.8, 0.3), 64),       # tiny-like: 1 head
    (dict(num_heads=4, embed_dim=64), 3, (2,), (0.5,), 96),              # base-like: more heads
    (dict(), 6, (1, 2, 4, 5), (0.9,), 64),
]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("config", range(len(CONFIGS)))
def test_matches_literal_official_forward(method, config):
    size, depth, loc, rate, img = CONFIGS[config]
    kwargs = dict(SMALL, **size)
    model = timm.create_model(f"{method}_small_patch16_224", img_size=img, patch_size=8, depth=depth,
                              reduction_loc=loc, keep_rate=rate, **kwargs).eval().double()
    _spread(model)
    x = torch.randn(3, 3, img, img, dtype=torch.float64)
    torch.manual_seed(3)
    with torch.no_grad():
        ref = reference_forward(model, x, method)
        torch.manual_seed(3)
        out = model(x)
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("method", ["kmedoids", "sinkhorn"])
def test_cluster_iters_option(method):
    model = build(method, depth=4, reduction_loc=(1, 3), keep_rate=(0.6,), cluster_iters=5)
    assert all(layer.iters == 5 for layer in model.cluster_layers)
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference_forward(model, x, method), rtol=1e-9, atol=1e-9)


def test_sinkhorn_eps_and_dpcknn_neighbours_options():
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    sink = build("sinkhorn", depth=3, reduction_loc=(1,), keep_rate=(0.5,), sinkhorn_eps=0.05)
    dpc = build("dpcknn", depth=3, reduction_loc=(0, 2), keep_rate=(0.5,), k_neighbors=3)
    with torch.no_grad():
        torch.testing.assert_close(sink(x), reference_forward(sink, x, "sinkhorn"), rtol=1e-9, atol=1e-9)
        torch.manual_seed(1)
        ref = reference_forward(dpc, x, "dpcknn")
        torch.manual_seed(1)
        torch.testing.assert_close(dpc(x), ref, rtol=1e-9, atol=1e-9)


# ---------------------------------------------------------------------------
# Section 14 checks
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("method", METHODS)
def test_no_locations_is_deit(method):
    deit = timm.create_model("deit_small_patch16_224", img_size=64, patch_size=8, depth=3, **SMALL).eval()
    model = timm.create_model(f"{method}_small_patch16_224", img_size=64, patch_size=8, depth=3, reduction_loc=(),
                              **SMALL).eval()
    model.load_state_dict(deit.state_dict(), strict=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), deit(x), rtol=1e-5, atol=1e-5)
    if method == "topk":
        every = timm.create_model("topk_small_patch16_224", img_size=64, patch_size=8, depth=3,
                                  reduction_loc=(0, 1, 2), keep_rate=(1.0,), **SMALL).eval()
        every.load_state_dict(deit.state_dict(), strict=True)
        with torch.no_grad():
            torch.testing.assert_close(every(x), deit(x), rtol=1e-5, atol=1e-5)


COUNT_TABLE = {0.9: (176, 158, 142), 0.8: (156, 125, 100), 0.7: (137, 96, 67), 0.6: (117, 70, 42),
               0.5: (98, 49, 24), 0.25: (49, 12, 3)}


@pytest.mark.parametrize("rate", sorted(COUNT_TABLE))
def test_count_table(rate):
    plan = tr.reduction_plan("topk", (3, 6, 9), (rate,), 196, 12)
    assert plan.counts == COUNT_TABLE[rate]
    assert plan.counts == tuple(int(rate ** (i + 1) * 196) for i in range(3))


def test_per_location_rates_do_not_compound():
    plan = tr.reduction_plan("sinkhorn", (3, 6, 9), (0.9, 0.7, 0.55), 196, 12)
    assert plan.counts == (int(0.9 * 196), int(0.7 * 196), int(0.55 * 196)) == (176, 137, 107)


@pytest.mark.parametrize("method", METHODS)
def test_tokens_after_each_block_at_224(method):
    model = timm.create_model(f"{method}_small_patch16_224", keep_rate=0.7, embed_dim=24, num_heads=2,
                              num_classes=10).eval()
    lengths, attention = [], []
    for block in model.blocks:
        block.register_forward_hook(lambda m, a, out: lengths.append(out.shape[1]))
    model.blocks[3].attn.register_forward_hook(lambda m, a, out: attention.append(a[0].shape[1]))
    model.blocks[3].norm1.register_forward_hook(lambda m, a, out: attention.append(out.shape[1]))
    with torch.no_grad():
        model(torch.randn(1, 3, 224, 224))
    assert lengths == [197] * 3 + [138] * 3 + [97] * 3 + [68] * 3
    assert model.keep_counts == (137, 96, 67)
    assert attention[-1] == (197 if method == "topk" else 138)


def test_topk_equals_evit_with_explicit_tokens():
    model = build("topk", dtype=torch.float32, depth=6, reduction_loc=(1, 3, 4), keep_rate=(0.7,))
    evit = timm.create_model("deit_small_patch16_shrink_base", img_size=64, patch_size=8, depth=6, fuse_token=False,
                             drop_loc=(), **SMALL).eval()
    evit.load_state_dict(model.state_dict(), strict=True)
    tokens = [None] * 6
    for loc, count in zip(model.reduction_loc, model.keep_counts):
        tokens[loc] = count
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        out, kept = model(x, get_idx=True)
        torch.testing.assert_close(out, evit(x, tokens=tokens), rtol=1e-5, atol=1e-5)
    assert [k.shape[1] for k in kept] == list(model.keep_counts)


def test_topk_keeps_the_most_attended_in_decreasing_order():
    model = build("topk", depth=3, reduction_loc=(1,), keep_rate=(0.5,))
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    seen = {}
    model.blocks[0].register_forward_hook(lambda m, a, out: seen.__setitem__("x", out))
    with torch.no_grad():
        _, kept = model(x, get_idx=True)
        _, attn = ref_attention(model.blocks[1], seen["x"])
    scores = attn[:, :, 0, 1:].mean(dim=1)
    expected = scores.topk(32, dim=1).indices
    assert torch.equal(kept[0], expected)
    assert torch.all(scores.gather(1, kept[0]).diff(dim=1) <= 0)


def test_topk_repeated_rate_is_no_pruning_at_that_location():
    """Q1: (0.7, 0.7, 0.4) at (3, 6, 9) == (0.7, 0.4) at (3, 9) (the official code crashes)."""
    a = build("topk", dtype=torch.float32, reduction_loc=(3, 6, 9), keep_rate=(0.7, 0.7, 0.4))
    b = build("topk", dtype=torch.float32, reduction_loc=(3, 9), keep_rate=(0.7, 0.4))
    b.load_state_dict(a.state_dict(), strict=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)


@pytest.mark.parametrize("method,kwargs", [
    ("topk", dict(keep_rate=(0.7, 0.5))),                       # 2 rates for 3 locations
    ("sinkhorn", dict(keep_rate=(1.2,))),                       # rate outside (0, 1]
    ("patchmerger", dict(keep_rate=(0.0,))),
    ("dpcknn", dict(keep_rate=(0.01,))),                        # int(0.01 * 64) = 0 tokens
    ("topk", dict(keep_rate=(0.5, 0.7, 0.4))),                  # counts increase
    ("kmedoids", dict(keep_rate=(0.5, 0.7, 0.4))),
    ("dpcknn", dict(reduction_loc=(6, 3, 9))),                  # not increasing
    ("sinkhorn", dict(reduction_loc=(3, 3, 9))),                # duplicate
    ("patchmerger", dict(reduction_loc=(3, 6, 12))),            # outside 0..11
    ("kmedoids", dict(reduction_loc=(0, 6, 9))),                # Q4
    ("kmedoids", dict(cluster_iters=-1)),
    ("dpcknn", dict(k_neighbors=0)),
    ("sinkhorn", dict(sinkhorn_eps=0.0)),
    ("topk", dict(distilled=True)),                             # Q11
    ("kmedoids", dict(class_token=False, global_pool="avg")),
])
def test_invalid_configurations_raise_at_construction(method, kwargs):
    with pytest.raises(ModelConfigError) as info:
        timm.create_model(f"{method}_small_patch16_224", img_size=64, patch_size=8, **dict(SMALL, **kwargs))
    assert "\n" not in str(info.value)


def test_increasing_counts_allowed_for_soft_merging():
    """Sinkhorn and PatchMerger run fine with more clusters than tokens (as the official code)."""
    for method in ("sinkhorn", "patchmerger"):
        model = build(method, depth=3, reduction_loc=(1, 2), keep_rate=(0.25, 0.5))
        with torch.no_grad():
            assert model(torch.randn(1, 3, 64, 64, dtype=torch.float64)).shape == (1, 10)


def _results(model, x):
    """(block index, ClusterResult) of one forward, recorded through the model's state."""
    records = []
    original = tr.ReductionBlock._reduce

    def spy(self, tokens, state):
        out = original(self, tokens, state)
        records.append((self.block_index, tokens[:, 1:], state.results[-1][1]))
        return out
    tr.ReductionBlock._reduce = spy
    try:
        with torch.no_grad():
            model(x)
    finally:
        tr.ReductionBlock._reduce = original
    return records


def test_kmedoids_outputs_are_input_tokens():
    model = build("kmedoids", depth=4, reduction_loc=(1, 3), keep_rate=(0.6,))
    for _, y, result in _results(model, torch.randn(2, 3, 64, 64, dtype=torch.float64)):
        for b in range(y.shape[0]):
            for token in result.tokens[b]:
                assert (y[b] == token).all(dim=-1).any()
        assert torch.equal(result.tokens, y.gather(1, result.centers[..., None].expand(-1, -1, y.shape[-1])))


def test_kmedoids_zero_iterations_keeps_the_heaviest_tokens():
    model = build("kmedoids", depth=3, reduction_loc=(2,), keep_rate=(0.4,), cluster_iters=0)
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    seen = {}
    model.blocks[1].register_forward_hook(lambda m, args, out: seen.__setitem__("x", args[0]))
    (_, y, result), = _results(model, x)
    with torch.no_grad():
        _, attn = ref_attention(model.blocks[1], seen["x"])
    weight = attn.sum(dim=(1, 2))[:, 1:]  # over heads and ALL query rows
    assert torch.equal(result.centers, weight.argsort(dim=1, descending=True)[:, :model.keep_counts[0]])


def test_kmedoids_kernel_matches_loop_and_empty_clusters_get_token_0():
    y = torch.randn(2, 40, 8, dtype=torch.float64)
    weight = torch.rand(2, 40, 1, dtype=torch.float64)
    result = kmedoids_fit(y, 12, 4, weight)
    ref_tokens, ref_idx = ref_kmedoids(y, 12, 4, weight.clone())
    assert torch.equal(result.centers, ref_idx) and torch.equal(result.tokens, ref_tokens)
    # duplicated points: several medoids coincide, the empty clusters fall back to token 0
    dup = torch.cat([y[:, :1].expand(-1, 20, -1), y[:, 1:21]], dim=1)
    result = kmedoids_fit(dup, 12, 2, torch.ones(2, 40, 1, dtype=torch.float64))
    assert torch.equal(result.centers, ref_kmedoids(dup, 12, 2, torch.ones(2, 40, 1, dtype=torch.float64))[1])


def test_kmedoids_equal_weight_uses_numpy_global_rng():
    model = build("kmedoids", depth=3, reduction_loc=(1,), keep_rate=(0.25,), equal_weight=True, cluster_iters=0)
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    np.random.seed(4)
    a = model(x)
    np.random.seed(4)
    assert torch.equal(a, model(x))
    np.random.seed(4)
    start = int(np.random.choice(np.arange(64), 1)[0])
    np.random.seed(4)
    (_, y, result), = _results(model, x)
    dist = torch.cdist(y, y)
    for b in range(2):
        chosen = [start]  # the same start for the whole batch
        for _ in range(1, result.centers.shape[1]):
            d = dist[b][:, chosen].clone()
            d[chosen] = 0
            chosen.append(int(d.max(dim=1).values.argmax()))  # largest MAXIMUM distance
        assert result.centers[b].tolist() == chosen


def test_dpcknn_partition_and_equal_weight_means():
    y = torch.randn(2, 50, 12, dtype=torch.float64)
    assignment, centers = dpc_knn_cluster(y, 9, 5)
    assert assignment.shape == (2, 50) and assignment.min() >= 0 and assignment.max() < 9
    assert torch.equal(assignment.gather(1, centers), torch.arange(9).expand(2, 9))
    merged = cluster_merge(y, assignment, 9)
    for b in range(2):
        for k in range(9):
            members = y[b, assignment[b] == k]
            n = members.shape[0]
            torch.testing.assert_close(merged[b, k], members.mean(0) * n / (n + 1e-6), rtol=1e-12, atol=1e-12)


def test_dpcknn_seeded_forwards_are_bitwise_equal():
    model = build("dpcknn", dtype=torch.float32, depth=4, reduction_loc=(0, 2), keep_rate=(0.5,))
    x = torch.randn(2, 3, 64, 64)
    torch.manual_seed(11)
    a = model(x)
    torch.manual_seed(11)
    b = model(x)
    assert torch.equal(a, b)
    assert sum(1 for n, _ in model.named_parameters() if n.startswith("cluster_layers")) == 4


def test_dpcknn_equal_weight_has_no_score_layer():
    model = build("dpcknn", depth=3, reduction_loc=(1,), keep_rate=(0.5,), equal_weight=True)
    assert not any(k.startswith("cluster_layers") for k in model.state_dict())
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    torch.manual_seed(2)
    ref = reference_forward(model, x, "dpcknn")
    torch.manual_seed(2)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref, rtol=1e-9, atol=1e-9)


def test_sinkhorn_unit_centres_and_column_sums():
    model = build("sinkhorn", dtype=torch.float32, depth=3, reduction_loc=(1, 2), keep_rate=(0.5,))
    assert not torch.allclose(model.cluster_layers[0].v.norm(dim=-1), torch.ones(32))
    records = _results(model, torch.randn(2, 3, 64, 64))
    for layer in model.cluster_layers:
        torch.testing.assert_close(layer.v.norm(dim=-1), torch.ones(layer.v.shape[0]), atol=1e-6, rtol=0)
    for _, _, result in records:
        torch.testing.assert_close(result.soft.sum(dim=1), torch.ones(2, result.soft.shape[2]), atol=1e-5, rtol=0)
    scores = torch.randn(3, 7, 20)
    plan = sinkhorn_transport(scores, 0.5, 4)
    torch.testing.assert_close(plan.sum(dim=1), torch.ones(3, 20), atol=1e-5, rtol=0)


def test_sinkhorn_gradient_at_unit_centres_and_in_place_write():
    """Q7: the parameter is overwritten by its normalised value and the gradient is taken there."""
    model = build("sinkhorn", dtype=torch.float64, depth=2, reduction_loc=(1,), keep_rate=(0.5,)).train()
    layer = model.cluster_layers[0]
    before = layer.v.detach().clone()
    model(torch.randn(2, 3, 64, 64, dtype=torch.float64)).sum().backward()
    torch.testing.assert_close(layer.v.detach(), F.normalize(before, dim=-1), rtol=0, atol=1e-15)
    assert layer.v.grad is not None and layer.v.grad.abs().sum() > 0


def test_patchmerger_rows_and_output():
    model = build("patchmerger", depth=3, reduction_loc=(1,), keep_rate=(0.5,))
    (_, y, result), = _results(model, torch.randn(2, 3, 64, 64, dtype=torch.float64))
    torch.testing.assert_close(result.soft.sum(dim=-1), torch.ones(2, 32, dtype=torch.float64))
    layer = model.cluster_layers[0]
    assert layer.norm.eps == 1e-5
    with torch.no_grad():
        torch.testing.assert_close(result.tokens, ref_patchmerger(layer, y))


# ---------------------------------------------------------------------------
# State dicts, checkpoints, batch independence, training mode
# ---------------------------------------------------------------------------

KEY_FILES = {
    "topk": ("deit_small_patch16_224.json", {}),
    "kmedoids": ("deit_small_patch16_224.json", {}),
    "dpcknn": ("dpcknn_small_patch16_224__loc_3_6_9.json", dict(keep_rate=(0.7,))),
    "dpcknn_base": ("dpcknn_base_patch16_224__loc_0_4_8.json", dict(reduction_loc=(0, 4, 8))),
    "sinkhorn": ("sinkhorn_small_patch16_224__loc_3_6_9__clusters_137_96_67.json", dict(keep_rate=(0.7,))),
    "sinkhorn_tiny": ("sinkhorn_tiny_patch16_224__loc_3_6_9__clusters_98_49_24.json", dict(keep_rate=(0.5,))),
    "patchmerger": ("patchmerger_small_patch16_224__loc_3_6_9__clusters_137_96_67.json", dict(keep_rate=(0.7,))),
    "patchmerger_base": ("patchmerger_base_patch16_224__loc_2_5_8__clusters_176_158_142.json",
                         dict(reduction_loc=(2, 5, 8), keep_rate=(0.9, 0.81, 0.729))),
}


@pytest.mark.parametrize("case", sorted(KEY_FILES))
def test_state_dict_layout_matches_official(case, shared_dir):
    filename, kwargs = KEY_FILES[case]
    method, _, size = case.partition("_")
    size = size or "small"
    with open(os.path.join(shared_dir, "parity", "keys", filename)) as f:
        expected = {k: tuple(v[0]) for k, v in json.load(f).items()}
    with torch.device("meta"):
        model = timm.create_model(f"{method}_{size}_patch16_224", **kwargs)
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == expected


@pytest.mark.parametrize("method", METHODS)
def test_deit_checkpoint_loads(method):
    deit = timm.create_model("deit_small_patch16_224", img_size=64, patch_size=8, depth=4, **SMALL)
    model = timm.create_model(f"{method}_small_patch16_224", img_size=64, patch_size=8, depth=4,
                              reduction_loc=(1, 3), **SMALL)
    missing, unexpected = model.load_state_dict(deit.state_dict(), strict=False)
    assert unexpected == []
    assert set(missing) == {k for k in model.state_dict() if k.startswith("cluster_layers.")}
    if method in ("topk", "kmedoids"):
        assert missing == []
    filtered = tr.checkpoint_filter(deit.state_dict(), model)
    model.load_state_dict(filtered, strict=True)


@pytest.mark.parametrize("method", METHODS)
def test_batch_independence_and_training_mode(method):
    model = build(method, depth=4, reduction_loc=(1, 3), keep_rate=(0.6,))
    x = torch.randn(3, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        torch.manual_seed(0)
        batch = model(x)
        for i in range(3):
            torch.manual_seed(0)
            torch.testing.assert_close(model(x[i:i + 1]), batch[i:i + 1], rtol=1e-9, atol=1e-9)
        model.train()
        torch.manual_seed(0)
        torch.testing.assert_close(model(x), batch, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("method", METHODS)
def test_backward_reaches_every_parameter(method):
    model = build(method, dtype=torch.float32, depth=4, reduction_loc=(1, 3), keep_rate=(0.6,)).train()
    model(torch.randn(2, 3, 64, 64)).sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert missing == []


# ---------------------------------------------------------------------------
# viz_mode, official constructor arguments
# ---------------------------------------------------------------------------

VIZ_KEYS = {
    "topk": {"Kept_Tokens", "Features"},
    "kmedoids": {"Kept_Tokens", "Assignment_Maps", "Center_Feats", "Features"},
    "dpcknn": {"Kept_Tokens", "Assignment_Maps", "Center_Feats", "Features"},
    "sinkhorn": {"Assignment_Maps", "Soft_Assignment_Maps", "Center_Feats", "Features"},
    "patchmerger": {"Assignment_Maps", "Soft_Assignment_Maps", "Center_Feats", "Features"},
}


@pytest.mark.parametrize("method", METHODS)
def test_viz_mode(method):
    model = build(method, dtype=torch.float32, depth=4, reduction_loc=(1, 3), keep_rate=(0.5,), viz_mode=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        logits, viz = model(x)
        model.viz_mode = False
        plain = model(x)
    torch.testing.assert_close(logits, plain)
    assert set(viz) == VIZ_KEYS[method]
    assert model.get_reduction_count() == (1, 3)
    assert model.get_new_module_names() == ([] if method == "topk" else ["cluster_layers"])
    K = model.keep_counts
    if method == "topk":
        assert {k: v.shape for k, v in viz["Kept_Tokens"].items()} == {1: (2, K[0]), 3: (2, K[1])}
        assert {k: v.shape for k, v in viz["Features"].items()} == {1: (2, 1 + K[0], 48), 3: (2, 1 + K[1], 48)}
    else:
        assert sorted(viz["Features"]) == [0, 1, 2, 3]
        assert {k: v.shape for k, v in viz["Assignment_Maps"].items()} == {1: (2, 64), 3: (2, K[0])}
        assert {k: v.shape for k, v in viz["Center_Feats"].items()} == {1: (2, K[0], 48), 3: (2, K[1], 48)}
        if "Soft_Assignment_Maps" in viz:
            assert {k: v.shape for k, v in viz["Soft_Assignment_Maps"].items()} == {1: (2, K[0], 64),
                                                                                      3: (2, K[1], K[0])}
        else:
            assert {k: v.shape for k, v in viz["Kept_Tokens"].items()} == {1: (2, K[0]), 3: (2, K[1])}
    assert all(isinstance(v, np.ndarray) for group in viz.values() for v in group.values())
    model.viz_mode = True
    model.train()
    assert isinstance(model(x), torch.Tensor)


def test_official_args_namespace():
    import argparse
    args = argparse.Namespace(reduction_loc=[1, 2], keep_rate=[0.5], cluster_iters=2, equal_weight=False,
                              k_neighbors=3, sinkhorn_eps=0.5, viz_mode=False, model="x", lr=1.0)
    model = timm.create_model("sinkhorn_small_patch16_224", img_size=64, patch_size=8, depth=3, args=args,
                              keep_rate=0.25, **SMALL)
    assert model.reduction_loc == (1, 2) and model.keep_counts == (16, 4)  # explicit kwarg wins
    assert model.cluster_layers[0].iters == 2 and model.cluster_layers[0].eps == 0.5
    dpc = timm.create_model("dpcknn_small_patch16_224", img_size=64, patch_size=8, depth=3, args=args, **SMALL)
    assert dpc.cluster_layers[0].k == 3 and dpc.keep_counts == (32, 16)


def test_method_options_of_other_methods_are_refused():
    with pytest.raises(ModelConfigError, match="k_neighbors is an option of the dpcknn models"):
        timm.create_model("sinkhorn_small_patch16_224", img_size=64, patch_size=8, k_neighbors=3, **SMALL)
    model = timm.create_model("topk_small_patch16_224", img_size=64, patch_size=8, equal_weight=None, **SMALL)
    assert model.keep_counts == (57, 51, 46)


def test_deepcopy_keeps_reducers_attached_to_their_own_cluster_layers():
    import copy
    model = build("dpcknn", depth=4, reduction_loc=(1, 3), keep_rate=(0.5,))
    clone = copy.deepcopy(model)
    for loc, layer in zip(clone.reduction_loc, clone.cluster_layers):
        assert clone.blocks[loc].reducer is layer
        assert model.blocks[loc].reducer is not layer
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    torch.manual_seed(0)
    a = model(x)
    torch.manual_seed(0)
    assert torch.equal(clone(x), a)


def test_sinkhorn_repeated_evaluations_are_bitwise_stable():
    model = build("sinkhorn", dtype=torch.float32, depth=3, reduction_loc=(1,), keep_rate=(0.5,))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        first = model(x)
        v = model.cluster_layers[0].v.detach().clone()
        assert torch.equal(model(x), first) and torch.equal(model.cluster_layers[0].v, v)


# ---------------------------------------------------------------------------
# bf16: selection in fp32, models close to fp32
# ---------------------------------------------------------------------------

def test_selection_kernels_run_the_fp32_path_of_bf16_inputs():
    y = torch.randn(2, 40, 16).bfloat16()
    weight = torch.rand(2, 40, 1).bfloat16()
    a, b = kmedoids_fit(y, 10, 3, weight), kmedoids_fit(y.float(), 10, 3, weight.float())
    assert torch.equal(a.centers, b.centers) and torch.equal(a.assignment, b.assignment)
    assert a.tokens.dtype == torch.bfloat16 and torch.equal(a.tokens.float(), b.tokens)
    torch.manual_seed(0)
    assign, centres = dpc_knn_cluster(y, 10, 5)
    torch.manual_seed(0)
    assign32, centres32 = dpc_knn_cluster(y.float(), 10, 5)
    assert torch.equal(assign, assign32) and torch.equal(centres, centres32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch.manual_seed(0)
        assert torch.equal(dpc_knn_cluster(y.float(), 10, 5)[1], centres32)


@pytest.mark.parametrize("method", METHODS)
def test_bf16_autocast_and_bf16_weights_stay_close_to_fp32(method):
    from utils.precision import cast_for_inference
    model = build(method, dtype=torch.float32, depth=4, reduction_loc=(1, 3), keep_rate=(0.75,))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.manual_seed(0)
        ref = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            torch.manual_seed(0)
            auto = model(x)
        torch.manual_seed(0)
        cast = cast_for_inference(model, torch.bfloat16)(x)
    assert cast.dtype == torch.bfloat16
    for out in (auto, cast):
        assert torch.isfinite(out.float()).all()
        assert (out.float() - ref).abs().max() < 0.15 * ref.abs().max()
