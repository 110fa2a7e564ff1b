"""MCTF's pure kernels (Lee, Choi & Kim, CVPR 2024, arXiv 2403.10030; docs/methods/mctf.md):
the per-block reduction r, the multi-criteria pair scores, the two-way bipartite matching and
the fusion of tokens, sizes and attention maps. Functions on `[B, T, C]` tokens, `[B, H, T, T]`
attention maps and `[B, T, 1]` sizes, with no state; `models/mctf.py` is the patch that uses
them (and re-exports them).
"""
from __future__ import annotations

import math
from numbers import Integral, Real
from typing import List, NamedTuple, Optional, Sequence, Tuple, Union

import torch

from .errors import ModelConfigError
from .token_ops import selection_precision

__all__ = ["RValue", "MIN_TOKENS", "normalize_r", "block_reduction", "token_counts", "MCTFMatch", "mctf_scores",
           "mctf_matching", "mctf_merge", "fused_index", "group_reduce", "mctf_fuse"]

RValue = Union[int, float]  # tokens per block, or a fraction of the unprotected tokens
# The official rule stops reducing when fewer than this many tokens would remain.
MIN_TOKENS = 10


# ---------------------------------------------------------------------------
# r per block
# ---------------------------------------------------------------------------

def normalize_r(value, name: str = "r") -> RValue:
    """An int >= 0 (tokens per block) or a float in (0, 1) (fraction of the unprotected tokens).

    Integral floats >= 1 (e.g. 16.0) become ints; 0.0 becomes 0. Anything else is a
    ModelConfigError (the official code breaks on non-integral r >= 1).
    """
    if isinstance(value, bool) or not isinstance(value, Real):
        raise ModelConfigError(f"MCTF {name} must be an int >= 0 or a fraction in [0, 1), got {value!r}.")
    if isinstance(value, Integral):
        value = int(value)
        if value < 0:
            raise ModelConfigError(f"MCTF {name} must be >= 0 (tokens fused per block), got {value}.")
        return value
    value = float(value)
    if not math.isfinite(value) or value < 0:
        raise ModelConfigError(f"MCTF {name} must be an int >= 0 or a fraction in [0, 1), got {value!r}.")
    if value < 1:
        return 0 if value == 0 else value
    if value.is_integer():
        return int(value)
    raise ModelConfigError(f"MCTF {name} {value!r} is neither a token count (an integer) nor a fraction in [0, 1); "
                           f"use e.g. 16 or 0.35.")


