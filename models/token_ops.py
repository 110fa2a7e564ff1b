"""Token-reduction toolkit shared by EViT, ToMe, the attention-shrink models and LTM.

Pure functions on token tensors `[B, N, C]` (batch, tokens, channels). Nothing here
holds state between calls; callers keep per-forward state (sizes, sources, kept
indices) in their own small objects.

Two families of operations:

* Pruning by class attention (EViT, arXiv 2202.07800): keep the `K` tokens the class
  token attends to most (`keep_count`, `keep_topk_tokens`), optionally fusing the
  rest into one token weighted by their (not renormalised) attention.
* Bipartite soft matching (ToMe, arXiv 2210.09461): merge `r` tokens of an
  alternating split into their most similar partner (`bipartite_soft_matching`,
  `merge_tokens`, `merge_wavg`, `merge_source`, `unmerge_tokens`), with the class
  and distillation tokens protected, and the `r` schedule parser `parse_r`.

Shared by several methods: `attention_with_keys`, a timm attention forward (fused SDPA,
optional proportional attention) that also returns queries and keys; and LTM's
neighbourhood merging over a `[N, T]` candidate table (`neighbor_merge`,
`neighbor_unmerge`, `neighbor_dot` and the differentiable gather/scatter sums).

One holder of per-forward state, `StateSlot`: a model makes its method's state object
(sizes, sources, kept indices) at the start of its forward, puts it in the slot it shares
with its blocks, and clears it at the end, so blocks keep timm's `Tensor -> Tensor` forward.

What every in-place, reversible patch (ToMe, ToFu, PiToMe, DiffRate) shares: the class swap
(`patched_class`, `restore_classes`) and the block contract of the attention-shrink models
(`has_attention_now`, `attention_residual`).
"""
from __future__ import annotations

import functools
import math
from numbers import Integral, Real
from typing import NamedTuple, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

__all__ = [
    "StateSlot", "pointwise",
    "selection_precision", "keep_count", "class_attention", "keep_topk_tokens", "complement_indices", "fuse_tokens",
    "track_token_positions",
    "BipartiteMatch", "bipartite_soft_matching", "merge_tokens", "unmerge_tokens", "merge_wavg",
    "merge_source", "parse_r",
    "AttentionWithKeys", "attention_with_keys",
    "neighbor_dot", "neighbor_gather_sum", "neighbor_scatter_sum", "neighbor_merge", "neighbor_unmerge",
    "patched_class", "restore_classes", "has_attention_now", "attention_residual",
]


def pointwise(module, tokens: torch.Tensor) -> torch.Tensor:
    """A per-pixel module (1x1 conv, BN, activation) of a hybrid backbone on tokens `[B, N, C]` ->
    `[B, N, C']` (tokens as an `N x 1` image)."""
    return module(tokens.transpose(1, 2).unsqueeze(-1)).squeeze(-1).transpose(1, 2)


class StateSlot:
    """The per-forward state object of the forward in progress, shared by a model and its blocks.

    `state` is None outside a forward. The model sets it in a try/finally (`open` / `close`),
    which Dynamo traces; a nested call (forward -> forward_features) sees the outer state.
    """
    __slots__ = ("state",)

    def __init__(self):
        self.state = None

    def open(self, state):
        """Make `state` current; returns the previous one, to hand back to `close`."""
        outer, self.state = self.state, state
        return outer

    def close(self, outer=None) -> None:
        self.state = outer


# ---------------------------------------------------------------------------
# In-place patches: the class swap and the attention-shrink block contract
# ---------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def patched_class(mixin: type, base: type, method: str) -> type:
    """`base` with `mixin` placed before it, named `<method><base>` (e.g. `ToMeBlock`), remembering `base`
    as `_<method, lower case>_base_class` for `restore_classes`. One class per (mixin, base, method)."""
    return type(f"{method}{base.__name__}", (mixin, base),
                {f"_{method.lower()}_base_class": base, "__module__": mixin.__module__})


