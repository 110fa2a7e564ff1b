"""Training criteria: DeiT's distillation wrapper (Touvron et al., "Training data-efficient
image transformers & distillation through attention", ICML 2021) and the criterion chain.

Every criterion is called as `criterion(samples, outputs, targets)`. Model outputs may
be a Tensor, a `(cls, dist)` tuple (distilled DeiT in training) or a dict with
`"logits"` (extra entries are for wrappers such as LTM's information-bottleneck loss).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from torch import nn

from utils.outputs import main_logits  # noqa: F401  (part of this module's API: engine, tools)


class BinarizedTargetBCE(nn.Module):
    """DeiT's --bce-loss: BCE-with-logits on targets binarised with `> 0`.

    Integer class targets are one-hot encoded first (DeiT binarises mixed soft targets;
    without mixup timm's BinaryCrossEntropy does the one-hot step).
    """

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if target.dim() == 1 or target.shape != logits.shape:
            target = F.one_hot(target.long(), num_classes=logits.shape[-1])
        target = target.gt(0.0).to(logits.dtype)
        return F.binary_cross_entropy_with_logits(logits, target)


class DistillationLoss(nn.Module):
    """DeiT distillation: `(1 - alpha) * base(cls, y) + alpha * KD(dist, teacher)`.

    soft: KL(log_softmax(dist / T) || log_softmax(teacher / T)), summed, times T^2,
    divided by dist.numel() (the legacy per-element mean); hard: CE(dist, argmax teacher).
    With type 'none' only the base criterion on the class output is used.
    """

    def __init__(self, base_criterion: nn.Module, teacher_model: nn.Module | None,
                 distillation_type: str = "none", alpha: float = 0.5, tau: float = 1.0):
        super().__init__()
        if distillation_type not in ("none", "soft", "hard"):
            raise ValueError(f"distillation type must be none, soft or hard, got {distillation_type!r}")
        self.base_criterion = base_criterion
        self.teacher_model = teacher_model
        self.distillation_type = distillation_type
        self.alpha = alpha
        self.tau = tau

    def forward(self, inputs, outputs, labels):
        if isinstance(outputs, dict):
            outputs = outputs["logits"]
        outputs_kd = None
        if isinstance(outputs, (tuple, list)):
            outputs, outputs_kd = outputs[0], outputs[1]
        base_loss = self.base_criterion(outputs, labels)
        if self.distillation_type == "none":
            return base_loss
        if outputs_kd is None:
            raise ValueError("distillation needs a model that returns (class, distillation) outputs in training, "
                             "e.g. deit_*_distilled_patch16_224")
        with torch.no_grad():
            teacher_outputs = self.teacher_model(inputs)
        if self.distillation_type == "soft":
            T = self.tau
            distillation_loss = F.kl_div(
                F.log_softmax(outputs_kd / T, dim=1),
                F.log_softmax(teacher_outputs / T, dim=1),
                reduction="sum", log_target=True,
            ) * (T * T) / outputs_kd.numel()
        else:
            distillation_loss = F.cross_entropy(outputs_kd, teacher_outputs.argmax(dim=1))
        return base_loss * (1 - self.alpha) + distillation_loss * self.alpha


def build_base_criterion(args, mixup_active: bool) -> nn.Module:
    if getattr(args, "bce_loss", False):
        return BinarizedTargetBCE()
    if mixup_active:
        # Smoothing is already folded into the mixed soft targets.
        return SoftTargetCrossEntropy()
    if args.smoothing:
        return LabelSmoothingCrossEntropy(smoothing=args.smoothing)
    return nn.CrossEntropyLoss()


def build_teacher(args, num_classes: int, device) -> nn.Module:
    """DeiT's teacher: `create_model(teacher, num_classes, global_pool='avg')`, weights from --teacher-path."""
    import timm

    from utils.checkpoint import extract_state_dict, load_checkpoint_file, load_model_weights
    from utils.errors import UserError

    if not args.teacher_path:
        raise UserError("--distillation-type needs --teacher-path (a local checkpoint of --teacher-model)")
    try:
        teacher = timm.create_model(args.teacher_model, pretrained=False, num_classes=num_classes, global_pool="avg")
    except TypeError:
        teacher = timm.create_model(args.teacher_model, pretrained=False, num_classes=num_classes)
    state = extract_state_dict(load_checkpoint_file(args.teacher_path))
    load_model_weights(teacher, state, strict=True, model_name=args.teacher_model)
    teacher.to(device)
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def build_criterion(args, model: nn.Module, mixup_active, teacher: nn.Module | None) -> nn.Module:
    """Base criterion wrapped for distillation. A method's own loss terms (LTM's IB loss, LTMP's
    FLOPs regulariser) are added by its hooks' `wrap_criterion`, once, in main.py.

    `mixup_active` may be a bool or the mixup callable (truthy when mixing is on).
    """
    base = build_base_criterion(args, bool(mixup_active))
    return DistillationLoss(base, teacher, args.distillation_type, args.distillation_alpha, args.distillation_tau)