def block_reduction(tokens: int, r: RValue, protected: int = 1, float32_fraction: bool = False) -> int:
    """Tokens a block fuses away: the official rule, then clamped at 0.

    tokens: T entering the block; r: int or fraction; protected: P (cls, dist).
    `if T - r < 10: r = T - 10`; fractions take `int((T - P) * r)`; at most `(T - P) // 2`;
    never negative (the official code crashes there). `float32_fraction`: the fraction
    product is rounded as float32, as for the teacher's r drawn as a float32 tensor.
    """
    if tokens - r < MIN_TOKENS:
        r = tokens - MIN_TOKENS
    if r < 1:
        if float32_fraction:
            product = (torch.tensor(tokens - protected, dtype=torch.float32)
                       * torch.tensor(r, dtype=torch.float32)).item()
        else:
            product = (tokens - protected) * r
        r_l = int(product)
    else:
        r_l = int(r)
    return max(min(r_l, (tokens - protected) // 2), 0)


def token_counts(num_tokens: int, depth: int, r: RValue, activate_layer: Sequence[int], protected: int = 1,
                 one_step_ahead: int = 1) -> List[int]:
    """Tokens leaving each block for a model of `depth` blocks entered by `num_tokens` tokens.

    Every mode leaves `T - r_l` tokens after an activated block (mode 0 fuses the block's output).
    """
    counts, tokens, active = [], num_tokens, set(activate_layer)
    for index in range(depth):
        if index in active:
            tokens -= block_reduction(tokens, r, protected)
        counts.append(tokens)
    return counts


# ---------------------------------------------------------------------------
# Multi-criteria scores and two-way bipartite matching (pure functions)
# ---------------------------------------------------------------------------

class MCTFMatch(NamedTuple):
    """Result of `mctf_matching` for T tokens: set A = even positions (t1 = ceil(T/2)), B = odd.

    Step 1 (A -> B): unm_idx `[B, t1 - r1]` kept A tokens (position order when a cls token is
    protected), src_idx `[B, r1]` fused A tokens, dst_idx `[B, r1]` their B partners.
    Step 2 (B -> kept A, bidirectional only, else None): unm_idx2 `[B, t2 - r2]` kept B tokens
    in descending score, src_idx2 `[B, r2]` fused B tokens, dst_idx2 `[B, r2]` their partners
    as indices into unm_idx. distill_token: the output puts the distillation token second.
    """
    unm_idx: torch.Tensor
    src_idx: torch.Tensor
    dst_idx: torch.Tensor
    unm_idx2: Optional[torch.Tensor]
    src_idx2: Optional[torch.Tensor]
    dst_idx2: Optional[torch.Tensor]
    distill_token: bool = False

    @property
    def r(self) -> int:
        return self.src_idx.shape[1] + (0 if self.src_idx2 is None else self.src_idx2.shape[1])

    @property
    def bidirection(self) -> bool:
        return self.unm_idx2 is not None


def mctf_scores(metric: torch.Tensor, informativeness: Optional[torch.Tensor], size: Optional[torch.Tensor],
                tau_sim: float, tau_info: float, tau_size: float) -> torch.Tensor:
    """Multi-criteria pair scores `W [B, t1, t2]` between even (A) and odd (B) tokens.

    metric: `[B, T, C]` (the block input); informativeness: `[B, T]` mean attention each token
    receives (over heads and all queries) or None; size: `[B, T, 1]` or None.
    `W = ((cos + 1) / 2) ** (1/tau_sim) * (iota_i iota_j) ** (1/tau_info) * (sigma_i sigma_j) ** (1/tau_size)`
    with `iota = (1/a) / max(1/a)`, `sigma = (1/s) / max(1/s)`; a criterion whose temperature
    is 0 (tau_info: <= 0), or whose input is None, is 1. The operations and their order are
    the official ones: selections have margins of a few float32 ulps. Call under
    `selection_precision` with float32 inputs.
    """
    metric = metric / metric.norm(dim=-1, keepdim=True)
    a, b = metric[..., ::2, :], metric[..., 1::2, :]
    if tau_sim:
        scores = a @ b.transpose(-1, -2)
        scores = ((scores + 1) / 2) ** (1 / tau_sim)
    else:
        scores = torch.ones(a.shape[0], a.shape[1], b.shape[1], device=a.device, dtype=a.dtype)
    if tau_info > 0 and informativeness is not None:
        inverse = 1 / informativeness
        inverse = inverse / inverse.max(1, keepdim=True)[0]
        info_a, info_b = inverse[..., ::2, None], inverse[..., 1::2, None].transpose(1, 2)
        scores = scores * (info_a * info_b) ** (1 / tau_info)
    if tau_size and size is not None:
        inverse = 1 / size
        inverse = inverse / inverse.max(1, keepdim=True)[0]
        size_a, size_b = inverse[..., ::2, :], inverse[..., 1::2, :].transpose(1, 2)
        scores = scores * (size_a * size_b) ** (1 / tau_size)
    return scores


def mctf_matching(metric: torch.Tensor, informativeness: Optional[torch.Tensor], size: Optional[torch.Tensor],
                  r: int, class_token: bool = True, distill_token: bool = False, tau_sim: float = 1.0,
                  tau_info: float = 20.0, tau_size: float = 40.0, bidirection: bool = True) -> Optional[MCTFMatch]:
    """MCTF's two-way bipartite matching of `r` tokens (None when r <= 0).

    metric `[B, T, C]`, informativeness `[B, T]` or None, size `[B, T, 1]` or None. Step 1
    fuses the `r1` A tokens with the highest best score into their best B token; step 2
    (bidirectional) fuses the `r2 = r - r1` B tokens with the highest best score over the kept
    A tokens into them, reusing the step-1 scores. `r1 = r // 2` when bidirectional, else r.
    The cls token (A row 0) is never fused nor a destination; a distillation token (B column
    0) neither. Scores in float32 whatever the model's dtype.
    """
    if r <= 0:
        return None
    r1, r2 = (r // 2, r - r // 2) if bidirection else (r, 0)
    with torch.no_grad(), selection_precision(metric):
        scores = mctf_scores(metric.float(), None if informativeness is None else informativeness.float(),
                             None if size is None else size.float(), tau_sim, tau_info, tau_size)
        if class_token:
            scores[..., :1, :] = -math.inf
        if distill_token:
            scores[..., :, :1] = -math.inf
        t2 = scores.shape[-1]
        node_max, node_idx = scores.max(dim=-1)
        edge_idx = node_max.argsort(dim=-1, descending=True)
        unm_idx, src_idx = edge_idx[..., r1:], edge_idx[..., :r1]
        dst_idx = node_idx.gather(dim=-1, index=src_idx)
        if class_token:
            unm_idx = unm_idx.sort(dim=1)[0]  # cls first, kept A tokens in position order
        if not bidirection:
            return MCTFMatch(unm_idx, src_idx, dst_idx, None, None, None, distill_token)
        # step 2 reuses the step-1 scores of the kept A tokens (official: not recomputed)
        scores2 = scores.gather(dim=-2, index=unm_idx[..., None].expand(-1, -1, t2)).transpose(1, 2)
        node_max2, node_idx2 = scores2.max(dim=-1)
        edge_idx2 = node_max2.sort(dim=-1, descending=True)[1]
        unm_idx2, src_idx2 = edge_idx2[..., r2:], edge_idx2[..., :r2]
        dst_idx2 = node_idx2.gather(dim=-1, index=src_idx2)
    return MCTFMatch(unm_idx, src_idx, dst_idx, unm_idx2, src_idx2, dst_idx2, distill_token)


def _index_along(index: torch.Tensor, like: torch.Tensor, dim: int) -> torch.Tensor:
    """index `[B, k]` viewed and expanded to `like`'s shape with size k along `dim` (dim > 0)."""
    view = [index.shape[0]] + [1] * (like.dim() - 1)
    view[dim] = index.shape[1]
    shape = list(like.shape)
    shape[dim] = index.shape[1]
    return index.view(view).expand(shape)


def _take(x: torch.Tensor, index: torch.Tensor, dim: int) -> torch.Tensor:
    return x.gather(dim, _index_along(index, x, dim))


def _put(x: torch.Tensor, index: torch.Tensor, src: torch.Tensor, dim: int, mode: str) -> torch.Tensor:
    return x.scatter_reduce(dim, _index_along(index, src, dim), src, reduce=mode)


def _distill_order(match: MCTFMatch, kept_a: int, out_tokens: int) -> List[int]:
    """Output permutation that moves the distillation token to index 1 (cls, dist, other A, other B)."""
    dist = out_tokens - 1 if match.bidirection else kept_a  # -inf scores sort it last among kept B
    return [0, dist] + [i for i in range(1, out_tokens) if i != dist]


def mctf_merge(x: torch.Tensor, match: Optional[MCTFMatch], mode: str = "sum", dim: int = -2) -> torch.Tensor:
    """Apply a matching to the token dimension `dim` of `x` (`[B, ..., T, ...]`) with `mode`.

    Step 1 reduces the fused A tokens into their B partners (`scatter_reduce`, destination
    included: "sum", "amax", "mean"), step 2 reduces the fused B tokens (with what they
    received) into their kept A partners. Output along `dim` (`T - r`): bidirectional
    `[kept A (position order), kept B (descending step-2 score)]`, one-directional
    `[kept A, all B]`; with a distillation token `[cls, dist, other kept A, other kept B]`.
    """
    if match is None:
        return x
    dim = dim % x.dim()
    lead = (slice(None),) * dim
    src, dst = x[lead + (slice(0, None, 2),)], x[lead + (slice(1, None, 2),)]
    unm = _take(src, match.unm_idx, dim)
    moved = _take(src, match.src_idx, dim)
    dst = _put(dst, match.dst_idx, moved, dim, mode)
    if match.bidirection:
        kept_b = _take(dst, match.unm_idx2, dim)
        moved2 = _take(dst, match.src_idx2, dim)
        unm = _put(unm, match.dst_idx2, moved2, dim, mode)
        out = torch.cat([unm, kept_b], dim=dim)
    else:
        out = torch.cat([unm, dst], dim=dim)
    if match.distill_token:
        order = _distill_order(match, match.unm_idx.shape[1], out.shape[dim])
        out = out.index_select(dim, torch.tensor(order, device=out.device))
    return out


def fused_index(match: Optional[MCTFMatch], num_tokens: int) -> Optional[torch.Tensor]:
    """Output position of each of the T input tokens after `mctf_merge`: `[B, T]` long.

    Derived from both steps (a token fused A -> B -> A ends where its last partner ends), so
    `mctf_merge(x, match, "sum")[b, g] == sum of x[b, t] over t with index[b, t] == g`.
    """
    if match is None:
        return None
    device = match.unm_idx.device
    batch, kept_a = match.unm_idx.shape
    t2 = num_tokens // 2
    ranks = lambda n: torch.arange(n, device=device).expand(batch, n)  # noqa: E731
    if match.bidirection:
        pos_b = torch.empty(batch, t2, dtype=torch.long, device=device)
        pos_b.scatter_(1, match.unm_idx2, kept_a + ranks(match.unm_idx2.shape[1]))
        pos_b.scatter_(1, match.src_idx2, match.dst_idx2)
    else:
        pos_b = kept_a + ranks(t2)
    pos_a = torch.empty(batch, (num_tokens + 1) // 2, dtype=torch.long, device=device)
    pos_a.scatter_(1, match.unm_idx, ranks(kept_a))
    pos_a.scatter_(1, match.src_idx, pos_b.gather(1, match.dst_idx))
    index = torch.empty(batch, num_tokens, dtype=torch.long, device=device)
    index[:, ::2] = pos_a
    index[:, 1::2] = pos_b
    if match.distill_token:
        out_tokens = num_tokens - match.r
        order = _distill_order(match, kept_a, out_tokens)
        inverse = torch.empty(out_tokens, dtype=torch.long, device=device)
        inverse[torch.tensor(order, device=device)] = torch.arange(out_tokens, device=device)
        index = inverse[index]
    return index


def group_reduce(t: torch.Tensor, index: torch.Tensor, groups: int, dim: int, mode: str = "sum") -> torch.Tensor:
    """Reduce the token dimension `dim` of `t` (T entries) into `groups` entries: entry g gets the
    sum ("sum") or elementwise max ("amax") of the entries t with `index[b, t] == g`.

    index: `[B, T]` per sample (`fused_index`). One scatter over `t`, differentiable in `t`.
    """
    dim = dim % t.dim()
    view = [index.shape[0]] + [1] * (t.dim() - 1)
    view[dim] = index.shape[1]
    expanded = index.view(view).expand(t.shape)
    shape = list(t.shape)
    shape[dim] = groups
    if mode == "sum":
        return t.new_zeros(shape).scatter_add_(dim, expanded, t)
    return t.new_full(shape, -math.inf).scatter_reduce_(dim, expanded, t, reduce=mode)


def mctf_fuse(match: MCTFMatch, x: torch.Tensor, attn: Optional[torch.Tensor], informativeness: torch.Tensor,
              size: Optional[torch.Tensor], pooling_type: int = 1, fuse_attn: bool = True
              ) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Fuse tokens, sizes and (one-step-ahead) the attention map.

    x `[B, T, C]`; attn `[B, H, T, T]` (needed when `fuse_attn`); informativeness `[B, T]`
    float32 (head/query mean of attn); size `[B, T, 1]` float32 or None (ones).
    Returns `(x' [B, T', C], size' [B, T', 1] float32, A'' [B, H, T', T'] or None)` in
    `mctf_merge`'s output order. pooling_type 1: weights `a_i s_i / max s` (per sample);
    0: `s_i`; 3: 1 (plain mean); 2: elementwise max. The attention map sums its keys per
    group, then pools its queries with the same weights (max for type 2; its rows then do
    not sum to 1, as officially). Weights are computed without gradient; x' and A'' are
    differentiable. Each group is reduced in one scatter over the fused index (the official
    code sums in two steps; only the float rounding of the sums differs).
    """
    if size is None:
        size = torch.ones_like(x[..., :1], dtype=torch.float32)
    tokens = x.shape[1]
    groups = tokens - match.r
    index = fused_index(match, tokens)
    keys = group_reduce(attn, index, groups, -1) if fuse_attn else None
    new_size = group_reduce(size, index, groups, 1)
    if pooling_type == 2:
        out = group_reduce(x, index, groups, 1, "amax")
        fused = group_reduce(keys, index, groups, -2, "amax") if fuse_attn else None
        return out, new_size, fused
    with torch.no_grad():
        if pooling_type == 1:
            weight = informativeness.unsqueeze(-1) * (size / size.amax(dim=-2, keepdim=True))
        elif pooling_type == 0:
            weight = size
        else:
            weight = torch.ones_like(size)
        norm = group_reduce(weight, index, groups, 1)
    out = group_reduce(x * weight.to(x.dtype), index, groups, 1) / norm.to(x.dtype)
    fused = None
    if fuse_attn:
        fused = group_reduce(keys * weight[:, None].to(keys.dtype), index, groups, -2) / norm[:, None].to(keys.dtype)
    return out, new_size, fused