def restore_classes(model: torch.nn.Module, method: str, attributes: Sequence[str] = (),
                    submodules: Sequence[str] = ()) -> torch.nn.Module:
    """Undo the `patched_class` swaps of `method` in `model`: every swapped module gets its original class
    back and loses the instance `attributes` and the `submodules` the patch added. No-op if not patched."""
    marker = f"_{method.lower()}_base_class"
    for module in model.modules():
        base = type(module).__dict__.get(marker)
        if base is not None:
            module.__class__ = base
            for name in submodules:
                if name in module._modules:
                    del module._modules[name]
            for name in attributes:
                module.__dict__.pop(name, None)
    return model


def has_attention_now(block: torch.nn.Module) -> bool:
    """Whether a block uses attention at call time (the block contract of models/shrink.py: a deployed
    `ShrinkBlock` has `has_attention = False`, a lambda block whose `attention_weight()` is 0 skips it)."""
    if not getattr(block, "has_attention", True) or getattr(block, "attn", None) is None:
        return False
    weight = getattr(block, "attention_weight", None)
    return weight is None or float(weight()) != 0.0


def attention_residual(block: torch.nn.Module, x: torch.Tensor, attn_out: torch.Tensor) -> torch.Tensor:
    """The attention residual of `block`: `x + attn_out`, or a lambda block's diluted
    `(2 - lam) x + lam attn_out` (lam = `block.attention_weight()`)."""
    weight = getattr(block, "attention_weight", None)
    if weight is None:
        return x + attn_out
    lam = float(weight())
    return (2 - lam) * x + lam * attn_out


# ---------------------------------------------------------------------------
# Precision of token-selection scores
# ---------------------------------------------------------------------------

def selection_precision(tensor: torch.Tensor):
    """Context in which a token-selection score (which tokens are kept or merged) is computed.

    Autocast is switched off, so matmuls on float32 operands stay float32; callers upcast
    their operands with `.float()` (a no-op for fp32 tensors, so fp32 runs are unchanged).
    Under bf16 (autocast or bf16 weights) the scores then differ from fp32 only through
    their inputs, not through bf16 rounding of the score itself.
    """
    return torch.autocast(device_type=tensor.device.type, enabled=False)


# ---------------------------------------------------------------------------
# Pruning by class attention (EViT)
# ---------------------------------------------------------------------------

def keep_count(keep_rate: float, num_candidates: int) -> int:
    """Tokens kept out of `num_candidates`: `ceil(keep_rate * num_candidates)`.

    Computed on Python floats (double precision) on purpose: the official code does,
    so e.g. 0.55 * 100 = 55.000000000000007 keeps 56.
    """
    return math.ceil(keep_rate * num_candidates)


