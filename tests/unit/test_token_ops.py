"""Unit tests of the shared token-reduction toolkit (models/token_ops.py)."""
import math

import pytest
import torch

from models import token_ops as ops


def test_keep_count_uses_double_precision_ceil():
    assert 0.55 * 100 > 55  # the float product the official code sees
    assert ops.keep_count(0.55, 100) == 56
    assert ops.keep_count(0.7, 196) == 138
    assert ops.keep_count(1.0, 196) == 196
    assert ops.keep_count(0.999, 196) == 196


def test_class_attention_matches_full_softmax_row():
    q = torch.randn(2, 3, 7, 8)
    k = torch.randn(2, 3, 7, 8)
    full = ((q @ k.transpose(-2, -1)) * 8 ** -0.5).softmax(-1)
    row = ops.class_attention(q[:, :, :1], k, 8 ** -0.5)
    assert row.shape == (2, 7)
    torch.testing.assert_close(row, full[:, :, 0].mean(1), rtol=0, atol=1e-6)


@pytest.mark.parametrize("fuse", [False, True])
@pytest.mark.parametrize("num_prefix", [1, 2])
def test_keep_topk_tokens_order_and_fusion(fuse, num_prefix):
    x = torch.randn(3, num_prefix + 10, 5)
    scores = torch.rand(3, 10)
    out, idx = ops.keep_topk_tokens(x, scores, 4, num_prefix=num_prefix, fuse=fuse)
    assert idx.shape == (3, 4)
    assert out.shape == (3, num_prefix + 4 + int(fuse), 5)
    assert torch.equal(out[:, :num_prefix], x[:, :num_prefix])
    for b in range(3):
        picked = scores[b, idx[b]]
        assert torch.all(picked[:-1] >= picked[1:])  # decreasing score
        assert picked.min() >= scores[b].sort(descending=True).values[3]
        assert torch.equal(out[b, num_prefix:num_prefix + 4], x[b, num_prefix + idx[b]])
        if fuse:
            dropped = sorted(set(range(10)) - set(idx[b].tolist()))
            expected = sum(scores[b, j] * x[b, num_prefix + j] for j in dropped)
            torch.testing.assert_close(out[b, -1], expected, rtol=1e-5, atol=1e-6)


def test_complement_indices_ascending():
    idx = torch.tensor([[4, 0, 2], [1, 3, 5]])
    comp = ops.complement_indices(idx, 6)
    assert comp.tolist() == [[1, 3, 5], [0, 2, 4]]


def test_track_token_positions_composes_with_fused_token():
    # 6 patches; first selection keeps tokens 4 and 1 (fused gets the rest at position 2)
    positions = torch.arange(6).unsqueeze(0)
    positions = ops.track_token_positions(positions, torch.tensor([[4, 1]]), 6, fused=True)
    assert positions.tolist() == [[2, 1, 2, 2, 0, 2]]
    # second selection over 3 tokens keeps the fused token (2) first and drops token 0
    positions = ops.track_token_positions(positions, torch.tensor([[2, 1]]), 3, fused=False)
    assert positions.tolist() == [[0, 1, 0, 0, -1, 0]]
    # a dropped patch stays dropped
    positions = ops.track_token_positions(positions, torch.tensor([[1]]), 2, fused=True)
    assert positions.tolist() == [[1, 0, 1, 1, -1, 1]]


def _loop_matching(metric, r, class_token, distill_token):
    """Direct re-statement of the matching rule for one sample (reference)."""
    m = metric / metric.norm(dim=-1, keepdim=True)
    a, b = m[::2], m[1::2]
    scores = a @ b.T
    if class_token:
        scores[0] = -math.inf
    if distill_token:
        scores[:, 0] = -math.inf
    best, partner = scores.max(dim=-1)
    order = best.argsort(descending=True)
    return order[:r].tolist(), partner[order[:r]].tolist(), order[r:].tolist()


@pytest.mark.parametrize("class_token,distill_token", [(True, False), (True, True), (False, False)])
def test_bipartite_merge_layout_and_sizes(class_token, distill_token):
    torch.manual_seed(1)
    x = torch.randn(2, 15, 6)
    match = ops.bipartite_soft_matching(x, 4, class_token, distill_token)
    merged, size = ops.merge_wavg(match, x)
    assert merged.shape == (2, 11, 6) and size.shape == (2, 11, 1)
    assert torch.all(size.sum(1) == 15)
    for b in range(2):
        src, dst, unm = _loop_matching(x[b], 4, class_token, distill_token)
        if class_token:
            unm = sorted(unm)
            assert 0 not in src
        if distill_token:
            assert 0 not in dst
        kept_a = x[b, ::2][unm]
        new_b = x[b, 1::2].clone()
        counts = torch.ones(new_b.shape[0], 1)
        for s, d in zip(src, dst):
            new_b[d] += x[b, ::2][s]
            counts[d] += 1
        new_b = new_b / counts
        if distill_token:
            expected = torch.cat([kept_a[:1], new_b[:1], kept_a[1:], new_b[1:]])
        else:
            expected = torch.cat([kept_a, new_b])
        torch.testing.assert_close(merged[b], expected, rtol=1e-5, atol=1e-6)
    if class_token:
        torch.testing.assert_close(merged[:, 0], x[:, 0])
        assert torch.all(size[:, 0] == 1)
    if distill_token:
        torch.testing.assert_close(merged[:, 1], x[:, 1])
        assert torch.all(size[:, 1] == 1)


