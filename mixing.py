"""Batch mixing: timm `Mixup` (DeiT) or RaftMLP's sequential mixup -> CutMix.

DeiT (Touvron et al., ICML 2021) draws *either* mixup or CutMix per batch (timm `Mixup`,
switch prob 0.5). RaftMLP (Tatsunami & Taki, "RaftMLP: How Much Can Be Done Without
Attention and with Less Spatial Locality?", ACCV 2022) applies *both* to every batch: mixup,
then CutMix on the already mixed batch. That is not reachable with timm's `Mixup`, so
`SequentialMixup` implements it (`--mix-mode sequential`). Both return soft targets with
label smoothing folded in, for `SoftTargetCrossEntropy`.
"""
import dataclasses
import math

import numpy as np
import torch
from timm.data import Mixup

from utils.errors import UserError

MIX_MODES = ("timm", "sequential")


def mixup_active(args) -> bool:
    """DeiT's rule: mixing is on when mixup > 0, cutmix > 0 or a cutmix min/max is set."""
    return args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax is not None


def smoothed_one_hot(target: torch.Tensor, num_classes: int, smoothing: float) -> torch.Tensor:
    """timm's smoothed one-hot: `1 - smoothing + smoothing / C` on the label,
    `smoothing / C` elsewhere."""
    off_value = smoothing / num_classes
    one_hot = torch.full((target.shape[0], num_classes), off_value, device=target.device)
    return one_hot.scatter_(1, target.long().view(-1, 1), 1.0 - smoothing + off_value)


@dataclasses.dataclass
class SequentialMixParams:
    """The random draws of one `SequentialMixup` call (injectable for tests)."""

    lam_mixup: float
    mixup_perm: torch.Tensor   # pi_1
    lam_cutmix: float
    cutmix_perm: torch.Tensor  # pi_2
    box: tuple                 # (top, left, height, width) of the pasted region


class SequentialMixup:
    """RaftMLP's mixing: mixup (prob 1) on the batch, then CutMix (prob 1) on the result.

    With y the smoothed one-hot labels, the targets are

        t = lam_c * (lam_m * y + (1 - lam_m) * y[pi_1])
            + (1 - lam_c) * (lam_m * y[pi_2] + (1 - lam_m) * y[pi_1][pi_2]),

    so `SoftTargetCrossEntropy(out, t)` equals the official four-term loss of
    label-smoothing cross-entropies. CutMix pastes a box of side floor(S * sqrt(1 - lam_c))
    (per axis) at a uniformly drawn top-left corner and, as in the official code, does not
    correct lam_c for the actual box area.

    The official code draws the CutMix lambda from Beta(mixup_alpha, mixup_alpha): its
    `cutmix_alpha` setting is ignored (a bug we reproduce), hence a single `alpha` here.
    The lambdas come from NumPy's global RNG and the permutations from torch's, like
    timm's `Mixup`, so `--seed` makes runs repeatable.
    """

    def __init__(self, alpha: float, label_smoothing: float = 0.1, num_classes: int = 1000):
        if alpha <= 0:
            raise UserError(f"--mix-mode sequential needs --mixup > 0 (its Beta alpha), "
                            f"got {alpha}")
        self.alpha = alpha
        self.label_smoothing = label_smoothing
        self.num_classes = num_classes
        self.mixup_enabled = True  # the same switch as timm's Mixup

    def sample_params(self, batch_size: int, height: int, width: int,
                      device: torch.device) -> SequentialMixParams:
        lam_mixup = float(np.random.beta(self.alpha, self.alpha))
        lam_cutmix = float(np.random.beta(self.alpha, self.alpha))
        cut_ratio = math.sqrt(1.0 - lam_cutmix)
        cut_h, cut_w = math.floor(height * cut_ratio), math.floor(width * cut_ratio)
        top = int(np.random.randint(0, height - cut_h + 1))
        left = int(np.random.randint(0, width - cut_w + 1))
        return SequentialMixParams(
            lam_mixup=lam_mixup, mixup_perm=torch.randperm(batch_size, device=device),
            lam_cutmix=lam_cutmix, cutmix_perm=torch.randperm(batch_size, device=device),
            box=(top, left, cut_h, cut_w))

    def mix(self, x: torch.Tensor, target: torch.Tensor, params: SequentialMixParams):
        """Mixed images `[B, C, H, W]` and soft targets `[B, num_classes]` for given draws."""
        lam_m, lam_c = params.lam_mixup, params.lam_cutmix
        p1, p2 = params.mixup_perm, params.cutmix_perm
        mixed = lam_m * x + (1.0 - lam_m) * x[p1]
        top, left, cut_h, cut_w = params.box
        rows, cols = slice(top, top + cut_h), slice(left, left + cut_w)
        mixed[:, :, rows, cols] = mixed[p2][:, :, rows, cols]

        y = smoothed_one_hot(target, self.num_classes, self.label_smoothing)
        y_mixed = lam_m * y + (1.0 - lam_m) * y[p1]
        return mixed, lam_c * y_mixed + (1.0 - lam_c) * y_mixed[p2]

    def __call__(self, x: torch.Tensor, target: torch.Tensor):
        if not self.mixup_enabled:
            return x, smoothed_one_hot(target, self.num_classes, self.label_smoothing)
        params = self.sample_params(x.shape[0], x.shape[-2], x.shape[-1], x.device)
        return self.mix(x, target, params)


def build_mixup(args, nb_classes: int):
    """timm `Mixup` (`--mix-mode timm`), `SequentialMixup` (`sequential`), or None when off."""
    if not mixup_active(args):
        return None
    mode = getattr(args, "mix_mode", "timm")
    if mode == "sequential":
        return SequentialMixup(alpha=args.mixup, label_smoothing=args.smoothing,
                               num_classes=nb_classes)
    if mode != "timm":
        raise UserError(f"unknown --mix-mode {mode!r}; use one of {', '.join(MIX_MODES)}")
    return Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix,
                 cutmix_minmax=args.cutmix_minmax, prob=args.mixup_prob,
                 switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
                 label_smoothing=args.smoothing, num_classes=nb_classes)