def class_attention(q_cls: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """Head-averaged attention probabilities of the class query over all keys.

    q_cls: `[B, H, 1, D]` class-token query; k: `[B, H, N, D]` keys.
    Returns `[B, N]` float32 = mean over heads of `softmax(q_cls k^T * scale)`. Only this
    one row is computed, so no `[B, H, N, N]` matrix is needed. Computed in float32 (q/k
    upcast, autocast off) so that bf16 runs keep the tokens fp32 runs keep wherever the
    scores are not near-ties; fp32 inputs give the same bits as before.
    """
    with selection_precision(k):
        logits = (q_cls.float() * scale) @ k.float().transpose(-2, -1)  # [B, H, 1, N]
        return logits.softmax(dim=-1).mean(dim=1).squeeze(1)


def keep_topk_tokens(
        x: torch.Tensor,
        scores: torch.Tensor,
        k: int,
        num_prefix: int = 1,
        fuse: bool = False,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Keep the `k` highest-scoring non-prefix tokens, optionally fusing the rest.

    x: `[B, N, C]`, the first `num_prefix` tokens (class / distillation) are always kept.
    scores: `[B, N - num_prefix]` importance of each non-prefix token (EViT: class
    attention). Returns `(x_new, idx)`:
    idx `[B, k]` indices into the non-prefix tokens, by decreasing score;
    x_new `[B, num_prefix + k (+1), C]` = prefix tokens, kept tokens in `idx` order and,
    with `fuse`, one token `sum_j scores_j * x_j` over the dropped tokens appended last
    (weights not renormalised).
    """
    idx = scores.topk(k, dim=1, largest=True, sorted=True).indices
    patches = x[:, num_prefix:]
    kept = patches.gather(1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
    parts = [x[:, :num_prefix], kept]
    if fuse:
        parts.append(fuse_tokens(patches, scores, idx))
    return torch.cat(parts, dim=1), idx


def fuse_tokens(tokens: torch.Tensor, weights: torch.Tensor, keep_idx: torch.Tensor) -> torch.Tensor:
    """Weighted sum of the tokens *not* in `keep_idx`.

    tokens: `[B, M, C]`; weights: `[B, M]`; keep_idx: `[B, K]` indices into M.
    Returns `[B, 1, C]` = `sum_{j not in keep_idx} weights_j * tokens_j`.
    Implemented as one batched matmul with the kept weights zeroed, which avoids
    gathering the complement.
    """
    dropped_weights = weights.scatter(1, keep_idx, 0.0)
    return torch.bmm(dropped_weights.unsqueeze(1).to(tokens.dtype), tokens)


def complement_indices(idx: torch.Tensor, n: int) -> torch.Tensor:
    """Indices in `range(n)` absent from each row of `idx`, ascending.

    idx: `[B, K]` distinct indices. Returns `[B, n - K]`.
    """
    mask = torch.ones(idx.shape[0], n, dtype=torch.bool, device=idx.device)
    mask.scatter_(1, idx, False)
    order = torch.sort(mask.to(torch.uint8), dim=1, descending=True, stable=True).indices
    return order[:, : n - idx.shape[1]]


def track_token_positions(positions: torch.Tensor, keep_idx: torch.Tensor, num_tokens: int, fused: bool) -> torch.Tensor:
    """Follow original patches through one top-k selection.

    positions: `[B, P]` the current (non-prefix) token index holding each original
    patch, -1 for patches already dropped. keep_idx: `[B, K]` selection among the
    `num_tokens` current tokens. Returns the new `[B, P]` positions: kept tokens move
    to their rank in `keep_idx`; the others go to position K (the fused token) when
    `fused`, else -1. Composes correctly with a previously fused token.
    """
    batch, k = keep_idx.shape
    remap = torch.full((batch, num_tokens + 1), k if fused else -1, dtype=torch.long, device=keep_idx.device)
    remap[:, -1] = -1  # slot for "already dropped" (positions == -1 indexes the last column)
    ranks = torch.arange(k, device=keep_idx.device).expand(batch, k)
    remap.scatter_(1, keep_idx, ranks)
    return remap.gather(1, torch.where(positions < 0, num_tokens, positions))


# ---------------------------------------------------------------------------
# Attention that also returns its queries and keys (EViT, ToMe, entropy tool)
# ---------------------------------------------------------------------------

class AttentionWithKeys(NamedTuple):
    """Result of `attention_with_keys`.

    out: `[B, N, C]` the attention module's output (after `proj` / `proj_drop`).
    q, k: `[B, H, N, D]` queries and keys after `q_norm` / `k_norm`, not yet scaled.
    """
    out: torch.Tensor
    q: torch.Tensor
    k: torch.Tensor


def attention_with_keys(attn, x: torch.Tensor, size: Optional[torch.Tensor] = None) -> AttentionWithKeys:
    """Forward of a timm `Attention` that also hands back its queries and keys.

    attn: timm `Attention` (`qkv`, `num_heads`, `head_dim`, `attn_dim`, `scale`, `q_norm`,
    `k_norm`, `norm`, `proj`, optional `gate`); x: `[B, N, C]` its input (a block's `norm1(x)`);
    size: `[B, N, 1]` how many patches each token stands for (ToMe's proportional attention
    adds `ln(size)` to every key's logit) or None for plain attention.

    The output goes through fused SDPA, so no `[B, H, N, N]` matrix is materialised. What
    callers derive from q/k: EViT's class-attention row `class_attention(q[:, :, :1], k,
    attn.scale)`, ToMe's merge metric `k.mean(dim=1)` `[B, N, D]`, the entropy tool's maps
    `((q * attn.scale) @ k.transpose(-2, -1)).softmax(-1)`.
    """
    batch, n, _ = x.shape
    qkv = attn.qkv(x).reshape(batch, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    bias = None if size is None else size.log()[:, None, None, :, 0].to(q.dtype)  # [B, 1, 1, N]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias,
                                         dropout_p=attn.attn_drop.p if attn.training else 0.0)
    out = attn.norm(out.transpose(1, 2).reshape(batch, n, attn.attn_dim))
    if getattr(attn, "gate", None) is not None:
        out = out * attn.gate(x).sigmoid()
    return AttentionWithKeys(attn.proj_drop(attn.proj(out)), q, k)


# ---------------------------------------------------------------------------
# Neighbourhood merging over a candidate table (LTM)
#
# Each of N source tokens feeds T candidate targets among M merged tokens, given by an
# index table `[N, T]` (LTM: the 3x3 anchors around the source's home anchor). Three
# sparse products, closed under differentiation, so autograd keeps only the inputs and
# never a T-fold gathered copy of the tokens. Shapes: src `[B, N, D]` sources, tgt
# `[B, M, D]` targets, weight `[B, N, T]`, index `[N, T]` long.
# ---------------------------------------------------------------------------

def _neighbor_dot(src, tgt, index):
    """out[b, i, t] = <src[b, i], tgt[b, index[i, t]]>  -> `[B, N, T]`."""
    return torch.stack(
        [(src * tgt.index_select(1, index[:, t])).sum(-1) for t in range(index.shape[1])], dim=-1)


def _neighbor_gather_sum(weight, tgt, index):
    """out[b, i] = sum_t weight[b, i, t] * tgt[b, index[i, t]]  -> `[B, N, D]`."""
    out = weight[..., 0:1] * tgt.index_select(1, index[:, 0])
    for t in range(1, index.shape[1]):
        out = out + weight[..., t:t + 1] * tgt.index_select(1, index[:, t])
    return out


def _neighbor_scatter_sum(weight, src, index, num_targets: int):
    """out[b, j] = sum over (i, t) with index[i, t] == j of weight[b, i, t] * src[b, i]  -> `[B, M, D]`."""
    out = src.new_zeros(src.shape[0], num_targets, src.shape[-1])
    for t in range(index.shape[1]):
        out.index_add_(1, index[:, t], weight[..., t:t + 1] * src)
    return out


# The three neighbourhood products are bilinear in (a, b), and each one's gradients are the
# other two: op -> (forward(a, b, index, num_targets), d/da(grad, a, b, index), d/db(grad, a, b, index)).
_BILINEAR = {
    "dot": (lambda a, b, index, m: _neighbor_dot(a, b, index),
            lambda g, a, b, index: _neighbor_gather_sum(g, b, index),
            lambda g, a, b, index: _neighbor_scatter_sum(g, a, index, b.shape[1])),
    "gather_sum": (lambda a, b, index, m: _neighbor_gather_sum(a, b, index),
                   lambda g, a, b, index: _neighbor_dot(g, b, index),
                   lambda g, a, b, index: _neighbor_scatter_sum(a, g, index, b.shape[1])),
    "scatter_sum": (lambda a, b, index, m: _neighbor_scatter_sum(a, b, index, m),
                    lambda g, a, b, index: _neighbor_dot(b, g, index),
                    lambda g, a, b, index: _neighbor_gather_sum(a, g, index)),
}


class _NeighborProduct(torch.autograd.Function):
    """`op(a, b)` for one of `_BILINEAR`'s products, with the other two as its backward."""

    @staticmethod
    def forward(ctx, op, a, b, index, num_targets):
        ctx.op = op
        ctx.save_for_backward(a, b, index)
        return _BILINEAR[op][0](a, b, index, num_targets)

    @staticmethod
    def backward(ctx, grad):
        a, b, index = ctx.saved_tensors
        _, grad_a, grad_b = _BILINEAR[ctx.op]
        return (None, grad_a(grad, a, b, index) if ctx.needs_input_grad[1] else None,
                grad_b(grad, a, b, index) if ctx.needs_input_grad[2] else None, None, None)


def neighbor_dot(src: torch.Tensor, tgt: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Dot product of each source with each of its candidates: `[B, N, D]`, `[B, M, D]`, `[N, T]` -> `[B, N, T]`."""
    return _NeighborProduct.apply("dot", src, tgt, index, None)


def neighbor_gather_sum(weight: torch.Tensor, tgt: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """out_i = sum_t weight[i, t] * tgt[index[i, t]]: `[B, N, T]`, `[B, M, D]`, `[N, T]` -> `[B, N, D]`."""
    return _NeighborProduct.apply("gather_sum", weight, tgt, index, None)


def neighbor_scatter_sum(weight: torch.Tensor, src: torch.Tensor, index: torch.Tensor, num_targets: int) -> torch.Tensor:
    """Each source spread over its candidates: `[B, N, T]`, `[B, N, D]`, `[N, T]` -> `[B, num_targets, D]`."""
    return _NeighborProduct.apply("scatter_sum", weight, src, index, num_targets)


def neighbor_merge(tokens: torch.Tensor, weight: torch.Tensor, index: torch.Tensor, num_targets: int) -> torch.Tensor:
    """Weighted average of the sources feeding each target.

    tokens `[B, N, D]`, weight `[B, N, T]` (LTM: the row-stochastic mask G), index `[N, T]`
    -> `[B, num_targets, D]`, target j = sum_{(i,t): index[i,t]=j} w[i,t] x_i / sum w[i,t]
    (a target nobody feeds is 0).
    """
    weight = weight.to(tokens.dtype)
    total = neighbor_scatter_sum(weight, tokens, index, num_targets)
    mass = weight.new_zeros(weight.shape[0], num_targets).index_add(
        1, index.reshape(-1), weight.reshape(weight.shape[0], -1))
    return total / mass.clamp_min(1e-6).unsqueeze(-1)


def neighbor_unmerge(merged: torch.Tensor, weight: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Restore a merged field to the sources: out_i = sum_t weight[i, t] * merged[index[i, t]].

    merged `[B, M, D]`, weight `[B, N, T]`, index `[N, T]` -> `[B, N, D]`.
    """
    return neighbor_gather_sum(weight.to(merged.dtype), merged, index)


# ---------------------------------------------------------------------------
# Bipartite soft matching (ToMe)
# ---------------------------------------------------------------------------

class BipartiteMatch(NamedTuple):
    """Result of `bipartite_soft_matching` for a sequence of T tokens.

    Set A = even tokens (t1 = ceil(T/2)), set B = odd tokens. unm_idx `[B, t1 - r, 1]`
    kept A tokens; src_idx `[B, r, 1]` merged A tokens; dst_idx `[B, r, 1]` their B
    partners. distill_token: output order puts the distillation token second.
    """
    unm_idx: torch.Tensor
    src_idx: torch.Tensor
    dst_idx: torch.Tensor
    distill_token: bool

    @property
    def r(self) -> int:
        return self.src_idx.shape[1]


def bipartite_soft_matching(
        metric: torch.Tensor,
        r: int,
        class_token: bool = False,
        distill_token: bool = False,
) -> Optional[BipartiteMatch]:
    """ToMe's bipartite soft matching, exact.

    metric: `[B, T, c]` (ToMe: head-mean keys). Tokens alternate between set A (even)
    and B (odd); each A token picks its most cosine-similar B token and the `r` A
    tokens with the highest similarity are merged into their partner. The class token
    (index 0, in A) is never merged away; nothing merges into the distillation token
    (index 1, in B). `r` is clamped to `(T - protected) // 2`; returns None (identity)
    when that leaves nothing to merge. Similarities are computed in float32 (see
    `selection_precision`), so bf16 runs merge like fp32 runs up to near-ties.
    """
    protected = int(class_token) + int(distill_token)
    r = min(r, (metric.shape[1] - protected) // 2)
    if r <= 0:
        return None
    with torch.no_grad(), selection_precision(metric):
        metric = metric.float()  # scores in fp32 whatever the model's dtype (no-op for fp32)
        metric = metric / metric.norm(dim=-1, keepdim=True)
        scores = metric[:, ::2] @ metric[:, 1::2].transpose(-1, -2)  # [B, t1, t2]
        if class_token:
            scores[:, 0, :] = -math.inf
        if distill_token:
            scores[:, :, 0] = -math.inf
        node_max, node_idx = scores.max(dim=-1)
        edge_idx = node_max.argsort(dim=-1, descending=True)[..., None]
        unm_idx = edge_idx[:, r:]
        src_idx = edge_idx[:, :r]
        dst_idx = node_idx[..., None].gather(dim=1, index=src_idx)
        if class_token:
            # keep the surviving A tokens in their original order so cls stays first
            unm_idx = unm_idx.sort(dim=1).values
    return BipartiteMatch(unm_idx, src_idx, dst_idx, distill_token)


def merge_tokens(x: torch.Tensor, match: Optional[BipartiteMatch], mode: str = "mean") -> torch.Tensor:
    """Apply a matching to `x` `[B, T, C]` -> `[B, T - r, C]`.

    Merged A tokens are reduced into their B partner with `mode` (`scatter_reduce`,
    destination included: "sum", "mean", "amax"). Order: kept A tokens then all B
    tokens; with a distillation token: cls, dist, other kept A, other B.
    """
    if match is None:
        return x
    unm, moved, dst = _split_matched(x, match)
    dst = dst.scatter_reduce(1, match.dst_idx.expand(*moved.shape), moved, reduce=mode)
    return _merged_layout(unm, dst, match)


def _split_matched(x: torch.Tensor, match: BipartiteMatch):
    """(kept A tokens `[B, t1 - r, C]`, the r matched A tokens `[B, r, C]`, the B tokens `[B, t2, C]`)."""
    src, dst = x[:, ::2], x[:, 1::2]
    batch, t1, channels = src.shape
    unm = src.gather(1, match.unm_idx.expand(batch, t1 - match.r, channels))
    moved = src.gather(1, match.src_idx.expand(batch, match.r, channels))
    return unm, moved, dst


def _merged_layout(unm: torch.Tensor, dst: torch.Tensor, match: BipartiteMatch) -> torch.Tensor:
    """Kept A tokens then B tokens; with a distillation token: cls, dist, other kept A, other B."""
    if match.distill_token:
        return torch.cat([unm[:, :1], dst[:, :1], unm[:, 1:], dst[:, 1:]], dim=1)
    return torch.cat([unm, dst], dim=1)


def unmerge_tokens(x: torch.Tensor, match: Optional[BipartiteMatch]) -> torch.Tensor:
    """Inverse layout of `merge_tokens` (no distillation token): `[B, T - r, C]` -> `[B, T, C]`.

    Each merged A token receives a copy of its destination's value.
    """
    if match is None:
        return x
    if match.distill_token:
        raise ValueError("unmerge_tokens does not support a distillation token; merge without it to unmerge.")
    r = match.r
    unm_len = match.unm_idx.shape[1]
    unm, dst = x[:, :unm_len], x[:, unm_len:]
    batch, _, channels = unm.shape
    src = dst.gather(1, match.dst_idx.expand(batch, r, channels))
    out = torch.zeros(batch, unm_len + r + dst.shape[1], channels, device=x.device, dtype=x.dtype)
    out[:, 1::2] = dst
    out.scatter_(1, (2 * match.unm_idx).expand(batch, unm_len, channels), unm)
    out.scatter_(1, (2 * match.src_idx).expand(batch, r, channels), src)
    return out


def merge_wavg(
        match: Optional[BipartiteMatch],
        x: torch.Tensor,
        size: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Size-weighted average merge.

    x: `[B, T, C]`; size: `[B, T, 1]` patches represented per token (None = ones).
    Returns `(x_new [B, T - r, C], size_new [B, T - r, 1])`, x_new = merged(x * size) /
    merged(size). With no matching the inputs are returned unchanged.
    """
    if match is None:
        return x, size
    # Features and sizes merged separately: packing them into one [B, T, C + 1] tensor costs a
    # misaligned copy larger than the merge itself; the per-channel sums are the same either way.
    if size is None:
        size = merge_tokens(torch.ones_like(x[..., :1]), match, mode="sum")
        return merge_tokens(x, match, mode="sum") / size, size  # x * 1 == x: no multiply
    merged = merge_tokens(x * size, match, mode="sum")
    size = merge_tokens(size, match, mode="sum")
    return merged / size, size


def merge_source(
        match: Optional[BipartiteMatch],
        x: torch.Tensor,
        source: Optional[torch.Tensor] = None,
) -> Optional[torch.Tensor]:
    """Track which original tokens each token holds.

    source: `[B, T, T0]` 0/1 map (None = identity over the T tokens of `x`).
    Returns `[B, T - r, T0]`; `source[b, g, p] = 1` iff original token p is in group g.
    """
    if source is None:
        batch, tokens, _ = x.shape
        source = torch.eye(tokens, device=x.device, dtype=x.dtype)[None].expand(batch, tokens, tokens)
    return merge_tokens(source, match, mode="amax")


RSchedule = Union[int, Tuple[int, float], Sequence[int]]


def parse_r(num_layers: int, r: RSchedule) -> list:
    """ToMe's per-layer merge schedule.

    int r: `[r] * num_layers`. `(r, inflect)` with inflect in [-1, 1]: linear from
    `lo = int(r * (1 - inflect))` to `2r - lo`, truncated to ints (same total as
    constant r). list: used as given, right-padded with zeros to `num_layers`.
    Raises ValueError on negative values or other types.
    """
    if isinstance(r, bool):
        raise ValueError(f"ToMe r must be an int, (r, inflect) tuple or list of ints, got {r!r}.")
    if isinstance(r, Integral):
        _check_merge_count(r)
        return [int(r)] * num_layers
    if isinstance(r, tuple):
        if len(r) != 2 or not isinstance(r[0], Integral) or not isinstance(r[1], Real):
            raise ValueError(f"ToMe r tuple must be (r, inflect), e.g. (16, -0.5); got {r!r}.")
        base, inflect = int(r[0]), float(r[1])
        _check_merge_count(base)
        if not -1.0 <= inflect <= 1.0:
            raise ValueError(f"ToMe inflection must lie in [-1, 1], got {inflect}; use e.g. (16, -0.5).")
        lo = int(base * (1 - inflect))
        hi = 2 * base - lo
        step = (hi - lo) / (num_layers - 1) if num_layers > 1 else 0.0
        return [int(lo + step * i) for i in range(num_layers)]
    if isinstance(r, list):
        for value in r:
            if isinstance(value, bool) or not isinstance(value, Integral):
                raise ValueError(f"ToMe r list entries must be ints, got {value!r}; e.g. r=[25] * 8.")
            _check_merge_count(value)
        if len(r) > num_layers:
            raise ValueError(f"ToMe r list has {len(r)} entries but the model has {num_layers} blocks; shorten it.")
        return [int(v) for v in r] + [0] * (num_layers - len(r))
    raise ValueError(f"ToMe r must be an int, (r, inflect) tuple or list of ints, got {type(r).__name__}.")


def _check_merge_count(value: int) -> None:
    if value < 0:
        raise ValueError(f"ToMe r must be >= 0 (tokens merged per block), got {value}.")


# ---------------------------------------------------------------------------
# ToFu fusion rules and group maps for hybrid backbones (models/tofu.py, models/tome.py)
# ---------------------------------------------------------------------------

__all__ += ["prune_tokens", "MLERP_FORMS", "mlerp_merge", "merged_index", "compose_groups",
            "unmerge_groups", "merge_groups"]


def prune_tokens(x: torch.Tensor, match: Optional[BipartiteMatch]) -> torch.Tensor:
    """ToFu's pruned merge: `[B, T, C]` -> `[B, T - r, C]`, the r matched A tokens dropped.

    Same output layout as `merge_tokens`; kept A tokens and all B tokens are the inputs unchanged.
    """
    if match is None:
        return x
    src, dst = x[:, ::2], x[:, 1::2]
    batch, t1, channels = src.shape
    unm = src.gather(1, match.unm_idx.expand(batch, t1 - match.r, channels))
    if match.distill_token:
        return torch.cat([unm[:, :1], dst[:, :1], unm[:, 1:], dst[:, 1:]], dim=1)
    return torch.cat([unm, dst], dim=1)


MLERP_FORMS = ("paper", "opentome")


def mlerp_merge(x: torch.Tensor, match: Optional[BipartiteMatch], form: str = "paper") -> torch.Tensor:
    """ToFu's MLERP merge (Kim et al., WACV 2024): `[B, T, C]` -> `[B, T - r, C]`.

    Each destination and the sources matched to it form a group of K tokens; with the
    unweighted mean `m = (1/K) sum_k x_k` (sizes are not used):

    * form "paper": `m / ||m|| * max_k ||x_k||` (direction of the mean, norm of the largest
      member); destinations without sources are returned unchanged;
    * form "opentome": `m / ||x_dst|| * max_k ||x_k||`, dividing by the norm of the original
      destination as OpenToMe's and PiToMe's `mode == 'tofu'` do, applied to every destination.

    Kept A tokens pass unchanged; layout as `merge_tokens`.
    """
    if form not in MLERP_FORMS:
        raise ValueError(f"MLERP form must be one of {', '.join(MLERP_FORMS)}, got {form!r}.")
    if match is None:
        return x
    unm, moved, dst = _split_matched(x, match)
    batch, r, channels = moved.shape
    dst_norm = dst.norm(dim=-1)  # [B, t2]
    max_norm = dst_norm.scatter_reduce(1, match.dst_idx[..., 0], moved.norm(dim=-1), reduce="amax")
    mean = dst.scatter_reduce(1, match.dst_idx.expand(batch, r, channels), moved, reduce="mean")
    if form == "opentome":
        dst = mean / dst_norm[..., None] * max_norm[..., None]
    else:
        ones = torch.ones_like(dst_norm[:, :r])
        has_src = torch.zeros_like(dst_norm).scatter_add(1, match.dst_idx[..., 0], ones) > 0
        mean_norm = mean.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(mean.dtype).tiny)
        dst = torch.where(has_src[..., None], mean / mean_norm * max_norm[..., None], dst)
    return _merged_layout(unm, dst, match)


def merged_index(match: Optional[BipartiteMatch], num_tokens: int, device=None) -> Optional[torch.Tensor]:
    """Where each of the T input tokens goes in `merge_tokens`' output (no distillation token).

    Returns `[B, T]` long, entries in `[0, T - r)`: a kept A token goes to its rank in
    `unm_idx`, a B token to its place after the kept A tokens, a merged (or pruned) A token
    to its destination. It is the index form of `merge_source` for one merge:
    `merge_source(match, x)[b, merged_index[b, t], t] == 1`. None for no matching.
    """
    if match is None:
        return None
    if match.distill_token:
        raise ValueError("merged_index does not support a distillation token.")
    batch, kept, _ = match.unm_idx.shape
    r = match.r
    t1, t2 = kept + r, num_tokens - kept - r
    device = match.unm_idx.device if device is None else device
    index_a = torch.empty(batch, t1, dtype=torch.long, device=device)
    index_a.scatter_(1, match.unm_idx[..., 0], torch.arange(kept, device=device).expand(batch, kept))
    index_a.scatter_(1, match.src_idx[..., 0], kept + match.dst_idx[..., 0])
    out = torch.empty(batch, num_tokens, dtype=torch.long, device=device)
    out[:, ::2] = index_a
    out[:, 1::2] = kept + torch.arange(t2, device=device)
    return out


def compose_groups(group: Optional[torch.Tensor], index: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """Follow one more merge: group `[B, T0]` (current token of each original token, None =
    identity) and index `[B, T]` (from `merged_index`) -> `[B, T0]`."""
    if index is None:
        return group
    return index if group is None else index.gather(1, group)


def unmerge_groups(x: torch.Tensor, group: Optional[torch.Tensor]) -> torch.Tensor:
    """Unmerge through the group map: x `[B, G, C]`, group `[B, T0]` -> `[B, T0, C]`.

    Every original token receives a copy of its group's token (ToMe for Stable Diffusion's
    unmerge); identity when group is None.
    """
    if group is None:
        return x
    return x.gather(1, group[..., None].expand(-1, -1, x.shape[-1]))


def merge_groups(x: torch.Tensor, group: Optional[torch.Tensor], num_groups: int) -> torch.Tensor:
    """Re-merge a full-length tensor into the current groups by the member mean.

    x `[B, T0, C]`, group `[B, T0]` -> `[B, num_groups, C]`; inverse of `unmerge_groups`
    (`merge_groups(unmerge_groups(t, g), g, G) == t`); identity when group is None.
    """
    if group is None:
        return x
    batch, _, channels = x.shape
    sums = x.new_zeros(batch, num_groups, channels).scatter_add_(1, group[..., None].expand(-1, -1, channels), x)
    counts = x.new_zeros(batch, num_groups).scatter_add_(1, group, torch.ones_like(group, dtype=x.dtype))
    return sums / counts[..., None]
