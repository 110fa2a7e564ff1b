"""Sinkhorn token clustering of the TokenReduction study (Haurum et al., ICCVW 2023, arXiv 2308.04657).

The patch tokens are soft-assigned to `K` learned centres by entropic optimal transport and
each centre's output token is the transport-weighted sum of the (L2-normalised) tokens.
`sinkhorn_transport` is the pure log-domain kernel; `Sinkhorn` is the `cluster_layers.{i}`
module (`v [K, C]`, initialised N(0, 1)).

Kept from the official code on purpose (docs/methods/tokenreduction.md): the centres are
re-normalised IN PLACE, under no_grad, at every forward (training and evaluation), so the
gradient is taken at unit vectors and the optimizer steps from them (centres already unit to
within rounding are left bit-identical, `Sinkhorn.renormalize_`); both marginals are
`1 / (K + N)`; the output tokens are sums of unit vectors, not averages. The transport plan is
computed in float32 (`token_ops.selection_precision`) under bf16, so bf16 runs assign like fp32.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .token_ops import selection_precision
from .tokenreduction_clustering import ClusterResult, selection_float

__all__ = ["sinkhorn_transport", "Sinkhorn"]


def sinkhorn_transport(scores: torch.Tensor, eps: float = 1.0, iters: int = 3) -> torch.Tensor:
    """Log-domain Sinkhorn with both marginals `1 / (K + N)`, as the official `log_optimal_transport`.

    scores: `[B, K, N]` similarities of K centres to N tokens. With `Z = scores / eps`,
    `lam = -log(K + N)`, `u = 0 [B, K]`, `t = 0 [B, N]`, `iters` times:
    `u = lam - logsumexp_n(Z + t)`, `t = lam - logsumexp_k(Z + u)`; returns
    `Pi = exp(Z + u + t - lam)` `[B, K, N]`: after the final `t` update every token's column sums
    to 1 over the centres. Differentiable.
    """
    batch, m, n = scores.shape
    one = scores.new_tensor(1)
    lam = -((m * one).to(scores) + (n * one).to(scores)).log()
    log_mu = lam.expand(m)[None].expand(batch, -1)
    log_nu = lam.expand(n)[None].expand(batch, -1)
    z = scores / eps
    u, t = torch.zeros_like(log_mu), torch.zeros_like(log_nu)
    for _ in range(iters):
        u = log_mu - torch.logsumexp(z + t.unsqueeze(1), dim=2)
        t = log_nu - torch.logsumexp(z + u.unsqueeze(2), dim=1)
    return (z + u.unsqueeze(2) + t.unsqueeze(1) - lam).exp()


class Sinkhorn(nn.Module):
    """`cluster_layers.{i}` of a Sinkhorn model: K learned unit centres `v [K, C]`."""

    def __init__(self, embed_dim: int, num_clusters: int, eps: float = 1.0, iters: int = 3):
        super().__init__()
        self.v = nn.Parameter(torch.randn(num_clusters, embed_dim))
        self.eps = eps
        self.iters = iters

    @torch.no_grad()
    def renormalize_(self) -> None:
        """Project the centres back onto the unit sphere, in place, as the official forward does.

        A centre whose norm is already 1 to within rounding (8 machine epsilons; a normalised
        vector's recomputed norm is off by up to ~4) is left as it is, so repeated forwards see
        the same parameter bits (the official code rewrites it at every forward, drifting by an
        ulp each time, so two evaluations of one image could differ in the last bits).
        """
        v = self.v
        unit = (v.norm(p=2, dim=-1, keepdim=True) - 1).abs() <= 8 * torch.finfo(v.dtype).eps
        v.copy_(torch.where(unit, v, F.normalize(v, p=2, dim=-1)))

    def forward(self, y: torch.Tensor, weight=None) -> ClusterResult:
        """y `[B, N, C]` -> K tokens `z = Pi @ normalize(y)` `[B, K, C]` (`weight` unused)."""
        y_hat = F.normalize(y, p=2, dim=-1)
        self.renormalize_()
        centres = self.v[None].expand(y.shape[0], -1, -1)  # [B, K, C]
        with selection_precision(y):
            # [B, N, K] transposed, as the official code multiplies (same rounding)
            scores = torch.bmm(selection_float(y_hat), selection_float(centres).transpose(1, 2)).transpose(1, 2)
            plan = sinkhorn_transport(scores, self.eps, self.iters)  # [B, K, N]
        tokens = torch.bmm(y_hat.transpose(1, 2), plan.to(y_hat.dtype).transpose(1, 2)).transpose(1, 2)
        return ClusterResult(tokens, None, plan.argmax(dim=1), plan, centres.detach())

    def extra_repr(self) -> str:
        return f"num_clusters={self.v.shape[0]}, eps={self.eps}, iters={self.iters}"
