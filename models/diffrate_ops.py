"""DiffRate's token kernels and its differentiable discrete proxy (models/diffrate.py is the model).

Pure functions on token tensors `[B, T, C]` (batch, tokens, channels): the class-attention
ranking, the cosine matching of sources to destinations, the unweighted merge, the search's
masked softmax and the straight-through estimators; and `DiffRateProxy`, the per-block choice of
a kept-token number (the official `DiffRate/ddp.py` layout: `kept_token_candidate`,
`selected_probability`). Selection scores are computed in float32 (`token_ops.selection_precision`).
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

import torch
from torch import nn

from .token_ops import selection_precision

__all__ = ["ste_ceil", "ste_min", "DiffRateProxy", "kept_numbers", "class_attention_scores", "rank_tokens",
           "gather_tokens", "match_to_destinations", "merge_into", "masked_softmax", "score_dtype"]


# ---------------------------------------------------------------------------
# Straight-through estimators (forward values exact, gradients as the official autograd functions)
# ---------------------------------------------------------------------------

def ste_ceil(x: torch.Tensor) -> torch.Tensor:
    """`ceil(x)` forward, identity backward (adding `x - x.detach()`, exactly 0, keeps the value exact)."""
    return torch.ceil(x).detach() + (x - x.detach())


def ste_min(n: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """`min(n, a, b)` forward; backward sends the gradient to both `a` and `b`, none to `n`.

    The official `STE_Min` does so whichever is smallest (spec quirk kept for search parity).
    """
    value = torch.minimum(torch.minimum(n, a), b).detach()
    return value + (a - a.detach()) + (b - b.detach())


# ---------------------------------------------------------------------------
# Differentiable discrete proxy (official DiffRate/ddp.py layout)
# ---------------------------------------------------------------------------

class DiffRateProxy(nn.Module):
    """One block's choice of a kept-token number among candidates.

    `kept_token_candidate` `[K]` (a Parameter without gradient, as the official code saves it):
    patch-token counts `num_patches, num_patches - g, ...` (`[num_patches]` for block 0, which
    is never compressed); `selected_probability` `[K]` the trained logits (zeros at start).
    Kept numbers count the class token: `K = ceil(c . softmax(theta)) + 1`.
    """

    keep_fp32 = True  # engine.cast_for_inference leaves the proxies in float32: they decide the kept numbers

    def __init__(self, num_patches: int, granularity: int):
        super().__init__()
        candidates = torch.arange(num_patches, 0, -granularity).float()
        self.kept_token_candidate = nn.Parameter(candidates, requires_grad=False)
        self.selected_probability = nn.Parameter(torch.zeros_like(candidates))

    def expected_kept(self) -> torch.Tensor:
        """`STEceil(c . softmax(theta)) + 1`, a 0-d float32 tensor with gradient to `theta`."""
        probability = self.selected_probability.float().softmax(dim=-1)
        return ste_ceil(torch.matmul(self.kept_token_candidate.float(), probability)) + 1

    def keep_probability(self, length: int) -> torch.Tensor:
        """`t_j = sum_k p_k [j < c_k + 1]` for positions j = 0 .. length - 1 -> `[length]` float32."""
        probability = self.selected_probability.float().softmax(dim=-1)
        bound = (self.kept_token_candidate.float() + 1).trunc()  # official int(c + 1)
        positions = torch.arange(length, device=bound.device, dtype=bound.dtype)
        return (probability[None, :] * (positions[:, None] < bound[None, :])).sum(dim=-1)

    def token_mask(self, kept: int, active: int, length: int) -> torch.Tensor:
        """Straight-through mask `[length]`: exactly 0 at positions `kept .. active - 1`, else 1;
        gradient d/dt of `keep_probability` (forward value exact: `(1 - t) + t` rounds to 1)."""
        t = self.keep_probability(length)
        hard = torch.ones_like(t)
        hard[kept:active] = 0
        return hard - t.detach() + t


def kept_numbers(proxies: Sequence[DiffRateProxy]) -> List[int]:
    """The integer kept numbers the proxies encode (one device sync for all of them)."""
    with torch.no_grad():
        values = torch.stack([proxy.expected_kept() for proxy in proxies])
    return [int(v) for v in values.tolist()]


# ---------------------------------------------------------------------------
# Token kernels
# ---------------------------------------------------------------------------

def score_dtype(t: torch.Tensor) -> torch.Tensor:
    """A selection-score operand in float32 (float64 stays float64, for reference runs)."""
    return t if t.dtype == torch.float64 else t.float()


def class_attention_scores(q: torch.Tensor, k: torch.Tensor, scale: float,
                           size: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Head-mean attention of the class query over all keys, with proportional attention.

    q, k: `[B, H, T, D]`; size `[B, T, 1]` or None. Returns `[B, T]` float32 =
    `mean_h softmax_j((q_0 . k_j) * scale + ln(size_j))`, computed in float32 (selection score).
    """
    with selection_precision(k):
        logits = (score_dtype(q[:, :, :1]) @ score_dtype(k).transpose(-2, -1)) * scale  # [B, H, 1, T]
        if size is not None:
            logits = logits + score_dtype(size).log()[:, None, None, :, 0]
        return logits.softmax(dim=-1).mean(dim=1)[:, 0]


