"""PatchMerger token merging as used by the TokenReduction study (Haurum et al., ICCVW 2023, arXiv 2308.04657).

PatchMerger (Renggli et al., arXiv 2202.12015) replaces the N patch tokens by K learned-query
attention outputs: `M = softmax(queries @ LN(y)^T)` over the tokens, `z = M @ LN(y)`.
`PatchMerger` is the `cluster_layers.{i}` module (`queries [K, C]` initialised N(0, 1),
`norm` = LayerNorm(C)). Kept from the official code (docs/methods/tokenreduction.md): the
LayerNorm has PyTorch's default eps 1e-5 (the backbone's is 1e-6), no `1/sqrt(C)` scaling, and
the output tokens live in that LayerNorm's space, not the residual stream's.
"""
from __future__ import annotations

import torch
from torch import nn

from .tokenreduction_clustering import ClusterResult

__all__ = ["PatchMerger"]


class PatchMerger(nn.Module):
    """`cluster_layers.{i}` of a PatchMerger model: K learned queries over the layer-normed tokens."""

    def __init__(self, embed_dim: int, num_clusters: int):
        super().__init__()
        self.norm = nn.LayerNorm(embed_dim)  # eps 1e-5, as the official layer
        self.queries = nn.Parameter(torch.randn(num_clusters, embed_dim))

    def forward(self, y: torch.Tensor, weight=None) -> ClusterResult:
        """y `[B, N, C]` -> `M @ LN(y)` `[B, K, C]`, M `[B, K, N]` rows summing to 1 (`weight` unused)."""
        y_hat = self.norm(y)
        attn = torch.matmul(self.queries, y_hat.transpose(-1, -2)).softmax(dim=-1)  # [B, K, N]
        centres = self.queries[None].expand(y.shape[0], -1, -1).detach()
        return ClusterResult(torch.matmul(attn, y_hat), None, attn.argmax(dim=1), attn, centres)
