"""Information-bottleneck (IB) loss of LTM (Wang & Yang, "Efficient Visual Transformer by
Learnable Token Merging", TPAMI 2025); the method page is ``docs/methods/ltm.md``.

Soft cluster scores phi_k(v) = softmax_k(-beta * ||v/|v| - c_k||^2) against unit centroids c_k.
Each epoch the pooled pre-logit features of the training set are clustered (eval mode, no grad)
and the variational table Q[k, c] = sum_i phi_k(f_i) t_ic / sum_i t_ic is built from the same
pass. Per sample

    IB_i = sum_a phi_a(x_i) log phi_a(x_i) - sum_k phi_k(f_i) sum_c t_ic log Q[k, c]

and the training loss is base + w * mean_i IB_i with w = ``--ib-weight`` from epoch
floor(``--ib-warmup-ratio`` * epochs) on (0 before; IB is still computed and logged).

Changes relative to the official ``train.py``: Q uses the
new centroids; the clustering pass runs in eval mode under no_grad; features are L2-normalised
before k-means; each rank clusters its shard (subsample gathered, k-means on rank 0, centroids
broadcast, Q numerators and class counts all-reduced); Q is clamped at 1e-8 and the term is
fp32; soft (mixup) targets use sum_c t_c log Q[k, c]; the input-side term is optional
(``--ib-input-clusters none|kmeans``, default none: it has no gradient anyway); k-means is
torch Lloyd with k-means++ init, or faiss when installed.
"""
from __future__ import annotations

import logging
import math
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .compiling import unwrap_model

_logger = logging.getLogger(__name__)

_Q_FLOOR = 1e-8
_MI_EPS = 1e-10


# ---------------------------------------------------------------------------------------------
# Pure functions
# ---------------------------------------------------------------------------------------------

def cluster_scores(vectors: torch.Tensor, centroids: torch.Tensor, beta: float = 1.0) -> torch.Tensor:
    """phi (N, K) = softmax_k(-beta * ||v_hat - c_k||^2) for v (N, D) and unit centroids (K, D), fp32.

    With unit vectors ||v_hat - c||^2 = 2 - 2 v_hat.c, so this is softmax(2 beta v_hat.c).
    """
    unit = F.normalize(vectors.float().flatten(1), dim=-1)
    return (2.0 * beta * unit @ centroids.float().t()).softmax(dim=-1)