def rank_tokens(scores: torch.Tensor) -> torch.Tensor:
    """Order `[B, T]`: the class token first, then patch tokens by decreasing score (stable).

    scores: `[B, T]` (column 0, the class token's own score, is ignored).
    """
    order = torch.sort(scores[:, 1:], dim=1, descending=True, stable=True).indices + 1
    return torch.cat([torch.zeros_like(order[:, :1]), order], dim=1)


def gather_tokens(x: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """x `[B, T, C]` (or `[B, T]`), order `[B, K]` -> the K tokens in that order."""
    if x.dim() == 2:
        return x.gather(1, order)
    return x.gather(1, order.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def match_to_destinations(x: torch.Tensor, kept: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Each source (positions `kept ..`) picks its most cosine-similar destination (`1 .. kept - 1`).

    x `[B, T, C]` ranked tokens. Returns (node_max `[B, T - kept]` float32 similarity,
    node_idx `[B, T - kept]` destination index); nothing matches the class token (position 0);
    ties go to the first index. Computed without gradient, in float32 (selection score).
    """
    with torch.no_grad(), selection_precision(x):
        metric = score_dtype(x)
        metric = metric / metric.norm(dim=-1, keepdim=True)
        similarity = metric[:, kept:] @ metric[:, :kept].transpose(-1, -2)
        similarity[..., 0] = -math.inf
        return similarity.max(dim=-1)


def merge_into(dst: torch.Tensor, src: torch.Tensor, node_idx: torch.Tensor, mode: str) -> torch.Tensor:
    """`scatter_reduce` of sources `[B, S, C]` into destinations `[B, D, C]` (destination included).

    mode "mean": `(x_d + sum_{s -> d} x_s) / (1 + #{s -> d})` (unweighted); "sum"; "amax".
    """
    index = node_idx.unsqueeze(-1).expand(-1, -1, src.shape[-1])
    return dst.scatter_reduce(1, index, src.to(dst.dtype), reduce=mode)


def masked_softmax(logits: torch.Tensor, mask: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """The search's attention: masked keys off, a masked token still attends to itself.

    logits `[B, H, N, N]`, mask `[B, N]` (1 = active). float32:
    `(exp(l - max_j l) * pol + eps / N) / (sum_j exp(l - max_j l) * pol + eps)` with
    `pol[b, i, j] = mask[b, j] + (1 - mask[b, j]) [i == j]` and the max over all keys.
    """
    n = mask.shape[1]
    logits = score_dtype(logits)
    policy = mask.to(logits.dtype).reshape(mask.shape[0], 1, 1, n)
    eye = torch.eye(n, dtype=policy.dtype, device=policy.device).view(1, 1, n, n)
    policy = policy + (1.0 - policy) * eye
    e = (logits - logits.max(dim=-1, keepdim=True)[0]).exp() * policy
    return (e + eps / n) / (e.sum(dim=-1, keepdim=True) + eps)
