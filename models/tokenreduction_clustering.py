"""K-Medoids and DPC-KNN token clustering of the TokenReduction study (Haurum et al., ICCVW 2023).

"Which Tokens to Use? Investigating Token Reduction in Vision Transformers" (arXiv 2308.04657)
merges the patch tokens of a DeiT into a fixed number of clusters at a few blocks. This module
holds the two hard-clustering reducers, as pure kernels on `[B, N, C]` token tensors plus the
thin `nn.Module`s the models keep in `cluster_layers.{i}`:

* K-Medoids (`kmedoids_fit`, `KMedoids`): medoids initialised at the tokens the previous
  block's attention weighs most, refined for a few iterations; the output tokens are the
  medoids themselves (no averaging). No parameters.
* DPC-KNN (`dpc_knn_cluster`, `cluster_merge`, `DPCKNN`): TCFormer's density-peaks clustering
  with k nearest neighbours; every cluster becomes the `exp(score)`-weighted mean of its
  tokens. Parameters: `score = Linear(C, 1)` (none with `equal_weight`).

Both reproduce the official code's numerics, quirks included (docs/methods/tokenreduction.md,
"Differences from the official code"): `torch.cdist` with its default compute mode, the
K-Medoids medoid update summing distances over ALL tokens and sending empty clusters to
token 0, the equal-weight start drawn from numpy's global RNG, and DPC-KNN's `1e-6 * U`
density noise drawn from torch's global generator at training and evaluation time.
Selection runs in float32 (`token_ops.selection_precision`) whatever the model's dtype.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import numpy as np
import torch
from torch import nn

from .token_ops import selection_precision

__all__ = ["ClusterResult", "selection_float", "kmedoids_fit", "dpc_knn_cluster", "cluster_merge", "KMedoids", "DPCKNN"]

# Official constant: the medoid update replaces every entry of a non-member's distance row by it.
_NON_MEMBER = 1000000.0


class ClusterResult(NamedTuple):
    """What one reducer did to the `N` patch tokens `y [B, N, C]` it received.

    tokens: `[B, K, C]` the new patch tokens; centers: `[B, K]` indices into y of the medoids /
    density-peak centres (None for the soft methods); assignment: `[B, N]` cluster of each input
    token (hard methods; soft methods: argmax over clusters); soft: `[B, K, N]` soft assignment
    (Sinkhorn's transport plan, PatchMerger's attention; None for the hard methods);
    center_feats: `[B, K, C]` the centres' features (medoids, centre tokens before merging,
    learned centres / queries), as the official `viz_data["Center_Feats"]`.
    """
    tokens: torch.Tensor
    centers: Optional[torch.Tensor]
    assignment: Optional[torch.Tensor]
    soft: Optional[torch.Tensor]
    center_feats: torch.Tensor


def selection_float(tensor: torch.Tensor) -> torch.Tensor:
    """float32 for half / bfloat16 inputs (selection scores in fp32); float32 and float64 unchanged."""
    return tensor if tensor.dtype in (torch.float32, torch.float64) else tensor.float()


def _gather_tokens(y: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """y `[B, N, C]`, idx `[B, K]` -> `[B, K, C]`."""
    return y.gather(1, idx.unsqueeze(-1).expand(-1, -1, y.shape[-1]))


# ---------------------------------------------------------------------------
# K-Medoids
# ---------------------------------------------------------------------------

def _sampled_medoids(y: torch.Tensor, num_clusters: int) -> torch.Tensor:
    """Equal-weight initialisation `[B, K]` (official, spec section 3).

    The first medoid is one index from numpy's global RNG, the same for the whole batch; each
    next one is the token whose MAXIMUM distance to the current medoids is largest, the current
    medoids' rows zeroed (so not the minimum of farthest-point sampling). Kept literally: the
    ablation's trained checkpoints depend on it; seed numpy for reproducible runs.
    """
    batch, n, _ = y.shape
    start = int(np.random.choice(np.arange(n), 1)[0])
    medoids = torch.full((batch, 1), start, dtype=torch.long, device=y.device)
    rows = torch.arange(batch, device=y.device)[:, None]
    for k in range(1, num_clusters):
        dist = torch.cdist(y, _gather_tokens(y, medoids))  # [B, N, k]
        dist[rows.expand(-1, k), medoids] = 0
        farthest = dist.max(dim=-1).values.max(dim=-1).indices  # [B]
        medoids = torch.cat([medoids, farthest[:, None]], dim=1)
    return medoids


def kmedoids_fit(y: torch.Tensor, num_clusters: int, iters: int,
                 weight: Optional[torch.Tensor]) -> ClusterResult:
    """The official weighted K-Medoids on tokens y `[B, N, C]`.

    weight: `[B, N, 1]` token weights (the previous block's attention column sums) or None for
    the sampled equal-weight start with unit weights. Initial medoids: `topk(weight, K)` by
    decreasing weight. Then `iters` rounds of: assign each token to its nearest medoid (first
    on ties); for every cluster k the new medoid is `argmin_i T_i` with `T_i = sum_j w_i D_ij`
    for members and `N * 1e6` for the others (the sum runs over ALL tokens j, an empty cluster
    gets token 0). Returns the medoid tokens `[B, K, C]` in cluster-slot order, bitwise copies
    of input tokens, with the medoid indices and the final assignment.
    """
    with torch.no_grad(), selection_precision(y):
        points = selection_float(y.detach())
        if weight is None:
            medoids = _sampled_medoids(points, num_clusters)
            weight = points.new_ones(points.shape[0], points.shape[1], 1)
        else:
            weight = selection_float(weight.detach())
            medoids = weight.topk(num_clusters, dim=1).indices.squeeze(2)
        dist = torch.cdist(points, points)  # [B, N, N]
        row_cost = (dist * weight).sum(dim=-1)  # [B, N]: sum_j w_i D_ij
        non_member = torch.full_like(row_cost, _NON_MEMBER * points.shape[1])
        clusters = torch.arange(num_clusters, device=y.device)[None, :, None]  # [1, K, 1]
        for _ in range(iters):
            assignment = _nearest(dist, medoids)
            cost = torch.where(assignment[:, None, :] == clusters, row_cost[:, None, :], non_member[:, None, :])
            medoids = cost.argmin(dim=-1)  # [B, K]
        assignment = _nearest(dist, medoids)
    return ClusterResult(_gather_tokens(y, medoids), medoids, assignment, None, _gather_tokens(y, medoids))


def _nearest(dist: torch.Tensor, centers: torch.Tensor) -> torch.Tensor:
    """dist `[B, N, N]`, centers `[B, K]` -> `[B, N]` the nearest centre's slot (first on ties)."""
    return dist.gather(2, centers[:, None, :].expand(-1, dist.shape[1], -1)).argmin(dim=-1)


class KMedoids(nn.Module):
    """`cluster_layers.{i}` of a K-Medoids model: no parameters (the official layer holds none)."""

    def __init__(self, num_clusters: int, iters: int = 3, equal_weight: bool = False):
        super().__init__()
        self.num_clusters = num_clusters
        self.iters = iters
        self.equal_weight = equal_weight

    def forward(self, y: torch.Tensor, weight: Optional[torch.Tensor] = None) -> ClusterResult:
        """y `[B, N, C]` patch tokens, weight `[B, N, 1]` (ignored with equal_weight) -> K medoid tokens."""
        return kmedoids_fit(y, self.num_clusters, self.iters, None if self.equal_weight else weight)

    def extra_repr(self) -> str:
        return f"num_clusters={self.num_clusters}, iters={self.iters}, equal_weight={self.equal_weight}"


# ---------------------------------------------------------------------------
# DPC-KNN
# ---------------------------------------------------------------------------

def dpc_knn_cluster(y: torch.Tensor, num_clusters: int, k: int = 5):
    """Density-peaks clustering with k nearest neighbours (TCFormer's CTM), as the official code.

    y: `[B, N, C]`. With `D = cdist(y, y) / sqrt(C)`: density `rho_i = exp(-mean of the k
    smallest D_ij^2)` (the token itself included) plus `1e-6 * U`, `U = torch.rand([B, N])` from
    the global generator; `delta_i` = distance to the nearest denser token (the sample's largest
    distance for the densest); centres = `topk(delta * rho, K)` by decreasing score; each token
    joins its nearest centre (first on ties) and every centre its own cluster.
    Returns `(assignment [B, N] long, centers [B, K] long)`.
    """
    with torch.no_grad(), selection_precision(y):
        points = selection_float(y.detach())
        batch, n, channels = points.shape
        dist = torch.cdist(points, points) / (channels ** 0.5)
        nearest = dist.topk(k, dim=-1, largest=False).values
        density = (-(nearest ** 2).mean(dim=-1)).exp()
        # the official noise: orders near-equal densities; drawn on every forward, train and eval
        density = density + torch.rand(density.shape, device=density.device, dtype=density.dtype) * 1e-6
        denser = (density[:, None, :] > density[:, :, None]).to(dist.dtype)  # [b, i, j]: rho_j > rho_i
        dist_max = dist.flatten(1).max(dim=-1).values[:, None, None]
        delta = (dist * denser + dist_max * (1 - denser)).min(dim=-1).values
        centers = (delta * density).topk(num_clusters, dim=-1).indices  # [B, K]
        assignment = dist.gather(1, centers[:, :, None].expand(-1, -1, n)).argmin(dim=1)  # [B, N]
        slots = torch.arange(num_clusters, device=y.device).expand(batch, num_clusters)
        assignment = assignment.scatter(1, centers, slots)
    return assignment, centers


def cluster_merge(y: torch.Tensor, assignment: torch.Tensor, num_clusters: int,
                  weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Weighted mean of each cluster's tokens, accumulated with index_add as the official code.

    y: `[B, N, C]`; assignment: `[B, N]` cluster in `[0, K)`; weight: `[B, N, 1]` (None = ones).
    Returns `[B, K, C]`, `z_k = sum_{a_i = k} (w_i / (W_k + 1e-6)) y_i` with `W_k = sum_{a_i = k} w_i`
    (an empty cluster is 0). Differentiable in y and weight.
    """
    batch, n, channels = y.shape
    if weight is None:
        weight = y.new_ones(batch, n, 1)
    flat = (assignment + torch.arange(batch, device=y.device)[:, None] * num_clusters).reshape(batch * n)
    total = weight.new_zeros(batch * num_clusters, 1).index_add(0, flat, weight.reshape(batch * n, 1)) + 1e-6
    norm_weight = weight / total[flat].reshape(batch, n, 1)
    merged = y.new_zeros(batch * num_clusters, channels).index_add(
        0, flat, (y * norm_weight).reshape(batch * n, channels).to(y.dtype))
    return merged.reshape(batch, num_clusters, channels)


class DPCKNN(nn.Module):
    """`cluster_layers.{i}` of a DPC-KNN model: `score = Linear(C, 1)` gives the merge weights
    `exp(score(y))` (absent with `equal_weight`: unit weights); the clustering itself has no
    gradient, so `score` learns only through the merge."""

    def __init__(self, embed_dim: int, num_clusters: int, k: int = 5, equal_weight: bool = False):
        super().__init__()
        self.num_clusters = num_clusters
        self.k = k
        self.equal_weight = equal_weight
        if not equal_weight:
            self.score = nn.Linear(embed_dim, 1)
            nn.init.trunc_normal_(self.score.weight, std=0.02)  # timm 0.4.12's _init_vit_weights
            nn.init.zeros_(self.score.bias)

    def forward(self, y: torch.Tensor, weight: Optional[torch.Tensor] = None) -> ClusterResult:
        """y `[B, N, C]` -> K merged tokens `[B, K, C]` in centre-rank order (`weight` unused)."""
        token_weight = None if self.equal_weight else self.score(y).exp()
        assignment, centers = dpc_knn_cluster(y, self.num_clusters, self.k)
        merged = cluster_merge(y, assignment, self.num_clusters, token_weight)
        return ClusterResult(merged, centers, assignment, None, _gather_tokens(y, centers).detach())

    def extra_repr(self) -> str:
        return f"num_clusters={self.num_clusters}, k={self.k}, equal_weight={self.equal_weight}"
