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
"""
from __future__ import annotations

import math
from numbers import Integral, Real
from typing import NamedTuple, Optional, Sequence, Tuple, Union

import torch

__all__ = [
    "keep_count", "class_attention", "keep_topk_tokens", "complement_indices", "fuse_tokens",
    "track_token_positions",
    "BipartiteMatch", "bipartite_soft_matching", "merge_tokens", "unmerge_tokens", "merge_wavg",
    "merge_source", "parse_r",
]


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
    Returns `[B, N]` = mean over heads of `softmax(q_cls k^T * scale)`. Only this one
    row is computed, so no `[B, H, N, N]` matrix is needed.
    """
    logits = (q_cls * scale) @ k.transpose(-2, -1)  # [B, H, 1, N]
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
    when that leaves nothing to merge.
    """
    protected = int(class_token) + int(distill_token)
    r = min(r, (metric.shape[1] - protected) // 2)
    if r <= 0:
        return None
    with torch.no_grad():
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
    src, dst = x[:, ::2], x[:, 1::2]
    batch, t1, channels = src.shape
    r = match.r
    unm = src.gather(1, match.unm_idx.expand(batch, t1 - r, channels))
    moved = src.gather(1, match.src_idx.expand(batch, r, channels))
    dst = dst.scatter_reduce(1, match.dst_idx.expand(batch, r, channels), moved, reduce=mode)
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
    if size is None:
        size = torch.ones_like(x[..., :1])
    # one gather/scatter pass for features and sizes (per-channel sums are unchanged)
    merged = merge_tokens(torch.cat([x * size, size], dim=-1), match, mode="sum")
    size = merged[..., -1:]
    return merged[..., :-1] / size, size


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