def test_matching_clamps_r_and_identity():
    x = torch.randn(1, 7, 4)
    match = ops.bipartite_soft_matching(x, 100, class_token=True)
    assert match.r == 3  # (7 - 1) // 2
    assert ops.bipartite_soft_matching(x[:, :1], 5, class_token=True) is None
    y, size = ops.merge_wavg(None, x, None)
    assert y is x and size is None


def test_merge_source_and_unmerge():
    torch.manual_seed(2)
    x = torch.randn(2, 11, 5)
    match = ops.bipartite_soft_matching(x, 3, class_token=True)
    source = ops.merge_source(match, x)
    _, size = ops.merge_wavg(match, x)
    assert source.shape == (2, 8, 11)
    assert torch.all(source.sum(1) == 1)  # every original token in exactly one group
    torch.testing.assert_close(source.sum(-1, keepdim=True), size)
    merged = ops.merge_tokens(x, match, mode="mean")
    restored = ops.unmerge_tokens(merged, match)
    assert restored.shape == x.shape
    # tokens that were not merged into come back unchanged
    groups = source.argmax(1)  # [B, T0] group of each original token
    for b in range(2):
        for t in range(11):
            if source[b, groups[b, t]].sum() == 1:
                torch.testing.assert_close(restored[b, t], x[b, t])


def test_wavg_idempotent_on_duplicates():
    base = torch.randn(1, 6, 4)
    x = base.repeat_interleave(2, dim=1)  # token 2i == token 2i+1: each A has an identical B partner
    match = ops.bipartite_soft_matching(x, 6, class_token=False)
    merged, size = ops.merge_wavg(match, x)
    torch.testing.assert_close(merged, base, rtol=1e-6, atol=1e-6)
    assert torch.all(size == 2)


@pytest.mark.parametrize("schedule,expected", [
    ((16, -1), [32, 29, 26, 23, 20, 17, 14, 11, 8, 5, 2, 0]),
    ((16, -0.5), [24, 22, 21, 19, 18, 16, 15, 13, 12, 10, 9, 8]),
    ((16, 1), [0, 2, 5, 8, 11, 14, 17, 20, 23, 26, 29, 32]),
    ((16, 0), [16] * 12),
    (13, [13] * 12),
    ([25] * 8, [25] * 8 + [0] * 4),
])
def test_parse_r_examples(schedule, expected):
    assert ops.parse_r(12, schedule) == expected


@pytest.mark.parametrize("bad", [-1, [3, -2], (4, 2.0), "13", 1.5, True, [1] * 13, (1, 2, 3)])
def test_parse_r_rejects_bad_input(bad):
    with pytest.raises(ValueError):
        ops.parse_r(12, bad)


# ---------------------------------------------------------------------------
# attention_with_keys (EViT, ToMe, the entropy tool) and LTM's neighbourhood merging
# ---------------------------------------------------------------------------

def _attention(qk_norm=False):
    from timm.layers import Attention
    torch.manual_seed(0)
    return Attention(24, num_heads=3, qkv_bias=True, qk_norm=qk_norm, norm_layer=torch.nn.LayerNorm).eval()


@pytest.mark.parametrize("qk_norm", [False, True])
def test_attention_with_keys_is_timm_attention_plus_its_queries_and_keys(qk_norm):
    attn = _attention(qk_norm)
    x = torch.randn(2, 7, 24)
    with torch.no_grad():
        out, q, k = ops.attention_with_keys(attn, x)
        torch.testing.assert_close(out, attn(x), rtol=1e-5, atol=1e-6)
        qkv = attn.qkv(x).reshape(2, 7, 3, 3, 8).permute(2, 0, 3, 1, 4)
    assert q.shape == k.shape == (2, 3, 7, 8)
    torch.testing.assert_close(q, attn.q_norm(qkv[0]))
    torch.testing.assert_close(k, attn.k_norm(qkv[1]))


def test_attention_with_keys_proportional_attention_adds_log_size():
    attn = _attention()
    x = torch.randn(2, 5, 24)
    size = torch.tensor([1.0, 3.0, 1.0, 2.0, 5.0]).expand(2, 5)[..., None]
    with torch.no_grad():
        out, q, k = ops.attention_with_keys(attn, x, size)
        v = attn.qkv(x).reshape(2, 5, 3, 3, 8).permute(2, 0, 3, 1, 4)[2]
        logits = (q * attn.scale) @ k.transpose(-2, -1) + size.log()[:, None, None, :, 0]
        expected = attn.proj((logits.softmax(-1) @ v).transpose(1, 2).reshape(2, 5, 24))
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
        unit, _, _ = ops.attention_with_keys(attn, x, torch.ones(2, 5, 1))
        torch.testing.assert_close(unit, attn(x), rtol=1e-5, atol=1e-6)


def test_neighbor_merge_and_unmerge_against_a_dense_assignment():
    torch.manual_seed(0)
    index = torch.tensor([[0, 1], [1, 2], [2, 0], [0, 2]])  # 4 sources, 2 candidates each, 3 targets
    weight = torch.rand(2, 4, 2)
    tokens = torch.randn(2, 4, 5)
    dense = torch.zeros(2, 4, 3).scatter_add_(2, index.expand(2, -1, -1), weight)  # [B, N, M]
    merged = ops.neighbor_merge(tokens, weight, index, 3)
    torch.testing.assert_close(merged, dense.transpose(1, 2) @ tokens / dense.sum(1)[..., None])
    field = torch.randn(2, 3, 5)
    torch.testing.assert_close(ops.neighbor_unmerge(field, weight, index), dense @ field)
    torch.testing.assert_close(ops.neighbor_dot(tokens, field, index),
                               torch.stack([(tokens * field[:, index[:, t]]).sum(-1) for t in range(2)], -1))