def soft_targets(targets: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(N,) class indices or (N, C) soft targets -> (N, C) float."""
    if targets.dim() == 1:
        return F.one_hot(targets.long(), num_classes).float()
    return targets.float()


def variational_table(numerator: torch.Tensor, class_mass: torch.Tensor) -> torch.Tensor:
    """Q (K, C) = numerator / class mass; columns of seen classes sum to 1, unseen columns are 0."""
    return numerator / class_mass.clamp_min(torch.finfo(numerator.dtype).tiny).unsqueeze(0)


def ib_per_sample(
        feature_scores: torch.Tensor,
        log_q: torch.Tensor,
        targets: torch.Tensor,
        input_scores: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """IB_i (N,) from phi(f) (N, K), log Q (K, C), soft targets (N, C) and optional phi(x) (N, A).

    The input term does not depend on the model and is detached.
    """
    output_term = -((feature_scores @ log_q) * targets).sum(-1)
    if input_scores is None:
        return output_term
    input_scores = input_scores.detach()
    return output_term + (input_scores * input_scores.clamp_min(_MI_EPS).log()).sum(-1)


def mutual_information(joint: torch.Tensor) -> float:
    """I(X; Y) in nats from an unnormalised joint histogram (X, Y), eps 1e-10 inside the logs."""
    joint = joint.double() / joint.sum().clamp_min(_MI_EPS)
    px, py = joint.sum(1, keepdim=True), joint.sum(0, keepdim=True)
    return float((joint * ((joint + _MI_EPS).log() - (px @ py + _MI_EPS).log())).sum())


def _sq_distances(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    return (x.pow(2).sum(1, keepdim=True) - 2 * x @ centroids.t() + centroids.pow(2).sum(1)).clamp_min_(0)


def _assign(x: torch.Tensor, centroids: torch.Tensor, chunk: int = 65536):
    """Nearest centroid and squared distance of each row of x, in chunks (no N x K matrix at once)."""
    labels, dists = [], []
    for start in range(0, x.shape[0], chunk):
        d = _sq_distances(x[start:start + chunk], centroids)
        best, idx = d.min(dim=1)
        labels.append(idx)
        dists.append(best)
    return torch.cat(labels), torch.cat(dists)


def _kmeans_pp_init(x: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    first = torch.randint(x.shape[0], (1,), generator=generator, device="cpu").item()
    centroids = [x[first]]
    closest = _sq_distances(x, x[first:first + 1]).squeeze(1)
    for _ in range(1, k):
        total = closest.sum()
        if total <= 0:  # every point coincides with a centroid: pick uniformly
            pick = torch.randint(x.shape[0], (1,), generator=generator, device="cpu").item()
        else:
            probs = (closest / total).cpu()
            pick = torch.multinomial(probs, 1, generator=generator).item()
        centroids.append(x[pick])
        closest = torch.minimum(closest, _sq_distances(x, x[pick:pick + 1]).squeeze(1))
    return torch.stack(centroids)


def kmeans(x: torch.Tensor, k: int, iters: int = 60, redo: int = 3, seed: int = 0) -> torch.Tensor:
    """Lloyd k-means with k-means++ init; best of ``redo`` runs by inertia -> centroids (k, D) fp32.

    Uses faiss when it is installed (same niter / nredo, 10-1000 points per centroid).
    """
    x = x.float()
    try:
        import faiss  # type: ignore
    except ImportError:
        faiss = None
    if faiss is not None:
        km = faiss.Kmeans(x.shape[1], k, niter=iters, nredo=redo, seed=seed, verbose=False,
                          max_points_per_centroid=1000, min_points_per_centroid=10,
                          gpu=x.is_cuda)
        km.train(x.cpu().numpy())
        return torch.from_numpy(km.centroids).to(x.device)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    best, best_inertia = None, math.inf
    for _ in range(max(redo, 1)):
        centroids = _kmeans_pp_init(x, k, generator)
        for _ in range(iters):
            labels, _ = _assign(x, centroids)
            sums = torch.zeros_like(centroids).index_add_(0, labels, x)
            counts = torch.bincount(labels, minlength=k).unsqueeze(1)
            # an empty cluster keeps its previous centroid
            centroids = torch.where(counts > 0, sums / counts.clamp_min(1), centroids)
        inertia = float(_assign(x, centroids)[1].sum())
        if inertia < best_inertia:
            best, best_inertia = centroids, inertia
    return best


# ---------------------------------------------------------------------------------------------
# Distributed helpers (no-ops in a single process)
# ---------------------------------------------------------------------------------------------

def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    if _distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def _broadcast(tensor: torch.Tensor) -> torch.Tensor:
    if _distributed():
        dist.broadcast(tensor, src=0)
    return tensor


def _gather_rows(rows: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's rows (possibly different counts) on every rank."""
    if not _distributed():
        return rows
    count = torch.tensor([rows.shape[0]], device=rows.device)
    counts = [torch.zeros_like(count) for _ in range(dist.get_world_size())]
    dist.all_gather(counts, count)
    longest = int(max(c.item() for c in counts))
    padded = rows.new_zeros((longest,) + tuple(rows.shape[1:]))
    padded[:rows.shape[0]] = rows
    gathered = [torch.zeros_like(padded) for _ in counts]
    dist.all_gather(gathered, padded)
    return torch.cat([g[:int(c.item())] for g, c in zip(gathered, counts)])


def _is_main() -> bool:
    return not _distributed() or dist.get_rank() == 0


def _subsample(rows: torch.Tensor, limit: int, generator: torch.Generator) -> torch.Tensor:
    if rows.shape[0] <= limit:
        return rows
    keep = torch.randperm(rows.shape[0], generator=generator)[:limit]
    return rows[keep.to(rows.device)]


_unwrap = unwrap_model


# ---------------------------------------------------------------------------------------------
# Criterion
# ---------------------------------------------------------------------------------------------

class InformationBottleneckLoss(nn.Module):
    """base_criterion(samples, logits, targets) + w * mean IB, with per-epoch re-clustering.

    Called as ``criterion(samples, outputs, targets)``; outputs may be a Tensor or the LTM
    training dict ``{"logits", "features"}``; targets may be class indices or soft targets.
    """

    def __init__(
            self,
            base_criterion: nn.Module,
            num_classes: int,
            weight: float = 0.1,
            warmup_epoch: int = 0,
            num_clusters: Optional[int] = None,
            input_clusters: str = "none",
            beta: float = 1.0,
            kmeans_iters: int = 60,
            kmeans_redo: int = 3,
            input_kmeans_iters: int = 20,
            input_kmeans_redo: int = 2,
            max_points_per_centroid: int = 1000,
            seed: int = 0,
    ):
        super().__init__()
        if input_clusters not in ("none", "kmeans"):
            raise ValueError(f"ib input clusters must be 'none' or 'kmeans', got {input_clusters!r}")
        self.base_criterion = base_criterion
        self.num_classes = num_classes
        self.weight = weight
        self.warmup_epoch = warmup_epoch
        self.num_clusters = num_clusters or num_classes
        self.input_clusters = input_clusters
        self.beta = beta
        self.kmeans_iters, self.kmeans_redo = kmeans_iters, kmeans_redo
        self.input_kmeans_iters, self.input_kmeans_redo = input_kmeans_iters, input_kmeans_redo
        self.max_points_per_centroid = max_points_per_centroid
        self.seed = seed
        self.current_weight = 0.0
        # Clustering results of the current epoch (plain tensors, rebuilt by on_epoch_start).
        self.feature_centroids: Optional[torch.Tensor] = None
        self.input_centroids: Optional[torch.Tensor] = None
        self.log_q: Optional[torch.Tensor] = None
        self._ib_sum: Optional[torch.Tensor] = None
        self._ib_count = 0

    # -- per step ---------------------------------------------------------------------------
    def forward(self, samples, outputs, targets):
        features = None
        if isinstance(outputs, dict):
            features = outputs.get("features")
            outputs = outputs["logits"]
        loss = self.base_criterion(samples, outputs, targets)
        if features is None or self.log_q is None:
            return loss
        ib = self.ib_value(samples, features, targets)
        detached = ib.detach()
        self._ib_sum = detached if self._ib_sum is None else self._ib_sum + detached
        self._ib_count += 1
        return loss + self.current_weight * ib

    def ib_value(self, samples: torch.Tensor, features: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean IB bound of a batch, fp32 (autocast off)."""
        with torch.autocast(device_type=features.device.type, enabled=False):
            feature_scores = cluster_scores(features, self.feature_centroids, self.beta)
            input_scores = None
            if self.input_centroids is not None:
                input_scores = cluster_scores(samples, self.input_centroids, self.beta)
            per_sample = ib_per_sample(
                feature_scores, self.log_q, soft_targets(targets, self.num_classes), input_scores)
        return per_sample.mean()

    def extra_metrics(self) -> dict:
        """Mean IB of the steps since the last epoch start, and the weight in use (for loggers)."""
        mean = float(self._ib_sum / self._ib_count) if self._ib_count else float("nan")
        return {"ib_loss": mean, "ib_weight": self.current_weight}

    # -- per epoch --------------------------------------------------------------------------
    def weight_for_epoch(self, epoch: int) -> float:
        return self.weight if epoch >= self.warmup_epoch else 0.0

    @torch.no_grad()
    def on_epoch_start(self, model: nn.Module, data_loader, epoch: int, device) -> None:
        """Re-cluster training features (eval mode, no grad), rebuild Q, set this epoch's weight."""
        if self._ib_count:
            _logger.info(f"IB loss: epoch {epoch - 1} mean {self.extra_metrics()['ib_loss']:.5f}")
        self._ib_sum, self._ib_count = None, 0
        self.current_weight = self.weight_for_epoch(epoch)
        model = _unwrap(model)
        was_training = model.training
        model.eval()
        try:
            if self.input_clusters == "kmeans" and self.input_centroids is None:
                self.input_centroids = self._cluster_inputs(data_loader, device)
            features, labels, input_scores = self._collect(model, data_loader, device)
        finally:
            model.train(was_training)
        self._fit(features, labels, input_scores, device, epoch)

    def _collect(self, model, data_loader, device):
        """Normalised pooled features (fp16, CPU), soft labels and optional input scores of this rank."""
        features, labels, input_scores = [], [], []
        for batch in data_loader:
            samples, targets = batch[0].to(device, non_blocking=True), batch[1]
            feats = model.forward_head(model.forward_features(samples), pre_logits=True)
            features.append(F.normalize(feats.float(), dim=-1).half().cpu())
            labels.append(soft_targets(targets, self.num_classes).half().cpu())
            if self.input_centroids is not None:
                input_scores.append(cluster_scores(samples, self.input_centroids, self.beta).half().cpu())
        if not features:
            raise ValueError("the IB loss needs a non-empty training loader; check the data path or set --ib-weight 0")
        return (torch.cat(features), torch.cat(labels),
                torch.cat(input_scores) if input_scores else None)

    def _kmeans_on_main(self, rows: torch.Tensor, k_wanted: int, iters: int, redo: int,
                        device, seed: int) -> torch.Tensor:
        """k-means over a subsample gathered from every rank, run on rank 0, centroids broadcast.

        K = min(k_wanted, number of samples over all ranks) (tiny data sets), logged when reduced.
        """
        world = dist.get_world_size() if _distributed() else 1
        total = int(_all_reduce_sum(torch.tensor([rows.shape[0]], device=device)).item())
        k = min(k_wanted, total)
        if k < k_wanted:
            _logger.info(f"IB loss: {total} samples < {k_wanted} clusters; using K={k}")
        generator = torch.Generator().manual_seed(seed)
        per_rank = max(1, self.max_points_per_centroid * k // world)
        sample = _gather_rows(_subsample(rows, per_rank, generator).to(device))
        centroids = torch.empty(k, rows.shape[1], device=device)
        if _is_main():
            centroids = F.normalize(kmeans(sample.float(), k, iters, redo, seed).to(device), dim=-1)
        return _broadcast(centroids.contiguous())

    def _fit(self, features, labels, input_scores, device, epoch: int) -> None:
        centroids = self._kmeans_on_main(
            features, self.num_clusters, self.kmeans_iters, self.kmeans_redo, device, self.seed + epoch)
        k = centroids.shape[0]
        numerator = torch.zeros(k, self.num_classes, device=device, dtype=torch.float64)
        input_joint = None
        if input_scores is not None:
            input_joint = torch.zeros(input_scores.shape[1], k, device=device, dtype=torch.float64)
        chunk = 8192
        for start in range(0, features.shape[0], chunk):
            phi = cluster_scores(features[start:start + chunk].to(device), centroids, self.beta).double()
            numerator += phi.t() @ labels[start:start + chunk].to(device).double()
            if input_joint is not None:
                input_joint += input_scores[start:start + chunk].to(device).double().t() @ phi
        _all_reduce_sum(numerator)
        if input_joint is not None:
            _all_reduce_sum(input_joint)
        class_mass = numerator.sum(0)  # each row's phi sums to 1, so this is sum_i t_ic
        self.feature_centroids = centroids
        self.log_q = variational_table(numerator, class_mass).clamp_min(_Q_FLOOR).log().float()
        info_out_label = mutual_information(numerator)
        message = f"IB clusters: epoch {epoch}, K={k}, weight {self.current_weight}, I(out;label)={info_out_label:.4f}"
        if input_joint is not None:
            info_in_out = mutual_information(input_joint)
            message += f", I(in;out)={info_in_out:.4f}, I(in;out)-I(out;label)={info_in_out - info_out_label:.4f}"
        _logger.info(message)

    def _cluster_inputs(self, data_loader, device) -> torch.Tensor:
        """Input-side centroids over raw normalised pixels of the first training batches (once)."""
        world = dist.get_world_size() if _distributed() else 1
        limit = max(1, 10 * self.num_clusters // world)  # faiss' minimum of 10 points per centroid
        rows, seen = [], 0
        for index, batch in enumerate(data_loader):
            if index >= 1000 or seen >= limit:
                break
            flat = F.normalize(batch[0].float().flatten(1), dim=-1)
            rows.append(flat)
            seen += flat.shape[0]
        rows = torch.cat(rows)[:limit]
        return self._kmeans_on_main(
            rows, self.num_clusters, self.input_kmeans_iters, self.input_kmeans_redo, device, self.seed + 10_000)


def build_ib_criterion(base_criterion: nn.Module, model: nn.Module, args) -> InformationBottleneckLoss:
    """Wrap the criterion chain with the IB loss and ask the model for training features."""
    model = _unwrap(model)
    if not getattr(model, "supports_ib_loss", False):
        raise ValueError(f"{type(model).__name__} does not support the IB loss; use an ltm_* model or --ib-weight 0")
    epochs = int(getattr(args, "epochs", 0) or 0)
    ratio = float(getattr(args, "ib_warmup_ratio", 0.3))
    criterion = InformationBottleneckLoss(
        base_criterion,
        num_classes=model.num_classes,
        weight=float(args.ib_weight),
        warmup_epoch=math.floor(ratio * epochs),
        input_clusters=getattr(args, "ib_input_clusters", "none") or "none",
        seed=int(getattr(args, "seed", 0) or 0),
    )
    model.set_return_features(True)
    _logger.info(f"IB loss: weight {criterion.weight} from epoch {criterion.warmup_epoch} of {epochs}, "
                 f"K={criterion.num_clusters}, input clusters {criterion.input_clusters}")
    return criterion
